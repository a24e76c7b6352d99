import os
import signal
import subprocess
import sys

import pytest

from gateway.police import Police, PolicedShare, session_of, unmanaged_usage, usage_by_share


class Clock:
    """The police's clock is a parameter: tests move time by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# pid -> session: 101 and 102 run in session 100 (a process the share launched and its child).
SESSIONS = {100: 100, 101: 100, 102: 100, 200: 200, 201: 200, 999: 999}
A = PolicedShare("s-a", "alice", {0: 2048}, frozenset({100}))
B = PolicedShare("s-b", "bob", {0: 4096, 1: 4096}, frozenset({200}))


def review(police: Police, usage, shares=(A, B)):
    return police.review(usage, list(shares), SESSIONS.get)


def test_a_share_under_its_limit_gets_no_verdict():
    police = Police("stop", 5, Clock())
    assert review(police, {100: {0: 1000}, 101: {0: 1048}}) == []


def test_over_the_limit_warns_once_then_stops_after_the_grace():
    clock = Clock()
    police = Police("stop", 5, clock)
    usage = {100: {0: 2000}, 101: {0: 1000}}  # 3000 MiB together, over 2048
    [warn] = review(police, usage)
    assert (warn.action, warn.share_id, warn.owner, warn.gpu_index) == ("warn", "s-a", "alice", 0)
    assert (warn.used_mib, warn.limit_mib, warn.pids) == (3000, 2048, (100, 101))
    assert warn.message == (
        "Share s-a uses 3000 MiB on GPU 0, more than its 2048 MiB; "
        "its processes will be stopped in 5 s unless they free memory."
    )
    clock.now += 4.9
    assert review(police, usage) == []  # not repeated every sample
    clock.now += 0.1
    [stop] = review(police, usage)
    assert stop.action == "stop" and stop.pids == (100, 101)
    assert "being stopped" in stop.message
    clock.now += 10
    assert review(police, usage) == []  # stopped once


def test_warn_mode_never_stops():
    clock = Clock()
    police = Police("warn", 5, clock)
    usage = {102: {0: 3000}}
    [warn] = review(police, usage)
    assert warn.action == "warn" and "only warns" in warn.message
    for _ in range(5):
        clock.now += 60
        assert review(police, usage) == []


def test_going_back_under_the_limit_resets_the_share():
    clock = Clock()
    police = Police("stop", 5, clock)
    assert [v.action for v in review(police, {100: {0: 3000}})] == ["warn"]
    clock.now += 3
    assert review(police, {100: {0: 1000}}) == []  # freed memory in time
    clock.now += 3
    assert [v.action for v in review(police, {100: {0: 3000}})] == ["warn"]  # a new episode
    clock.now += 3
    assert review(police, {100: {0: 3000}}) == []  # its grace started again


def test_zero_grace_stops_at_once():
    police = Police("stop", 0, Clock())
    assert [v.action for v in review(police, {100: {0: 3000}})] == ["warn", "stop"]


def test_two_shares_on_one_gpu_are_judged_separately():
    police = Police("stop", 5, Clock())
    # 5000 MiB on GPU 0 in all: alice's 3000 is over her 2048, bob's 2000 is within his 4096.
    verdicts = review(police, {100: {0: 3000}, 200: {0: 1500}, 201: {0: 500, 1: 100}})
    assert [(v.share_id, v.gpu_index, v.used_mib) for v in verdicts] == [("s-a", 0, 3000)]


def test_each_gpu_of_a_share_has_its_own_limit():
    police = Police("stop", 5, Clock())
    verdicts = review(police, {200: {0: 4000, 1: 5000}})
    assert [(v.gpu_index, v.used_mib, v.limit_mib) for v in verdicts] == [(1, 5000, 4096)]


def test_memory_on_a_gpu_the_share_was_not_granted_is_over():
    police = Police("stop", 5, Clock())
    [warn] = review(police, {101: {1: 10}})
    assert (warn.gpu_index, warn.limit_mib) == (1, 0)
    assert "which it was not granted" in warn.message


def test_a_share_that_ends_is_forgotten():
    clock = Clock()
    police = Police("stop", 5, clock)
    usage = {100: {0: 3000}}
    review(police, usage)
    clock.now += 1
    assert review(police, usage, shares=[B]) == []  # s-a released; its pid is no share's now
    clock.now += 10
    # A new share reusing the id starts with a warning, not a stop.
    assert [v.action for v in review(police, usage)] == ["warn"]


def test_usage_is_summed_per_share_and_pids_of_no_share_are_unmanaged():
    usage = {100: {0: 1000}, 101: {0: 24}, 201: {1: 512}, 999: {0: 700}, 31337: {1: 5}}
    shares = [A, B]
    assert usage_by_share(usage, shares, SESSIONS.get) == {"s-a": {0: 1024}, "s-b": {1: 512}}
    assert unmanaged_usage(usage, shares, SESSIONS.get) == {999: {0: 700}, 31337: {1: 5}}
    police = Police("warn", 5, Clock())
    assert police.usage_by_share(usage, shares, SESSIONS.get)["s-a"] == {0: 1024}
    assert set(police.unmanaged(usage, shares, SESSIONS.get)) == {999, 31337}


def test_a_launched_process_that_left_its_session_still_counts():
    usage = {100: {0: 3000}}
    assert usage_by_share(usage, [A], lambda pid: 12345) == {"s-a": {0: 3000}}


def test_real_sessions_attribute_a_launched_process_and_its_children():
    # A real process started in its own session, as the gateway launches them, with a child.
    leader = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess; p = subprocess.Popen(['sleep', '30']); print(p.pid, flush=True);"
            " p.wait()",
        ],
        start_new_session=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        child = int(leader.stdout.readline())
        share = PolicedShare("s-real", "carol", {0: 100}, frozenset({leader.pid}))
        usage = {leader.pid: {0: 60}, child: {0: 60}, os.getpid(): {0: 1}}
        assert usage_by_share(usage, [share]) == {"s-real": {0: 120}}
        assert unmanaged_usage(usage, [share]) == {os.getpid(): {0: 1}}
        assert session_of(child) == leader.pid
    finally:
        os.killpg(leader.pid, signal.SIGKILL)
        leader.wait()
        leader.stdout.close()


def test_session_of_a_dead_pid_is_none():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert session_of(proc.pid) is None


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="'warn' or 'stop'"):
        Police("kill", 5)  # type: ignore[arg-type]
