"""The exchange's pull schedule, on a fake grid and a fake clock: when a reply is collected
after it arrives, how often the grid is asked, what the timeout leaves out."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from strategies import exchange as module
from strategies.exchange import FIRST_POLL_S, MAX_POLL_S, POLL_FRACTION, exchange, poll_pause


class Clock:
    """``time.monotonic`` and ``time.sleep`` of a clock that moves only when slept on."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.now += seconds


class FakeGrid:
    """A grid whose reply to message ``i`` can be pulled from ``arrivals[i]`` seconds on."""

    def __init__(self, clock: Clock, arrivals: list[float]) -> None:
        self.clock = clock
        self.arrivals = arrivals
        self.pulls = 0

    def push_messages(self, messages: list[object]) -> list[str]:
        return [str(i) for i in range(len(messages))]

    def pull_messages(self, ids: list[str]) -> list[SimpleNamespace]:
        self.pulls += 1
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i))
                for i in ids if self.arrivals[int(i)] <= self.clock.now]


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(module, "time", fake)
    return fake


@pytest.mark.parametrize("last", [0.0, 0.004, 0.05, 0.27, 0.6, 1.0, 4.2, 7.3, 30.0, 300.0])
def test_the_last_reply_is_collected_within_a_tenth_of_its_wait(clock: Clock, last: float):
    grid = FakeGrid(clock, [last / 3, last])
    replies = exchange(grid, ["a", "b"], timeout=3600)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["0", "1"]
    assert last <= clock.now <= last + max(FIRST_POLL_S, min(MAX_POLL_S, POLL_FRACTION * last))


def test_a_0_27_s_round_is_not_held_up_by_a_long_pause(clock: Clock):
    """The geometric schedule (0.02 s growing x1.5 to 0.5 s) pulled at 0.26 s, then at 0.42 s."""
    exchange(FakeGrid(clock, [0.27]), ["a"], timeout=60)
    assert clock.now <= 0.27 + 0.027


@pytest.mark.parametrize(("last", "most"), [(0.2, 20), (5.0, 55), (60.0, 170)])
def test_the_grid_is_not_asked_much_more_than_the_schedule_says(clock: Clock, last: float,
                                                                most: int):
    grid = FakeGrid(clock, [last])
    exchange(grid, ["a"], timeout=3600)
    assert grid.pulls <= most


def test_the_timeout_ends_the_exchange_without_the_late_reply(clock: Clock):
    grid = FakeGrid(clock, [0.5, 12.0])
    replies = exchange(grid, ["a", "b"], timeout=10.0)
    assert [r.metadata.reply_to_message_id for r in replies] == ["0"]
    assert clock.now == pytest.approx(10.0)


def test_the_pause_is_a_fraction_of_the_wait_within_bounds():
    assert poll_pause(0.0) == FIRST_POLL_S
    assert poll_pause(2.0) == pytest.approx(POLL_FRACTION * 2.0)
    assert poll_pause(1e6) == MAX_POLL_S
