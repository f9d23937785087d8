#!/usr/bin/env bash
# make compose-e2e: docker-compose.yml end to end on a reachable Docker Engine (DOCKER_HOST):
# build the image, bring the stack up (TLS + SuperNode authentication), run the quickstart
# for 2 rounds from the SuperLink's container, check through MLflow's REST API from the
# host (127.0.0.1:5000, the deployment's login and CA) that the run and its metrics
# arrived and that an anonymous request is refused, and always tear it all down (down -v).
#
# Where python:3.11-slim / postgres:15 cannot be pulled, the images of
# docker/build-base-images.sh are built and used. Extra compose files: COMPOSE_E2E_FILES
# (e.g. "docker-compose.insecure.yml"). Elapsed time is printed per phase.
set -euo pipefail
cd "$(dirname "$0")/.."

export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-fedsparse-e2e}
files=(-f docker-compose.yml)
for extra in ${COMPOSE_E2E_FILES:-}; do files+=(-f "$extra"); done
compose() { docker-compose "${files[@]}" "$@"; }

workdir=$(mktemp -d)
start=$SECONDS
phase_start=$SECONDS
phase() {  # phase NAME: report the previous phase's time, start timing NAME
    local now=$SECONDS
    [ -z "${phase_name:-}" ] || echo "compose-e2e: ${phase_name}: $((now - phase_start))s"
    phase_name=$1 phase_start=$now
    [ -z "$1" ] || echo "compose-e2e: -- $1"
}

teardown() {
    local code=$?
    phase ""
    if [ "$code" != 0 ]; then
        echo "compose-e2e: FAILED (exit $code); the services' last log lines:" >&2
        compose ps >&2 || true
        compose logs --no-color --tail 40 >&2 || true
    fi
    echo "compose-e2e: -- down -v"
    compose down -v --remove-orphans > /dev/null 2>&1 || true
    rm -rf "$workdir"
    echo "compose-e2e: total $((SECONDS - start))s"
    exit "$code"
}
trap teardown EXIT

docker info > /dev/null 2>&1 || { echo "compose-e2e: no Docker Engine at ${DOCKER_HOST:-the default socket}" >&2; exit 1; }

phase "images"
pullable() { docker image inspect "$1" > /dev/null 2>&1 || docker pull -q "$1" > /dev/null 2>&1; }
if [ -z "${BASE_IMAGE:-}" ] && ! { pullable python:3.11-slim && pullable postgres:15; }; then
    echo "compose-e2e: no registry: building local base images (make images-local)"
    docker/build-base-images.sh
    export BASE_IMAGE=local/bookworm-python:3.11 POSTGRES_IMAGE=local/postgres:15
    export TORCH_SOURCE=${TORCH_SOURCE:-wheels}
    [ -f docker/certs/ca-bundle.crt ] && export FEDSPARSE_CA_BUNDLE=${FEDSPARSE_CA_BUNDLE:-docker/certs/ca-bundle.crt}
fi

phase "build"
compose build --quiet

phase "up (init, postgres, mlflow, superlink, fleet-proxy, register, supernodes)"
compose down -v --remove-orphans > /dev/null 2>&1 || true  # a stale stack of a killed run
compose up -d --quiet-pull
# up -d waited for every depends_on condition; now every long-lived container must be
# running, and healthy where it has a health check
deadline=$((SECONDS + 180))
until python3 - "$(compose ps -q)" <<'PY'
import json, subprocess, sys
ids = sys.argv[1].split()
states = json.loads(subprocess.run(["docker", "inspect", *ids], check=True,
                                   capture_output=True, text=True).stdout)
bad = []
for s in states:
    name, state = s["Name"].lstrip("/"), s["State"]
    one_shot = s["Config"]["Labels"].get("com.docker.compose.service") in ("init", "register")
    if one_shot:
        if state["Status"] == "exited" and state["ExitCode"] != 0:
            sys.exit(f"{name} failed (exit {state['ExitCode']})")
        continue
    health = state.get("Health", {}).get("Status", "healthy")
    if state["Status"] != "running" or health != "healthy":
        bad.append(f"{name}: {state['Status']}/{health}")
if bad:
    print("waiting for", ", ".join(bad))
    sys.exit(1)
PY
do
    [ $SECONDS -lt $deadline ] || { echo "compose-e2e: the stack did not become healthy in 180 s" >&2; exit 1; }
    sleep 3
done

phase "quickstart, 2 rounds, 2 SuperNodes"
compose exec -T superlink fedsparse run scenarios/quickstart.toml --deployment /deploy \
    --set data.num_clients=2 --set run.rounds=2 --quiet

phase "MLflow received the run"
compose exec -T superlink cat /deploy/secrets/mlflow.toml > "$workdir/mlflow.toml"
compose exec -T superlink cat /deploy/deployment.toml > "$workdir/deployment.toml"
compose exec -T superlink sh -c "test ! -f /deploy/ca/ca.crt || cat /deploy/ca/ca.crt" > "$workdir/ca.crt"
python3 docker/check-mlflow.py "$workdir"
phase ""
echo "compose-e2e: OK"
