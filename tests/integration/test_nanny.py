"""The nanny with real processes and real Unix sockets: what a gateway (and so a user) relies on.

Each test launches a real nanny through gateway.nanny.launcher and talks to it with NannyLink, the
same client the gateway uses.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gateway.nanny import MAX_UNACKED, READ_CHUNK
from gateway.nanny.launcher import Launched, LaunchError, kill_orphan, launch, read_status
from gateway.nanny.link import NannyGone, NannyLink
from tests.support.waiting import wait_for

PY = sys.executable
COUNTER = "import time\nfor i in range(100000):\n    print(i, flush=True)\n    time.sleep(0.05)"


@pytest.fixture
def run_dir(tmp_path: Path):
    path = tmp_path / "run"
    yield path
    # Whatever a test left running (a failing test included) goes, nanny and process group.
    for status_file in path.glob("*.json"):
        status = read_status(status_file)
        if status:
            kill_orphan(status)


def start(run_dir: Path, proc_id: str, code: str, **kw: Any) -> Launched:
    return launch([PY, "-c", textwrap.dedent(code)], dict(os.environ), None, run_dir, proc_id, **kw)


def run(coro: Coroutine[Any, Any, Any], timeout: float = 15) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie nobody reaped (PID 1 here may not) counts as dead."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@dataclass
class Output:
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    seqs: list[int] = field(default_factory=list)
    code: int | None = None

    def add(self, header: dict[str, Any], payload: bytes) -> None:
        self.seqs.append(header["seq"])
        if header["type"] == "out":
            (self.stdout if header["stream"] == 1 else self.stderr).extend(payload)
        elif header["type"] == "exit":
            self.code = header["code"]


async def attach(launched: Launched, out_from: int = 1) -> tuple[NannyLink, dict[str, Any]]:
    link = await NannyLink.connect(launched.socket_path)
    await link.send({"type": "attach", "out_from": out_from})
    header, _ = await link.receive()
    assert header["type"] == "attached"
    return link, header


async def read_until(link: NannyLink, out: Output, done: Any, ack_every: int = 1 << 20) -> None:
    """Receive into ``out`` until ``done(out)``, acking like a client does; acks the exit."""
    unacked = 0
    while not done(out):
        header, payload = await link.receive()
        out.add(header, payload)
        unacked += len(payload)
        if header["type"] == "exit" or unacked >= ack_every:
            await link.send({"type": "ack", "seq": header["seq"]})
            unacked = 0


def exited(out: Output) -> bool:
    return out.code is not None


def test_output_arrives_on_its_streams_with_the_exit_code(run_dir: Path) -> None:
    launched = start(
        run_dir,
        "p-out",
        "print('hi'); import sys; print('err', file=sys.stderr); sys.exit(3)",
    )

    async def go() -> Output:
        link, attached = await attach(launched)
        out = Output()
        await read_until(link, out, exited)
        await link.close()
        return out

    out = run(go())
    assert (bytes(out.stdout), bytes(out.stderr), out.code) == (b"hi\n", b"err\n", 3)
    assert out.seqs == list(range(1, len(out.seqs) + 1))  # numbered from 1, exit is the last


def test_status_file_tracks_the_process_and_keeps_its_exit_code(run_dir: Path) -> None:
    launched = start(run_dir, "p-status", "import sys; sys.stdin.read(); sys.exit(7)")

    async def go() -> tuple[dict[str, Any], dict[str, Any] | None, Output]:
        link, attached = await attach(launched)
        running = read_status(launched.status_path)
        await link.send({"type": "stdin_close", "seq": 1})
        out = Output()
        await read_until(link, out, exited)
        await link.close()
        return attached, running, out

    attached, running, out = run(go())
    child = attached["child_pid"]
    assert running is not None
    assert running["exit_code"] is None
    assert (running["nanny_pid"], running["child_pid"], running["pgid"]) == (
        launched.nanny_pid,
        child,
        child,
    )
    assert running["argv"][0] == PY and abs(running["started_at"] - time.time()) < 30
    assert out.code == 7
    status = read_status(launched.status_path)
    assert status is not None and status["exit_code"] == 7
    # Acked exit: the nanny leaves and takes its socket with it; the status file stays.
    assert wait_for(
        lambda: not alive(launched.nanny_pid) and not launched.socket_path.exists(), 5, step=0.02
    )


def test_child_gets_the_given_environment_cwd_and_an_ordinary_python(
    run_dir: Path, tmp_path: Path
) -> None:
    # A user's PYTHONPATH shadowing a stdlib module the nanny uses must reach the child but
    # must not break the nanny, whose interpreter runs isolated.
    hijack = tmp_path / "hijack"
    hijack.mkdir()
    (hijack / "selectors.py").write_text("raise SystemExit('nanny hijacked')\n")
    env = {**os.environ, "FOO": "bar", "PYTHONPATH": str(hijack)}
    code = (
        "import os, sys; print(os.environ['FOO'], os.environ['PYTHONPATH'], os.getcwd(), "
        "sys.flags.isolated, sys.flags.no_site, sys.path[1] if len(sys.path) > 1 else '')"
    )
    launched = launch([PY, "-c", code], env, str(tmp_path), run_dir, "p-env")

    async def go() -> Output:
        link, _ = await attach(launched)
        out = Output()
        await read_until(link, out, exited)
        await link.close()
        return out

    out = run(go())
    assert out.code == 0, out.stderr
    assert out.stdout.decode().split() == ["bar", str(hijack), str(tmp_path), "0", "0", str(hijack)]


def test_kill_orphan_ends_an_unreachable_nanny_and_its_process_group(run_dir: Path) -> None:
    launched = start(run_dir, "p-orphaned", COUNTER)
    status = read_status(launched.status_path)
    assert status is not None and alive(status["child_pid"])
    kill_orphan(status)
    assert wait_for(
        lambda: not alive(status["child_pid"]) and not alive(launched.nanny_pid), 5, step=0.02
    )
    kill_orphan(status)  # twice is harmless: the gateway may not know it already did


def test_child_runs_in_its_own_session(run_dir: Path) -> None:
    launched = start(run_dir, "p-session", "import time; print('up', flush=True); time.sleep(30)")

    async def go() -> int:
        link, attached = await attach(launched)
        await link.close()
        return attached["child_pid"]

    child = run(go())
    # The gateway maps GPU processes to shares by session id and signals the whole group.
    assert os.getsid(child) == child and os.getpgid(child) == child
    assert os.getsid(launched.nanny_pid) != os.getsid(0)


def test_stdin_round_trip_through_cat_keeps_5_mib_intact(run_dir: Path) -> None:
    launched = launch(["cat"], dict(os.environ), None, run_dir, "p-cat")
    data = os.urandom(5 * 1024 * 1024)
    chunks = [data[i : i + 64 * 1024] for i in range(0, len(data), 64 * 1024)]

    async def go() -> Output:
        link, _ = await attach(launched)

        async def feed() -> None:
            for seq, chunk in enumerate(chunks, 1):
                await link.send({"type": "stdin", "seq": seq}, chunk)
            for seq in (1, 2, len(chunks)):  # resent after a reconnect: must not repeat
                await link.send({"type": "stdin", "seq": seq}, chunks[seq - 1])
            await link.send({"type": "stdin_close", "seq": len(chunks) + 1})

        out = Output()
        await asyncio.gather(feed(), read_until(link, out, exited, ack_every=256 * 1024))
        await link.close()
        return out

    out = run(go())
    assert out.code == 0
    assert len(out.stdout) == len(data) and bytes(out.stdout) == data


def test_unacked_output_pauses_the_child_and_nothing_is_lost(run_dir: Path) -> None:
    total = 12 * 1024 * 1024
    launched = start(
        run_dir,
        "p-flood",
        f"""
        import sys
        for _ in range({total // 65536}):
            sys.stdout.buffer.write(b"x" * 65536)
        sys.stdout.flush()
        print("done", file=sys.stderr)
        """,
    )

    async def go() -> tuple[int, Output]:
        link, _ = await attach(launched)
        out = Output()
        # A client that stops acking: output stops once 8 MiB is waiting for an ack.
        while True:
            try:
                header, payload = await asyncio.wait_for(link.receive(), 0.5)
            except TimeoutError:
                break
            out.add(header, payload)
        stalled_at = len(out.stdout)
        assert out.code is None and not out.stderr
        await link.send({"type": "ack", "seq": out.seqs[-1]})
        await read_until(link, out, exited)
        await link.close()
        return stalled_at, out

    stalled_at, out = run(go())
    assert MAX_UNACKED <= stalled_at <= MAX_UNACKED + READ_CHUNK
    assert out.code == 0 and bytes(out.stderr) == b"done\n"
    assert len(out.stdout) == total and out.stdout.count(b"x") == total


def test_sigint_reaches_the_child_even_from_a_gateway_that_ignores_it(run_dir: Path) -> None:
    # A gateway started in the background inherits SIGINT ignored; its children must not.
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        launched = start(
            run_dir,
            "p-sigint",
            """
            import sys, time
            try:  # ready is printed inside the try, so no Ctrl-C can land outside it
                print("ready", flush=True)
                time.sleep(30)
            except KeyboardInterrupt:
                print("interrupted", flush=True)
                sys.exit(130)
            """,
        )
    finally:
        signal.signal(signal.SIGINT, old)

    async def go() -> Output:
        link, _ = await attach(launched)
        out = Output()
        await read_until(link, out, lambda o: b"ready\n" in o.stdout)
        await link.send({"type": "signal", "signum": int(signal.SIGINT)})
        await read_until(link, out, exited)
        await link.close()
        return out

    out = run(go())
    assert bytes(out.stdout) == b"ready\ninterrupted\n"
    assert out.code == 130


def test_terminate_kills_a_child_that_ignores_sigterm_after_the_grace(run_dir: Path) -> None:
    launched = start(
        run_dir,
        "p-stubborn",
        """
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready", flush=True)
        time.sleep(30)
        """,
    )

    async def go() -> tuple[float, Output]:
        link, _ = await attach(launched)
        out = Output()
        await read_until(link, out, lambda o: b"ready\n" in o.stdout)
        t0 = time.monotonic()
        await link.send({"type": "terminate", "grace_s": 0.5})
        await read_until(link, out, exited)
        await link.close()
        return time.monotonic() - t0, out

    elapsed, out = run(go())
    assert out.code == -signal.SIGKILL
    assert 0.45 <= elapsed < 3


def test_terminate_leaves_no_grandchildren_behind(run_dir: Path) -> None:
    grandchild = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('grandchild ready', flush=True); time.sleep(30)"
    )
    launched = start(
        run_dir,
        "p-family",
        f"""
        import subprocess, sys, time
        p = subprocess.Popen([sys.executable, "-c", {grandchild!r}])
        print("pid", p.pid, flush=True)
        time.sleep(30)
        """,
    )

    async def go() -> tuple[float, Output]:
        link, _ = await attach(launched)
        out = Output()
        await read_until(link, out, lambda o: b"grandchild ready" in o.stdout)
        t0 = time.monotonic()
        await link.send({"type": "terminate", "grace_s": 10})
        await read_until(link, out, exited)
        await link.close()
        return time.monotonic() - t0, out

    elapsed, out = run(go())
    grandchild_pid = int(out.stdout.split(b"pid ")[1].split()[0])
    # The child died of SIGTERM at once; the grandchild that ignored it went with the group
    # right then, not after the 10 s grace.
    assert out.code == -signal.SIGTERM
    assert elapsed < 3
    assert wait_for(lambda: not alive(grandchild_pid), 2, step=0.02)


def test_restarted_gateway_adopts_the_process_without_gap_or_duplicate(run_dir: Path) -> None:
    launched = start(run_dir, "p-counter", COUNTER)

    async def go() -> tuple[Output, Output, dict[str, Any], dict[str, Any] | None]:
        first, _ = await attach(launched)
        before = Output()
        await read_until(first, before, lambda o: o.stdout.count(b"\n") >= 5, ack_every=1 << 30)
        await first.close()  # the gateway dies without acking anything
        await asyncio.sleep(0.3)  # the process keeps printing while nobody listens

        second, attached = await attach(launched, out_from=before.seqs[-1] + 1)
        after = Output()
        await read_until(second, after, lambda o: o.stdout.count(b"\n") >= 12, ack_every=1 << 30)
        status = read_status(launched.status_path)

        # Yet another gateway connects: it replaces this one, which is closed.
        third, _ = await attach(launched, out_from=1)
        with pytest.raises(NannyGone):
            while True:
                await second.receive()
        replay = Output()
        await read_until(third, replay, lambda o: len(o.seqs) >= 3, ack_every=1 << 30)
        for link in (second, third):
            await link.close()
        return before, after, attached, status | {"replay_first": replay.seqs[0]}

    before, after, attached, status = run(go())
    assert after.seqs[0] == before.seqs[-1] + 1
    assert after.seqs == list(range(after.seqs[0], after.seqs[0] + len(after.seqs)))
    lines = (before.stdout + after.stdout).decode().split("\n")[:-1]  # whole lines only
    assert [int(n) for n in lines] == list(range(len(lines)))  # no gap, no duplicate
    assert len(lines) >= 17
    assert attached["running"] is True and attached["exit_code"] is None
    assert status is not None and status["exit_code"] is None
    assert status["child_pid"] == attached["child_pid"]
    assert status["replay_first"] == 1  # nothing was acked, so all of it is still there


def test_nanny_survives_sigkill_of_the_process_that_launched_it(run_dir: Path) -> None:
    child = "import time\nfor i in range(5):\n    print(i, flush=True)\n    time.sleep(0.05)"
    script = textwrap.dedent(
        f"""
        import os, sys, time
        from pathlib import Path
        from gateway.nanny.launcher import launch
        launched = launch([sys.executable, "-c", {child!r}], dict(os.environ), None,
                          Path({str(run_dir)!r}), "p-orphan")
        print(launched.nanny_pid, launched.socket_path, flush=True)
        time.sleep(60)
        """
    )
    gateway = subprocess.Popen(
        [PY, "-c", script], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert gateway.stdout is not None
        pid, socket_path = gateway.stdout.readline().split()
        nanny_pid = int(pid)
        os.killpg(gateway.pid, signal.SIGKILL)  # the gateway and its whole group die hard
        gateway.wait(5)
    finally:
        if gateway.poll() is None:
            os.killpg(gateway.pid, signal.SIGKILL)
            gateway.wait(5)

    assert alive(nanny_pid)
    launched = Launched(nanny_pid, Path(socket_path), run_dir / "p-orphan.json")

    async def go() -> Output:
        link, _ = await attach(launched)
        out = Output()
        await read_until(link, out, exited)
        await link.close()
        return out

    out = run(go())
    assert bytes(out.stdout) == b"0\n1\n2\n3\n4\n" and out.code == 0


def test_missing_executable_is_a_clear_error_and_leaves_nothing_behind(run_dir: Path) -> None:
    with pytest.raises(LaunchError) as info:
        launch(["no-such-program-xyz"], dict(os.environ), None, run_dir, "p-missing")
    assert str(info.value) == "cannot run 'no-such-program-xyz': No such file or directory"
    assert not list(run_dir.glob("*.sock")) and not list(run_dir.glob("*.json"))

    def no_nanny() -> bool:
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and alive(int(entry.name)):
                try:
                    if b"p-missing" in (entry / "cmdline").read_bytes():
                        return False
                except OSError:
                    pass
        return True

    assert wait_for(no_nanny, 2, step=0.02)


def test_nanny_leaves_after_linger_when_nobody_acks(run_dir: Path) -> None:
    launched = launch(["true"], dict(os.environ), None, run_dir, "p-linger", linger_s=0.5)
    assert wait_for(lambda: not alive(launched.nanny_pid), 5, step=0.02)
    assert not launched.socket_path.exists()
    status = read_status(launched.status_path)
    assert status is not None and status["exit_code"] == 0


def test_malformed_frame_drops_only_that_connection(run_dir: Path) -> None:
    launched = launch(["cat"], dict(os.environ), None, run_dir, "p-garbage")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
        raw.settimeout(5)
        raw.connect(str(launched.socket_path))
        raw.sendall(b"\x00\x00\x00\x05\x00\x00\x00\x00nope!")
        assert raw.recv(100) == b""  # the nanny hung up on the nonsense

    async def go() -> Output:
        link, attached = await attach(launched)
        await link.send({"type": "stdin", "seq": 1}, b"still here\n")
        await link.send({"type": "stdin_close", "seq": 2})
        out = Output()
        await read_until(link, out, exited)
        await link.close()
        return out

    out = run(go())
    assert bytes(out.stdout) == b"still here\n" and out.code == 0
