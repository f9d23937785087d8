"""A signed Fleet API request, as a SuperNode makes it, for the deployment tests to probe
what one node may do: ``python -m tests.fleet_probe URL CA KEY NODE_ID`` posts
``pull-messages`` for ``NODE_ID`` signed with ``KEY`` (Flower's own signing) and prints the
HTTP status."""

from __future__ import annotations

import sys
from base64 import b64encode
from pathlib import Path

import httpx
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.proto.fleet_pb2 import PullMessagesRequest
from flwr.proto.node_pb2 import Node
from flwr.supercore.date import now
from flwr.supercore.primitives.asymmetric import public_key_to_bytes, sign_message


def pull_as(url: str, ca: str, key_path: str, node_id: int) -> int:
    """The status of ``pull-messages`` for ``node_id``, signed with the key at ``key_path``."""
    key = load_ssh_private_key(Path(key_path).read_bytes(), password=None)
    timestamp = now().isoformat()
    headers = {
        "content-type": "application/protobuf",
        "flwr-public-key": b64encode(public_key_to_bytes(key.public_key())).decode(),
        "flwr-timestamp": timestamp,
        "flwr-signature": b64encode(sign_message(key, timestamp.encode())).decode(),
    }
    body = PullMessagesRequest(node=Node(node_id=node_id)).SerializeToString()
    response = httpx.post(f"{url}/v1/fleet/pull-messages", content=body, headers=headers,
                          verify=ca, timeout=20)
    return response.status_code


if __name__ == "__main__":
    print(pull_as(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
