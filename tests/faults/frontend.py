"""A Jupyter frontend that runs on the client host and is driven by the test, line by line.

The test runs ``ip netns exec CLIENT python -m tests.faults.frontend``: this process starts a
kernel through the bitfusion shim with jupyter_client (as a Jupyter server would, on the
client host's own loopback) and answers one JSON command per stdin line with JSON lines on
stdout. ``execute`` answers twice: ``{"sent": ...}`` as soon as the cell is sent, so the test
can pull a cable while it runs, then the cell's outcome once its kernel is idle again.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from jupyter_client import KernelManager

from tests.support.kernels import shim_kernel_manager

# The answers go out on a private copy of stdout; fd 1 itself goes to stderr, because the
# kernel processes started here inherit it and print their own notes there.
_answers = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)


def _say(**fields: Any) -> None:
    _answers.write(json.dumps(fields) + "\n")
    _answers.flush()


class Frontend:
    def __init__(self) -> None:
        self.km: KernelManager | None = None
        self.kc: Any = None

    def start(self, args: list[str], timeout: float = 60, cwd: str | None = None) -> dict:
        self.km = shim_kernel_manager(*args, carry=cwd is not None)
        self.km.start_kernel(**({"cwd": cwd} if cwd else {}))  # the notebook's folder
        return self._connect(timeout)

    def _connect(self, timeout: float) -> dict:
        assert self.km is not None
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=timeout)
        return {"ok": True, "shim_pid": self.km.provisioner.process.pid}

    def execute(self, code: str, timeout: float) -> dict:
        msg_id = self.kc.execute(code)
        _say(sent=msg_id)
        out: dict[str, list[str]] = {"stdout": [], "stderr": []}
        arrivals: list[tuple[float, str]] = []  # when each stream text reached this host
        status, messages = "timeout", 0
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msg = self.kc.get_iopub_msg(timeout=min(1.0, deadline - time.monotonic()))
            except Exception:  # queue.Empty: nothing yet
                if not self.km.is_alive():
                    status = "dead"
                    break
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            messages += 1
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                out[content["name"]].append(content["text"])
                arrivals.append((time.time(), content["text"]))
            elif kind == "error":
                out["stderr"].append(f"{content['ename']}: {content['evalue']}")
            elif kind == "status" and content["execution_state"] == "idle":
                status = "ok"
                break
        return {
            "status": status,
            "stdout": "".join(out["stdout"]),
            "stderr": "".join(out["stderr"]),
            "messages": messages,
            "arrivals": arrivals,
        }

    def wait_dead(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while self.km.is_alive():
            if time.monotonic() > deadline:
                return {"dead": False}
            time.sleep(0.1)
        return {"dead": True, "exit_code": self.km.provisioner.process.returncode}

    def restart(self, timeout: float = 60) -> dict:
        self.kc.stop_channels()
        self.km.restart_kernel(now=True)
        return self._connect(timeout)

    def shutdown(self) -> dict:
        if self.kc is not None:
            self.kc.stop_channels()
        if self.km is not None and self.km.is_alive():
            self.km.shutdown_kernel(now=True)
        return {"ok": True}


def main() -> None:
    frontend = Frontend()
    for line in sys.stdin:
        command = json.loads(line)
        op = command.pop("op")
        try:
            _say(**getattr(frontend, op)(**command))
        except Exception as exc:  # tell the test, which shows it in its failure
            _say(error=f"{type(exc).__name__}: {exc}")
        if op == "shutdown":
            break
    frontend.shutdown()


if __name__ == "__main__":
    main()
