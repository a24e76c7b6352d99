"""`bitfusion run` against a real gateway: output, exit codes, stdin, signals, the share's env."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest


def test_output_and_exit_code_come_back(gateway):
    r = gateway.bf(
        "run",
        "-n",
        "1",
        "-m",
        "2048",
        "--",
        sys.executable,
        "-c",
        "import sys; print('to stdout'); print('to stderr', file=sys.stderr); sys.exit(7)",
    )
    assert r.returncode == 7, r.stderr
    assert r.stdout == "to stdout\n"
    assert "to stderr" in r.stderr


def test_the_command_sees_its_share(gateway):
    r = gateway.bf(
        "run",
        "-n",
        "2",
        "-m",
        "4096",
        "--",
        sys.executable,
        "-c",
        "import os; print(os.environ['CUDA_VISIBLE_DEVICES']);"
        "print(os.environ['BITFUSION_MEMORY_MIB']); print(os.environ['BITFUSION_SERVER']);"
        "print(os.environ['CUPY_GPU_MEMORY_LIMIT'])",
    )
    assert r.returncode == 0, r.stderr
    uuids, mib, server, cupy = r.stdout.split()
    assert len(uuids.split(",")) == 2 and all(u.startswith("GPU-") for u in uuids.split(","))
    assert mib == "4096,4096"
    assert server == "gpuhost"
    assert cupy == str(4096 * 1024 * 1024)


def test_stdin_streams_to_the_command(gateway):
    data = "".join(f"line {i}\n" for i in range(20000))
    r = gateway.bf("run", "-m", "1024", "--", "sort", "-r", input=data)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == sorted(data.splitlines(), reverse=True)


def test_a_command_that_is_not_reading_holds_back_the_clients_stdin(gateway):
    # `producer | bitfusion run -- consumer`: while the consumer is busy, the client reads no
    # more than a window ahead (it keeps what it sent until the nanny has written it), so a
    # big pipe does not pile up in the client's memory; then every byte arrives.
    total, mib = 64 * 1024 * 1024, 1024 * 1024
    waits = "import sys, time\nprint('ready', flush=True)\ntime.sleep(3)\n"
    reads = "print(len(sys.stdin.buffer.read()))\n"
    client = gateway.bf_background(
        "run", "-m", "1024", "--", sys.executable, "-c", waits + reads, stdin=subprocess.PIPE
    )
    written = [0]

    def produce():
        chunk = b"x" * (64 * 1024)
        with contextlib.suppress(BrokenPipeError):
            while written[0] < total:
                written[0] += os.write(client.stdin.fileno(), chunk)
            client.stdin.close()

    producer = threading.Thread(target=produce, daemon=True)
    try:
        assert client.stdout.readline() == "ready\n"
        producer.start()
        time.sleep(1.5)  # the consumer sleeps on
        taken = written[0]
        producer.join(60)
        out = client.stdout.read()  # (communicate() would flush the stdin closed above)
        assert client.wait(60) == 0, client.stderr.read()
        assert int(out) == total  # all of it, once the consumer reads
        assert taken < 16 * mib, f"the client took {taken / mib:.0f} MiB ahead of the command"
    finally:
        if client.poll() is None:
            client.kill()


def test_the_share_is_freed_when_the_command_ends(gateway):
    assert gateway.bf("run", "-m", "1024", "--", "true").returncode == 0
    r = gateway.bf("list_shares", "--json")
    assert '"shares": []' in r.stdout


def test_killed_by_signal_gives_128_plus_n(gateway):
    r = gateway.bf("run", "-m", "512", "--", "sh", "-c", "kill -TERM $$")
    assert r.returncode == 128 + signal.SIGTERM


def _start_run(gateway, *cmd):
    return gateway.bf_background("run", "-m", "512", "--", *cmd)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signals_are_forwarded_to_the_remote_command(gateway, sig):
    script = (
        # os.write, not print: the signal may come while `print('ready')` still holds stdout.
        "import os, signal, sys, time\n"
        "def bye(n, f): os.write(1, b'got %d\\n' % n); sys.exit(42)\n"
        "signal.signal(signal.SIGINT, bye); signal.signal(signal.SIGTERM, bye)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    client = _start_run(gateway, sys.executable, "-c", script)
    assert client.stdout.readline() == "ready\n"
    client.send_signal(sig)
    out, err = client.communicate(timeout=20)
    assert f"got {int(sig)}" in out
    assert client.returncode == 42, err


def test_big_output_arrives_whole(gateway):
    r = gateway.bf(
        "run",
        "-m",
        "512",
        "--",
        sys.executable,
        "-c",
        "import sys; sys.stdout.write('x' * (12 * 1024 * 1024))",
    )
    assert r.returncode == 0
    assert len(r.stdout) == 12 * 1024 * 1024


def test_request_and_release_gpus_hold_a_share_across_runs(gateway):
    r = gateway.bf("request_gpus", "-n", "1", "-m", "3000")
    assert r.returncode == 0, r.stderr
    assert "Holding share" in r.stdout
    ids = {
        gateway.bf("run", "--", "sh", "-c", "echo $BITFUSION_SHARE_ID").stdout.strip()
        for _ in range(2)
    }
    assert len(ids) == 1 and ids.pop() in r.stdout
    time.sleep(3)  # longer than the lease grace: the holder keeps it alive
    listed = gateway.bf("list_gpus", "--json").stdout
    assert '"memory_free_mib": 13384' in listed
    same = gateway.bf("run", "-m", "3000", "--", "true")  # what it holds: fine
    assert same.returncode == 0, same.stderr
    other = gateway.bf("run", "-m", "4096", "--", "true")  # another share: said, not run
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert "holds share" in other.stderr and "not -m 4096" in other.stderr
    assert "release_gpus" in other.stderr and other.stderr.count("\n") == 1
    rel = gateway.bf("release_gpus")
    assert rel.returncode == 0, rel.stderr
    assert '"memory_free_mib": 13384' not in gateway.bf("list_gpus", "--json").stdout
    again = gateway.bf("release_gpus")
    assert again.returncode != 0 and "holds no share" in again.stderr


def test_a_run_after_the_holder_died_says_the_held_share_is_gone(gateway):
    assert gateway.bf("request_gpus", "-m", "3000").returncode == 0
    [held] = (gateway.home / "client-alice" / "held").glob("*.json")
    os.kill(json.loads(held.read_text())["holder_pid"], signal.SIGKILL)
    r = gateway.bf("run", "-m", "512", "--", "sh", "-c", "echo $BITFUSION_MEMORY_MIB")
    assert r.returncode == 0 and r.stdout == "512\n", r.stderr
    assert "this shell held" in r.stderr and "is gone (its holder process ended)" in r.stderr


def test_local_runs_a_child_inside_a_share(gateway):
    env = gateway.env(BITFUSION_LOCAL_SERVER=gateway.address)
    r = gateway.bf(
        "local",
        "-p",
        "0.5",
        "--",
        sys.executable,
        "-c",
        "import os; print(os.environ['BITFUSION_MEMORY_MIB'], os.getppid())",
        env=env,
    )
    assert r.returncode == 0, r.stderr
    mib, parent = r.stdout.split()
    assert mib == "8192"
    assert int(parent) != os.getpid()  # its parent is the bitfusion CLI, not the gateway


def test_a_closed_shell_gives_its_held_share_back(gateway):
    env = gateway.env()
    del env["BITFUSION_SESSION"]  # the session is then the shell that ran request_gpus
    shell = subprocess.run(
        [
            "sh",
            "-c",
            f"{sys.executable} -m bitfusion_jupyter request_gpus -m 3000 && "
            f"{sys.executable} -m bitfusion_jupyter run -- sh -c 'echo $BITFUSION_MEMORY_MIB'",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shell.returncode == 0, shell.stderr
    assert shell.stdout.splitlines()[-1] == "3000"  # the run used the held share
    assert gateway.no_shares_within(15), "the held share outlived its shell"


def _running_with(marker: str) -> list[int]:
    """Pids of live processes whose command line holds ``marker``."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    pids.append(int(entry))
        except (OSError, ValueError):
            continue
    return pids


