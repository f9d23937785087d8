"""The README's screenshots, taken from real runs: the MLflow UI's page of a run (its
``eval`` charts) in headless Chromium, and a comparison's accuracy plot.

    python docs/screenshots.py RUN_FOLDERS_DIR [--report REPORT_DIR]

``RUN_FOLDERS_DIR`` is a folder where ``fedsparse run scenarios/quickstart.toml`` has run (its
``mlflow.db``), ``REPORT_DIR`` the report folder of a ``fedsparse compare``. Needs Debian's
``chromium``; drives it over the DevTools protocol with ``websockets`` (installed with
Flower's dependencies). Writes ``docs/images/mlflow-run.png`` and ``compare-accuracy.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from fedsparse.launch import free_port
from fedsparse.tracking.mlflow_run import client_for
from fedsparse.tracking.terminal import run_page

IMAGES = Path(__file__).parent / "images"


def wait_for(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


async def capture(page: str, out: Path, search: str, port: int) -> None:
    """Open ``page`` in Chromium (DevTools on ``port``), type ``search`` into the metric
    charts' search box, and save a screenshot."""
    import websockets

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json") as response:
        target = next(t for t in json.load(response) if t["type"] == "page")
    async with websockets.connect(target["webSocketDebuggerUrl"], max_size=2**26) as ws:
        ids = iter(range(1, 10**6))

        async def call(method: str, **params: object) -> dict:
            number = next(ids)
            await ws.send(json.dumps({"id": number, "method": method, "params": params}))
            while True:
                answer = json.loads(await ws.recv())
                if answer.get("id") == number:
                    return answer.get("result", {})

        await call("Emulation.setDeviceMetricsOverride", width=1500, height=1000,
                   deviceScaleFactor=1, mobile=False)
        await call("Page.navigate", url=page)
        await asyncio.sleep(12)
        typed = json.dumps(search)
        await call("Runtime.evaluate", expression=f"""
            const box = document.querySelector('input[placeholder="Search metric charts"]');
            const set = Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set;
            set.call(box, {typed});
            box.dispatchEvent(new Event('input', {{bubbles: true}}));
            for (const b of document.querySelectorAll('button[aria-label="Close"]')) b.click();
        """)
        await asyncio.sleep(8)
        shot = await call("Page.captureScreenshot", format="png")
        out.write_bytes(base64.b64decode(shot["data"]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=Path, help="where the quickstart ran (its mlflow.db)")
    parser.add_argument("--report", type=Path, help="a compare report folder")
    args = parser.parse_args()
    IMAGES.mkdir(exist_ok=True)
    uri = f"sqlite:///{(args.workdir / 'mlflow.db').resolve()}"
    client = client_for(uri)
    experiment = client.get_experiment_by_name("quickstart")
    (run, *_) = client.search_runs([experiment.experiment_id],
                                   order_by=["attributes.start_time DESC"])
    ui_port, devtools = free_port(), free_port()
    ui = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                           "--port", str(ui_port)], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
    profile = tempfile.mkdtemp()
    browser = subprocess.Popen(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                                "--hide-scrollbars", f"--remote-debugging-port={devtools}",
                                f"--user-data-dir={profile}", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(f"http://127.0.0.1:{ui_port}/health")
        wait_for(f"http://127.0.0.1:{devtools}/json/version")
        page = run_page(f"http://127.0.0.1:{ui_port}", experiment.experiment_id,
                        run.info.run_id).replace("?", "/model-metrics?")
        asyncio.run(capture(page, IMAGES / "mlflow-run.png", "eval/", devtools))
    finally:
        browser.terminate()
        ui.terminate()
        browser.wait()
        ui.wait()
        shutil.rmtree(profile, ignore_errors=True)
    if args.report:
        shutil.copy(args.report / "plots" / "accuracy_vs_round.png",
                    IMAGES / "compare-accuracy.png")
    print(f"wrote {sorted(p.name for p in IMAGES.iterdir())} in {IMAGES}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
