"""One exchange of messages with the clients: push, then pull the replies until all have come
or the timeout has passed.

Flower's ``Grid.send_and_receive`` does the same but sleeps 3 s between pulls on the
Deployment Engine's HTTP grid, so no reply is ever collected under a timeout below 3 s and
every phase of a round lasts a multiple of 3 s. Here the pull interval starts short and
grows to :data:`MAX_POLL_S`. Only replies to the messages of this exchange are returned
(matched by ``reply_to_message_id``): a late reply to an earlier round is never mistaken for
one of this round.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

FIRST_POLL_S, MAX_POLL_S, POLL_GROWTH = 0.02, 0.5, 1.5


def exchange(grid: Grid, messages: Iterable[Message], timeout: float) -> list[Message]:
    """Replies to ``messages`` that arrived within ``timeout`` seconds, in arrival order."""
    messages = list(messages)
    if not messages:
        return []
    waiting = {message_id for message_id in grid.push_messages(messages) if message_id}
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    pause = FIRST_POLL_S
    while waiting:
        for reply in grid.pull_messages(list(waiting)):
            if reply.metadata.reply_to_message_id in waiting:
                waiting.discard(reply.metadata.reply_to_message_id)
                replies.append(reply)
        left = deadline - time.monotonic()
        if not waiting or left <= 0:
            break
        time.sleep(min(pause, left))
        pause = min(pause * POLL_GROWTH, MAX_POLL_S)
    return replies