def test_a_share_released_while_its_command_starts_takes_the_command_with_it(gateway):
    # Starting a command runs beside the gateway's receive loop, so a release can arrive
    # while it starts (a client that gives up at once). The command must end with its share,
    # not run on, orphaned, in a share that no longer exists.
    import uuid

    from remoting import protocol
    from tests.support.wire import RawClient

    marker = f"bf-starting-{uuid.uuid4().hex}"
    raw = RawClient(gateway)
    tok = gateway.token("alice")
    ids = iter(range(1, 1000))
    try:
        # The release lands at a different point of the start each time: before it, during
        # it (the start takes a few ms), after it.
        for delay in (0, 0.001, 0.002, 0.004, 0.008, 0.015, 0.03, 0.06):
            allocate = protocol.encode("allocate", token=tok, id=next(ids), gpus=1, mib=1024)
            share = raw.request(allocate)["data"]["share"]["share_id"]
            argv = [sys.executable, "-c", "import time; time.sleep(300)", marker]
            spawn, release = next(ids), next(ids)
            raw.send(protocol.encode("spawn", token=tok, id=spawn, share_id=share, argv=argv))
            time.sleep(delay)
            raw.send(protocol.encode("release", token=tok, id=release, share_id=share))
            replies: dict[int, object] = {}
            deadline = time.monotonic() + 20
            while len(replies) < 2 and time.monotonic() < deadline:
                replies |= {m["id"]: m for m in raw.received(0.2) if m.type == "reply"}
            assert set(replies) == {spawn, release}, "a start or a release was not answered"
            assert replies[release]["ok"]
        time.sleep(1)  # a command started after its share's release would be running now
        assert _running_with(marker) == []
        assert gateway.shares() == []
    finally:
        raw.close()
        for pid in _running_with(marker):
            os.kill(pid, signal.SIGKILL)


