"""The request deadline and calls bounded as a whole."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from app import deadline


def test_outside_a_request_a_call_keeps_its_own_timeout() -> None:
    assert deadline.expires_at() is None
    assert deadline.bound(7.0) == 7.0


def test_inside_a_request_a_call_gets_at_most_the_time_left() -> None:
    with deadline.until(time.monotonic() + 2.0):
        assert 1.9 < deadline.bound(7.0) <= 2.0
        assert deadline.bound(0.5) == 0.5
    assert deadline.expires_at() is None


def test_no_call_starts_once_the_deadline_has_passed() -> None:
    started = []
    with deadline.until(time.monotonic() - 0.1), pytest.raises(deadline.DeadlineExceeded):
        deadline.call_within(5.0, lambda: started.append(1))
    assert started == []


def test_a_bounded_call_returns_its_result_or_its_own_error() -> None:
    assert deadline.call_within(1.0, lambda: 42) == 42
    with pytest.raises(ZeroDivisionError):
        deadline.call_within(1.0, lambda: 1 / 0)


def test_a_call_past_its_bound_is_abandoned_and_cut() -> None:
    release = threading.Event()
    cut = []

    def stuck() -> None:
        release.wait(10)

    started = time.monotonic()
    with deadline.until(time.monotonic() + 0.3), pytest.raises(deadline.DeadlineExceeded):
        deadline.call_within(5.0, stuck, on_abandon=lambda: (cut.append(1), release.set()))
    assert time.monotonic() - started < 0.6
    assert cut == [1]


def test_while_too_many_calls_are_stuck_new_ones_fail_at_once() -> None:
    release = threading.Event()
    try:
        # Exactly the limit is let through, each given up on at its bound.
        for _ in range(deadline.MAX_RUNNING_CALLS):
            with pytest.raises(deadline.DeadlineExceeded, match="no answer within"):
                deadline.call_within(0.01, lambda: release.wait(10))
        started = time.monotonic()
        with pytest.raises(deadline.DeadlineExceeded, match="still waiting"):
            deadline.call_within(5.0, lambda: 1)
        assert time.monotonic() - started < 0.1
    finally:
        release.set()
    # Once they end, calls run again, up to the whole limit again.
    wait_until_calls_run_again()
    again = threading.Event()
    try:
        for _ in range(deadline.MAX_RUNNING_CALLS):
            with pytest.raises(deadline.DeadlineExceeded, match="no answer within"):
                deadline.call_within(0.01, lambda: again.wait(10))
    finally:
        again.set()
    wait_until_calls_run_again()


def wait_until_calls_run_again() -> None:
    """Return once released stuck calls have ended: the limit is the process's, not the test's."""
    give_up_at = time.monotonic() + 5
    while time.monotonic() < give_up_at:
        try:
            assert deadline.call_within(1.0, lambda: 1) == 1
            return
        except deadline.DeadlineExceeded:
            time.sleep(0.05)
    pytest.fail("bounded calls never ran again")


def test_calls_before_the_database_leave_it_the_reserve() -> None:
    deadline.start(10.0)
    try:
        assert 9.9 < deadline.bound(100.0) <= 10.0
        assert 7.9 < deadline.bound(100.0, leave_reserve=True) <= 8.0
        with (
            deadline.until(time.monotonic() + 1.0, reserve=1.0),
            pytest.raises(deadline.DeadlineExceeded),
        ):
            deadline.call_within(5.0, lambda: 1)
    finally:
        deadline.clear()


def test_undoing_a_half_done_change_gets_a_fresh_allowance_the_size_of_the_reserve() -> None:
    with deadline.until(time.monotonic() - 1.0, reserve=2.0):
        with pytest.raises(deadline.DeadlineExceeded):
            deadline.bound(5.0)
        with deadline.grace():
            assert 1.9 < deadline.bound(5.0) <= 2.0
    with deadline.grace():
        assert deadline.bound(5.0) == 5.0


def test_the_deadline_a_request_runs_under_can_be_carried_into_its_streamed_answer() -> None:
    expires = time.monotonic() + 3.0
    with deadline.until(expires):
        assert deadline.expires_at() == expires
    assert deadline.expires_at() is None


def test_a_call_stuck_on_a_frozen_peer_does_not_keep_the_process_from_exiting() -> None:
    # gunicorn's SIGTERM ends a worker at interpreter exit, which joins every non-daemon thread.
    program = (
        "import threading\n"
        "from app import deadline\n"
        "frozen = threading.Event()\n"
        "try:\n"
        "    deadline.call_within(0.1, lambda: frozen.wait(30))\n"
        "except deadline.DeadlineExceeded:\n"
        "    pass\n"
    )
    started = time.monotonic()
    finished = subprocess.run([sys.executable, "-c", program], timeout=20, check=False)
    assert finished.returncode == 0
    assert time.monotonic() - started < 10


def test_a_forked_child_starts_with_no_calls_counted() -> None:
    release = threading.Event()
    try:
        for _ in range(deadline.MAX_RUNNING_CALLS):
            with pytest.raises(deadline.DeadlineExceeded):
                deadline.call_within(0.01, lambda: release.wait(10))
        child = os.fork()
        if child == 0:
            # The parent's stuck calls are not the child's: it may call at once.
            try:
                os._exit(0 if deadline.call_within(1.0, lambda: 7) == 7 else 1)
            except BaseException:
                os._exit(1)
        _, status = os.waitpid(child, 0)
    finally:
        release.set()
    assert os.waitstatus_to_exitcode(status) == 0
    wait_until_calls_run_again()


def test_a_bounded_call_runs_on_a_named_daemon_thread() -> None:
    def where() -> tuple[bool, str]:
        current = threading.current_thread()
        return current.daemon, current.name

    assert deadline.call_within(1.0, where) == (True, "bounded-call")
