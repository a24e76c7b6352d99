"""Code that runs in a share and says which process it is, for the tests that find it."""

from __future__ import annotations

# Python code that prints its pid so the host can find it: in a share's sandbox a process has
# a pid of its own namespace, so it prints that namespace too (see host_pid).
PRINTS_ITS_PID = (
    "import os; print(f\"{os.stat('/proc/self/ns/pid').st_ino}-{os.getpid()}\", flush=True)"
)
# Python code that echoes each line of its stdin as it comes, for the stdin tests.
ECHOES_ITS_STDIN = (
    "import sys\nfor line in sys.stdin:\n    print('got', line.strip(), flush=True)\n"
)


def host_pid(printed: str) -> int:
    """The host pid of a process in a share that printed PRINTS_ITS_PID (while it runs)."""
    from gateway import simulated_claims

    pid = simulated_claims.host_pid(printed.strip())
    assert pid is not None, f"no running process printed {printed!r}"
    return pid