def test_env_options_pass_the_users_variables_and_nothing_else(gateway, tmp_path):
    # As Docker's -e and --env-file: NAME alone takes its value here, or nothing if unset.
    env_file = tmp_path / "vars.env"
    env_file.write_text("# the team's settings\nFROM_FILE=one\nBOTH=file\n\nFROM_HERE\n")
    env = gateway.env("alice", FROM_HERE="here", NOT_ASKED="secret")
    r = gateway.bf(
        "run", "-m", "512", "--env-file", str(env_file), "-e", "BOTH=flag", "-e", "EMPTY=",
        "-e", "UNSET_HERE", "-e", "CUDA_VISIBLE_DEVICES=all", "--", "env", env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    seen = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    assert (seen["FROM_FILE"], seen["BOTH"], seen["FROM_HERE"], seen["EMPTY"]) == (
        "one", "flag", "here", ""
    )  # fmt: skip
    assert "NOT_ASKED" not in seen and "UNSET_HERE" not in seen
    assert seen["CUDA_VISIBLE_DEVICES"].startswith("GPU-")  # the share's own, always


@pytest.mark.parametrize(
    "args, words",
    [
        (["-e", "1BAD=x"], "-e takes NAME or NAME=VALUE"),
        (["--env-file", "/no/such/file"], "Cannot read --env-file /no/such/file"),
    ],
)
def test_a_bad_env_option_is_one_sentence(gateway, args, words):
    r = gateway.bf("run", "-m", "512", *args, "--", "true")
    assert r.returncode == 2 and words in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1
    assert gateway.shares() == []  # refused before any share was taken
