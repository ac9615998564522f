"""tests/waiting.py: the deadline-bounded wait every test uses for asynchronous state."""

from __future__ import annotations

import itertools

import pytest
import trio
import trio.testing

from tests.waiting import await_until, wait_until


def test_returns_the_first_value_that_satisfies_the_condition() -> None:
    counter = itertools.count()
    assert wait_until(lambda: next(counter), lambda n: n >= 3, what="three", interval=0) == 3


def test_without_a_condition_waits_for_a_truthy_value() -> None:
    values = iter([[], [], ["denial"]])
    assert wait_until(lambda: next(values), what="a denial", interval=0) == ["denial"]


def test_fails_naming_what_was_awaited_and_the_last_value() -> None:
    with pytest.raises(AssertionError, match=r"not within 0.05s .*: a denial\n.*\[\]"):
        wait_until(list, what="a denial", timeout=0.05, interval=0.01)


def test_looks_once_even_with_no_time_left() -> None:
    assert wait_until(lambda: 1, what="one", timeout=0) == 1


def test_errors_end_the_wait_unless_listed() -> None:
    def boom() -> int:
        raise FileNotFoundError("agent.log")

    with pytest.raises(FileNotFoundError):
        wait_until(boom, what="the log", timeout=5)
    with pytest.raises(AssertionError, match="FileNotFoundError"):
        wait_until(boom, what="the log", timeout=0.05, interval=0.01, retry_on=(OSError,))


def test_trio_variant_runs_on_trios_clock() -> None:
    async def main() -> None:
        start = trio.current_time()
        ticks = itertools.count()
        assert await await_until(lambda: next(ticks), lambda n: n == 5, what="five") == 5

        async def never() -> bool:
            return False

        with pytest.raises(AssertionError, match="never: nothing"):
            await await_until(never, what="never: nothing", timeout=60, interval=1)
        assert trio.current_time() - start >= 60  # the autojump clock moved, no real wait

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
