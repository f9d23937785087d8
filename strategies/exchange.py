"""One exchange of messages with the clients: push, then pull the replies until all have come
or the timeout has passed.

Flower's ``Grid.send_and_receive`` does the same but sleeps 3 s between pulls on the
Deployment Engine's HTTP grid, so no reply is ever collected under a timeout below 3 s and
every phase of a round lasts a multiple of 3 s. Here the pause before each pull is a fixed
fraction of the time the exchange has waited so far (:func:`poll_pause`), so the last reply
of a phase is collected within that fraction of the phase's length after it arrived: a
10-client round of 0.2 s waits at most 20 ms more, where a pause growing geometrically to
0.5 s could wait 0.16 s more. Only replies to the messages of this exchange are returned
(matched by ``reply_to_message_id``): a late reply to an earlier round is never mistaken for
one of this round.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

FIRST_POLL_S, MAX_POLL_S, POLL_FRACTION = 0.01, 0.5, 0.1


def poll_pause(waited: float) -> float:
    """The pause before the next pull, ``waited`` seconds into an exchange: a fraction
    (``POLL_FRACTION``) of it, within ``FIRST_POLL_S`` and ``MAX_POLL_S``. A reply that comes
    ``t`` seconds into the exchange is therefore pulled by ``t + poll_pause(t)``; the pulls
    of a ``T``-second exchange number about ``ln(T / 0.1 s) / ln(1 + POLL_FRACTION)`` + 10
    up to 5 s, then 2 a second."""
    return min(MAX_POLL_S, max(FIRST_POLL_S, POLL_FRACTION * waited))


def exchange(grid: Grid, messages: Iterable[Message], timeout: float) -> list[Message]:
    """Replies to ``messages`` that arrived within ``timeout`` seconds, in arrival order."""
    messages = list(messages)
    if not messages:
        return []
    waiting = {message_id for message_id in grid.push_messages(messages) if message_id}
    started = time.monotonic()
    replies: list[Message] = []
    while waiting:
        for reply in grid.pull_messages(list(waiting)):
            if reply.metadata.reply_to_message_id in waiting:
                waiting.discard(reply.metadata.reply_to_message_id)
                replies.append(reply)
        waited = time.monotonic() - started
        if not waiting or waited >= timeout:
            break
        time.sleep(min(poll_pause(waited), timeout - waited))
    return replies
