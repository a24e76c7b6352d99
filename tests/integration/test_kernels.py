"""Notebook kernels on a share: real ipykernels started by the shim through a real gateway,
driven by jupyter_client as JupyterLab's server drives them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import nbformat
import pytest
from nbclient import NotebookClient

from bitfusion_jupyter import share_sidecar
from tests.support.kernels import (
    install_shim_kernelspec,
    point_client_at,
    ready,
    reply_to,
    run_cell,
    shim_kernel_manager,
    start_local_kernel,
    start_shim_kernel,
    stream_text,
    until,
)
from tests.support.waiting import wait_for
from tests.support.wire import connect


def test_execute_runs_inside_the_share(kernel, client_env):
    km, kc = kernel
    reply, outputs = run_cell(kc, "import os\nprint(os.environ['BITFUSION_MEMORY_MIB'])\n6 * 7")
    assert reply["status"] == "ok"
    assert stream_text(outputs) == "2048\n"
    results = [
        m["content"]["data"]["text/plain"] for m in outputs if m["msg_type"] == "execute_result"
    ]
    assert results == ["42"]
    assert len(client_env.shares()) == 1


def test_errors_come_back_as_errors(kernel):
    km, kc = kernel
    reply, outputs = run_cell(kc, "1 / 0")
    assert reply["status"] == "error" and reply["ename"] == "ZeroDivisionError"
    assert any(m["msg_type"] == "error" for m in outputs)


def test_input_reaches_the_remote_kernel(kernel):
    km, kc = kernel

    def answer(msg):
        assert msg["content"]["prompt"] == "name? "
        kc.input("Ada")

    reply, outputs = run_cell(kc, "print('hello', input('name? '))", stdin_hook=answer)
    assert reply["status"] == "ok"
    assert stream_text(outputs) == "hello Ada\n"


def test_a_comm_round_trip(kernel):
    km, kc = kernel
    code = (
        "from comm import create_comm\n"
        "c = create_comm(target_name='echo', data={'hello': 1})\n"
        "c.on_msg(lambda m: c.send({'echo': m['content']['data']}))\n"
    )
    reply, outputs = run_cell(kc, code)
    assert reply["status"] == "ok"
    opens = [m for m in outputs if m["msg_type"] == "comm_open"]
    # The comm_open may come on iopub after the reply; read on until it does.
    deadline = time.monotonic() + 10
    while not opens and time.monotonic() < deadline:
        msg = kc.get_iopub_msg(timeout=5)
        if msg["msg_type"] == "comm_open":
            opens.append(msg)
    comm_id = opens[0]["content"]["comm_id"]
    kc.shell_channel.send(kc.session.msg("comm_msg", {"comm_id": comm_id, "data": {"x": 7}}))
    while time.monotonic() < deadline + 10:
        msg = kc.get_iopub_msg(timeout=5)
        if msg["msg_type"] == "comm_msg" and msg["content"]["comm_id"] == comm_id:
            assert msg["content"]["data"] == {"echo": {"x": 7}}
            return
    raise AssertionError("no comm echo")


def test_a_64_mib_output_arrives_whole(kernel):
    km, kc = kernel
    reply, outputs = run_cell(
        kc, "import sys; sys.stdout.write('x' * (64 * 1024 * 1024))", timeout=120
    )
    assert reply["status"] == "ok"
    assert len(stream_text(outputs)) == 64 * 1024 * 1024


def test_large_cells_and_outputs_arrive_byte_for_byte(kernel):
    """Messages over a MiB cross the encrypted link in pieces, both ways; every piece must
    come back in its place (a length check would miss two pieces swapped)."""
    km, kc = kernel
    text = "".join(f"{i:08x}" for i in range(5 * 1024 * 1024 // 8))  # 5 MiB, no two lines alike
    reply, outputs = run_cell(
        kc, f"import sys; text = {text!r}; sys.stdout.write(text[::-1])", timeout=120
    )
    assert reply["status"] == "ok"
    assert stream_text(outputs) == text[::-1]


def interrupted_sleep(km, kc) -> dict:
    """Interrupt a cell sleeping 60 s; its reply, read once the cell has ended (idle).

    The next cell waits for that idle, as nbclient and JupyterLab do: ipykernel 7 marks its
    queue as aborting only after sending an error reply, so a cell sent the instant that
    reply lands may be aborted, with a plain local kernel too (1 in 200 here, under load)."""
    msg_id = kc.execute("import time; time.sleep(60)")
    time.sleep(1.5)
    km.interrupt_kernel()
    reply = reply_to(kc, msg_id, timeout=20)  # well before the sleep would end by itself
    assert _cell_stream(kc, msg_id, timeout=20)[1], "the interrupted cell never went idle"
    return reply["content"]


def test_interrupt_stops_a_long_sleep(kernel):
    km, kc = kernel
    reply = interrupted_sleep(km, kc)
    assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt"
    assert run_cell(kc, "1 + 1")[0]["status"] == "ok"  # the kernel lives on


def test_restart_gives_a_fresh_kernel_on_a_fresh_share(kernel, client_env):
    km, kc = kernel
    run_cell(kc, "x = 5\nimport os\nprint(os.environ['BITFUSION_SHARE_ID'])")
    first = client_env.shares()[0]["share_id"]
    km.restart_kernel(now=False)
    kc.wait_for_ready(timeout=60)
    reply, outputs = run_cell(kc, "print('x' in dir())")
    assert stream_text(outputs) == "False\n"
    shares = client_env.shares()
    assert len(shares) == 1 and shares[0]["share_id"] != first  # the old share was freed


def test_shutdown_frees_the_share(kernel, client_env):
    km, kc = kernel
    assert len(client_env.shares()) == 1
    km.shutdown_kernel(now=False)
    assert client_env.no_shares_within(15)


def test_the_share_and_its_live_usage_are_told_to_server_and_kernel(kernel, client_env):
    """The Jupyter server's side learns the kernel's share from the shim's sidecar file; the
    kernel reads its share's live usage from the gateway's usage file."""
    km, kc = kernel
    [share] = client_env.shares()
    sidecar = share_sidecar.read(km.connection_file)
    assert sidecar is not None and sidecar["share_id"] == share["share_id"]
    assert [g["mib"] for g in sidecar["gpus"]] == [2048] and sidecar["gpus"][0]["simulated"]
    code = (
        "import json, os, subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-m', 'gateway.simulated_alloc', '700',"
        " '--seconds', '30'])\n"
        "deadline, seen = time.time() + 15, None\n"
        "while time.time() < deadline:\n"
        "    try:\n"
        "        seen = json.load(open(os.environ['BITFUSION_USAGE_FILE']))\n"
        "    except FileNotFoundError:\n"
        "        seen = None  # the gateway writes it within a second of the grant\n"
        "    if seen and seen['gpus'][0]['used_mib'] == 700: break\n"
        "    time.sleep(0.2)\n"
        "p.terminate(); p.wait()\n"
        "print(json.dumps(seen))"
    )
    reply, outputs = run_cell(kc, code)
    assert reply["status"] == "ok", reply
    # The allocator's own line comes first: a kernel shows its children's output too.
    seen = json.loads(stream_text(outputs).splitlines()[-1])
    assert seen["share_id"] == share["share_id"] and seen["lease"] == "held"
    assert seen["gpus"][0]["used_mib"] == 700 and seen["gpus"][0]["mib"] == 2048
    usage_file = client_env.state_dir / "usage" / share["share_id"] / "usage.json"
    assert usage_file.exists()
    km.shutdown_kernel(now=False)
    assert client_env.no_shares_within(15)
    assert not share_sidecar.path_for(km.connection_file).exists()
    assert not usage_file.exists()


def _run_shim(tmp_path, *share_args):
    """Run the shim by hand, as a kernelspec would, with a connection file of free ports."""
    import subprocess

    conn = tmp_path / "kernel.json"
    ports = {f"{ch}_port": 0 for ch in ("shell", "iopub", "stdin", "control", "hb")}
    conn.write_text(
        json.dumps(
            {
                "ip": "127.0.0.1",
                "transport": "tcp",
                **ports,
                "key": "k",
                "signature_scheme": "hmac-sha256",
            }
        )
    )
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "bitfusion_jupyter.shim",
            "--connection-file",
            str(conn),
            *share_args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_kernel_larger_than_the_pool_fails_clearly(client_env, tmp_path):
    r = _run_shim(tmp_path, "-m", "999999")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "largest GPU here has 16384 MiB" in r.stderr


def test_an_incomplete_connection_file_is_refused_in_one_sentence(client_env, tmp_path):
    conn = tmp_path / "kernel.json"
    conn.write_text('{"key": "k", "shell_port": 1}')
    r = subprocess.run(
        [sys.executable, "-m", "bitfusion_jupyter.shim", "--connection-file", str(conn)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "lacks 'ip'" in r.stderr and "Jupyter client" in r.stderr
    assert client_env.shares() == []  # refused before taking any share


def test_nbclient_runs_a_notebook_on_a_share(client_env, tmp_path, monkeypatch):
    from jupyter_client.kernelspec import KernelSpecManager

    install_shim_kernelspec(tmp_path / "share" / "jupyter", "-p", "0.25", name="bitfusion-test")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "share" / "jupyter"))
    assert "bitfusion-test" in KernelSpecManager().find_kernel_specs()
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("import os\nos.environ['BITFUSION_MEMORY_MIB']"),
        nbformat.v4.new_code_cell("sum(range(10))"),
    ]
    NotebookClient(nb, kernel_name="bitfusion-test", timeout=60).execute()
    assert nb.cells[0].outputs[0]["data"]["text/plain"] == "'4096'"
    assert nb.cells[1].outputs[0]["data"]["text/plain"] == "45"
    assert client_env.no_shares_within(15)


def _cell_stream(kc, msg_id, done=lambda text: False, timeout=60):
    """The stream text of cell ``msg_id`` once ``done(text)`` holds or the cell ends, and
    whether it ended."""
    text, deadline = "", time.monotonic() + timeout
    while time.monotonic() < deadline and not done(text):
        try:
            msg = kc.get_iopub_msg(timeout=1)
        except Exception:
            continue
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            text += msg["content"]["text"]
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return text, True
    return text, False


def test_the_magic_moves_a_local_kernel_onto_shares_and_back(client_env):
    with ready(start_local_kernel()) as (km, kc):
        pid = km.provisioner.process.pid
        run_cell(kc, "%load_ext bitfusion_jupyter\nx = 1")
        reply, outputs = run_cell(kc, "%bitfusion")
        assert "runs locally, on no share" in stream_text(outputs)

        # Too big: a clear error in the cell, and the kernel stays as it was.
        reply, outputs = run_cell(kc, "%bitfusion -m 999999")
        assert reply["status"] == "ok"
        assert "largest GPU here has 16384 MiB" in stream_text(outputs)
        assert "stays as it was" in stream_text(outputs)
        assert stream_text(run_cell(kc, "print(x)")[1]) == "1\n"

        # Onto a share: the cell completes and says where the kernel goes.
        reply, outputs = run_cell(kc, "%bitfusion -n 1 -m 2048")
        assert reply["status"] == "ok"
        text = stream_text(outputs)
        assert "moves to the python3 kernel in share s-" in text and "variables are reset" in text
        check = "import os; print(os.environ.get('BITFUSION_MEMORY_MIB'))"
        until(kc, check, "2048\n")
        assert km.provisioner.process.pid == pid  # the same process, now the shim
        first = client_env.shares()[0]["share_id"]
        status = stream_text(run_cell(kc, "%bitfusion")[1])
        assert f"runs in share {first} on gpuhost (SIMULATED)" in status

        # From a shared kernel to another share (the magic is loaded there by itself).
        reply, outputs = run_cell(kc, "y = 2\n%bitfusion -p 0.5")
        assert reply["status"] == "ok" and "moves to" in stream_text(outputs)
        until(kc, check, "8192\n")
        shares = client_env.shares()
        assert len(shares) == 1 and shares[0]["share_id"] != first
        assert stream_text(run_cell(kc, "print('y' in dir())")[1]) == "False\n"

        # And back to a local kernel, which gives the share back.
        reply, outputs = run_cell(kc, "%bitfusion --local")
        assert reply["status"] == "ok" and "back to a local kernel" in stream_text(outputs)
        until(kc, check, "None\n")
        assert client_env.shares() == []
        assert km.provisioner.process.pid == pid


def test_after_a_move_the_kernel_shows_idle_not_starting(client_env):
    """The kernel behind the shim starting again is not news to the frontend: JupyterLab
    would show "Starting" until the next cell (ipykernel follows it with no idle)."""
    with ready(start_shim_kernel("-m", "1024")) as (km, kc):
        first = client_env.shares()[0]["share_id"]
        reply, outputs = run_cell(kc, "%bitfusion -m 2048")
        assert reply["status"] == "ok" and "moves to" in stream_text(outputs)
        # Why the notebook's label still says 1024: JupyterLab cannot rename a kernel.
        assert "kernel label keeps naming the kernelspec it started with" in stream_text(outputs)
        states, deadline = [], time.monotonic() + 20
        while time.monotonic() < deadline:
            shares = client_env.shares()
            if shares and shares[0]["share_id"] != first and shares[0].get("processes"):
                break
            time.sleep(0.2)
        deadline = time.monotonic() + 3  # the new kernel's first words, had it any
        while time.monotonic() < deadline:
            try:
                msg = kc.get_iopub_msg(timeout=0.5)
            except Exception:
                continue
            if msg["msg_type"] == "status":
                states.append(msg["content"]["execution_state"])
        assert "starting" not in states
        until(kc, "import os; print(os.environ.get('BITFUSION_MEMORY_MIB'))", "2048\n")


def test_the_kernels_own_log_lines_are_marked_as_the_kernels_in_the_frontends_log(
    client_env, tmp_path
):
    """What the remote ipykernel logs reaches the Jupyter server's log through the shim,
    labelled as the kernel's, not read as bitfusion's; ipykernel's note that Ctrl-C will
    not work (it does, through the shim) is not there."""
    km = shim_kernel_manager("-m", "1024")
    log = tmp_path / "server.log"
    with log.open("w") as server_log:
        km.start_kernel(stderr=server_log)
    kc = km.client()
    kc.start_channels()
    with ready((km, kc)):
        share = client_env.shares()[0]["share_id"]
        run_cell(kc, "get_ipython().kernel.log.error('the kernel speaks')")
        deadline = time.monotonic() + 10
        while "the kernel speaks" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
    text = log.read_text()
    assert f"[kernel in share {share}] [IPKernelApp] ERROR | the kernel speaks" in text, text
    assert "Ctrl-C will not work" not in text and "--existing" not in text, text
    assert f"bitfusion: python3 kernel in share {share}" in text  # the shim's own: unmarked


def test_the_magic_waits_in_the_queue_and_says_so_in_the_cell(client_env):
    hold = client_env.env("bob", BITFUSION_SESSION="bob-holds-all")
    assert client_env.bf("request_gpus", "-n", "2", env=hold).returncode == 0
    km, kc = start_local_kernel()
    try:
        kc.wait_for_ready(timeout=60)
        run_cell(kc, "%load_ext bitfusion_jupyter")
        cell = kc.execute("%bitfusion -m 1024 --wait 60")
        text, _ = _cell_stream(kc, cell, lambda t: "Position 1 in the queue" in t)
        assert "Waiting up to 60 s for 1 GPU × 1024 MiB on" in text
        assert "Position 1 in the queue of" in text
        assert client_env.bf("release_gpus", env=hold).returncode == 0
        text, _ = _cell_stream(kc, cell)
        assert "moves to the python3 kernel in share s-" in text
        until(kc, "import os; print(os.environ.get('BITFUSION_MEMORY_MIB'))", "1024\n")
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
        client_env.bf("release_gpus", env=hold)


def test_a_kernel_survives_a_gateway_restart(gateway_factory, monkeypatch):
    import signal as sig

    gw = gateway_factory("--simulate-gpus", "2x16GiB", "--lease-grace", "15")
    point_client_at(gw, monkeypatch)
    km, kc = start_shim_kernel("-m", "1024")
    try:
        kc.wait_for_ready(timeout=60)
        run_cell(kc, "state = 'kept'")
        gw.kill(sig.SIGKILL)
        time.sleep(1)
        gw.start()  # same state dir and port: it adopts the kernel; the shim reconnects
        until(kc, "print(state)", "kept\n", timeout=60)
        assert len(gw.shares()) == 1
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_an_unknown_kernel_environment_is_named(client_env, tmp_path):
    r = _run_shim(tmp_path, "-m", "1024", "--kernel", "julia")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "offers no kernel 'julia'; it offers python3" in r.stderr
    assert client_env.shares() == []  # the share taken for it was given back


def test_the_magic_documents_its_options(kernel):
    km, kc = kernel
    reply, _ = run_cell(kc, "%bitfusion?")
    page = "".join(p["data"]["text/plain"] for p in reply.get("payload", []) if "data" in p)
    for option in (
        "-n NUM_GPUS",
        "-m MEMORY",
        "-p PARTIAL",
        "--filter",
        "--wait",
        "--local",
        "variables are reset",
    ):
        assert option in page, option


def test_papermill_runs_a_parameterised_notebook_on_a_share(client_env, tmp_path):
    import subprocess

    papermill = pytest.importorskip("papermill")
    del papermill
    install_shim_kernelspec(tmp_path / "share" / "jupyter", "-m", "1536", name="bitfusion-pm")
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "bitfusion-pm",
        "language": "python",
        "display_name": "Python 3 · test share",
    }
    params = nbformat.v4.new_code_cell("n = 1")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [
        params,
        nbformat.v4.new_code_cell("import os\nprint(n * int(os.environ['BITFUSION_MEMORY_MIB']))"),
    ]
    nbformat.write(nb, tmp_path / "in.ipynb")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "papermill",
            str(tmp_path / "in.ipynb"),
            str(tmp_path / "out.ipynb"),
            "-k",
            "bitfusion-pm",
            "-p",
            "n",
            "2",
        ],
        env={**os.environ, "JUPYTER_PATH": str(tmp_path / "share" / "jupyter")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    out = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    assert out.cells[-1].outputs[0]["text"] == "3072\n"


def test_a_shim_whose_frontend_was_killed_gives_its_share_back(client_env, tmp_path):
    import subprocess

    # A frontend (here a small Python) starts the kernel, then dies without a goodbye.
    install_shim_kernelspec(tmp_path / "share" / "jupyter", "-m", "1024", name="bitfusion-gone")
    frontend = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time\n"
                "from jupyter_client import KernelManager\n"
                "km = KernelManager(kernel_name='bitfusion-gone')\n"
                "km.start_kernel(); kc = km.client(); kc.start_channels(); kc.wait_for_ready(60)\n"
                "print('ready', flush=True); time.sleep(120)\n"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "JUPYTER_PATH": str(tmp_path / "share" / "jupyter")},
    )
    while (line := frontend.stdout.readline()) not in ("ready\n", ""):
        pass  # the kernel's own start-up notes share the frontend's stdout
    assert line == "ready\n"
    assert len(client_env.shares()) == 1
    frontend.kill()
    frontend.wait()
    assert client_env.no_shares_within(20)


def test_a_cell_sent_before_the_kernel_is_ready_gets_its_output(client_env):
    # jupyter console sends the first cell as soon as it can; the gateway must not let the
    # kernel run it before the kernel's outputs can reach us. Three starts, since it was a race.
    for _ in range(3):
        km, kc = start_shim_kernel("-m", "512")
        try:
            assert _next_cell_output(kc, "print('early')") == "early\n"
        finally:
            kc.stop_channels()
            km.shutdown_kernel(now=True)


def test_jupyter_console_runs_cells_on_a_share(client_env, tmp_path):
    import subprocess

    pytest.importorskip("jupyter_console")
    install_shim_kernelspec(tmp_path / "share" / "jupyter", "-m", "1024", name="bitfusion-console")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "jupyter_console",
            "--simple-prompt",
            "--kernel",
            "bitfusion-console",
        ],
        input="import os\nprint('MiB', os.environ['BITFUSION_MEMORY_MIB'])\nexit\n",
        env={**os.environ, "JUPYTER_PATH": str(tmp_path / "share" / "jupyter")},
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert r.returncode == 0, r.stderr
    assert "MiB 1024" in r.stdout
    assert client_env.no_shares_within(15)


def _next_cell_output(kc, code, timeout=30):
    """Send ``code`` at once (as nbclient does) and return its stream text, or None if its
    output never came back."""
    text, ended = _cell_stream(kc, kc.execute(code), timeout=timeout)
    return text if ended else None


def test_the_first_cell_after_moving_back_to_local_gets_its_output(client_env):
    # After `--local` the shim starts a local kernel and forwards to it. The next cell is
    # sent the instant the move's cell ends, as nbclient and papermill send it; it must run
    # there and its output arrive, not be lost in the switch. Three round trips: it was a race.
    with ready(start_shim_kernel("-m", "512")) as (km, kc):
        for i in range(3):
            if i:
                assert _next_cell_output(kc, "%bitfusion -m 512") is not None
                until(kc, "import os; print(os.environ.get('BITFUSION_MEMORY_MIB'))", "512\n")
            assert "back to a local kernel" in _next_cell_output(kc, "%bitfusion --local")
            assert _next_cell_output(kc, f"print('local {i}')") == f"local {i}\n"
            assert client_env.shares() == []


def _run_all(kc, cells, send_during=None, timeout=60):
    """Send every cell at once, as JupyterLab's Run All does; with ``send_during``, send one
    more as soon as the first cell prints. Returns {cell: (stdout, inputs echoed, reply)}."""
    ids = {kc.execute(code): code for code in cells}
    text = dict.fromkeys(ids, "")
    echoed, idle, replies = dict.fromkeys(ids, 0), set(), {}
    first = next(iter(ids))
    deadline = time.monotonic() + timeout
    # Only replies to these cells count: wait_for_ready may have left a late kernel_info_reply.
    while not (ids.keys() <= idle and ids.keys() <= replies.keys()) and time.monotonic() < deadline:
        try:
            msg = kc.get_iopub_msg(timeout=0.2)
        except Exception:
            msg = None
        parent = msg["parent_header"].get("msg_id") if msg else None
        if parent in ids:
            kind = msg["msg_type"]
            if kind == "stream":
                text[parent] += msg["content"]["text"]
                if parent == first and send_during and send_during not in ids.values():
                    later = kc.execute(send_during)
                    ids[later], text[later], echoed[later] = send_during, "", 0
            elif kind == "execute_input":
                echoed[parent] += 1
            elif kind == "status" and msg["content"]["execution_state"] == "idle":
                idle.add(parent)
        while kc.shell_channel.msg_ready():
            reply = kc.get_shell_msg(timeout=1)
            if reply["parent_header"].get("msg_id") in ids:
                replies.setdefault(reply["parent_header"]["msg_id"], reply["content"]["status"])
    return {code: (text[i], echoed[i], replies.get(i)) for i, code in ids.items()}


def test_cells_queued_behind_a_move_run_on_the_new_kernel(client_env):
    # Run All sends every cell at once, so the cells after `%bitfusion` are already queued
    # in the old kernel when it asks to move, and a cell can arrive while the move waits for
    # the asking cell to end. All of them must run on the new kernel, in order, once each.
    with ready(start_shim_kernel("-m", "512")) as (km, kc):
        where = "import os; print(os.environ['BITFUSION_MEMORY_MIB'])"
        seen = _run_all(
            kc, ["%bitfusion -m 1024", where, "print('next')"], send_during="print('during')"
        )
        assert "moves to" in seen["%bitfusion -m 1024"][0]
        assert seen[where] == ("1024\n", 1, "ok")
        assert seen["print('next')"] == ("next\n", 1, "ok")
        assert seen["print('during')"] == ("during\n", 1, "ok")
        assert [s["gpus"][0]["mib"] for s in client_env.shares()] == [1024]


def test_cells_queued_behind_a_failed_move_still_show_their_outputs(client_env):
    # When the new kernel cannot start, the kernel stays where it was, and the cells queued
    # behind the move, which it ran, show what they printed there.
    with ready(start_shim_kernel("-m", "512")) as (km, kc):
        run_cell(kc, "x = 'kept'")
        seen = _run_all(kc, ["%bitfusion -m 1024 --kernel nosuch", "print(x)"])
        assert seen["print(x)"] == ("kept\n", 1, "ok")
        assert [s["gpus"][0]["mib"] for s in client_env.shares()] == [512]


def test_cells_queued_behind_a_local_kernels_move_run_on_the_share(client_env):
    # The same from a plain local kernel, which becomes the shim: the cells it was sent
    # while it moved are handed over and run on the share, not lost with its process.
    with ready(start_local_kernel()) as (km, kc):
        run_cell(kc, "%load_ext bitfusion_jupyter")
        where = "import os; print(os.environ['BITFUSION_MEMORY_MIB'])"
        seen = _run_all(
            kc, ["%bitfusion -m 1024 --no-files", where, "print('next')", "print('last')"]
        )  # its folder is this checkout, which the test gateway cannot show: not what is tested
        assert seen[where] == ("1024\n", 1, "ok")
        assert seen["print('next')"] == ("next\n", 1, "ok")
        assert seen["print('last')"] == ("last\n", 1, "ok")


def test_input_in_the_first_cell_after_moving_back_to_local_is_answered(client_env):
    # The local kernel drops an input request until the shim's stdin socket has connected;
    # the shim lets the frontend's cells through only once it has.
    with ready(start_shim_kernel("-m", "512")) as (km, kc):
        assert "back to a local kernel" in _next_cell_output(kc, "%bitfusion --local")
        reply, outputs = run_cell(
            kc, "print('hello', input('name? '))", timeout=20, stdin_hook=lambda m: kc.input("Ada")
        )
        assert stream_text(outputs) == "hello Ada\n"


def test_after_moving_back_to_local_the_kernel_keeps_input_interrupt_and_shutdown(client_env):
    # The local kernel the shim forwards to behaves as a local kernel does: input() is
    # answered, a Ctrl-C stops a sleep once, and shutting down ends it with the shim.
    import os
    import tempfile
    from pathlib import Path

    def local_dirs():
        return set(Path(tempfile.gettempdir()).glob("bitfusion-local-*"))

    before = local_dirs()
    km, kc = start_shim_kernel("-m", "512", "--kernel", "python3")
    try:
        kc.wait_for_ready(timeout=60)
        assert "back to a local kernel" in _next_cell_output(kc, "%bitfusion --local")
        child = int(_next_cell_output(kc, "import os; print(os.getpid())"))
        assert child != km.provisioner.process.pid  # a kernel of its own, behind the shim

        def answer(msg):
            kc.input("Ada")

        reply, outputs = run_cell(kc, "print('hello', input('name? '))", stdin_hook=answer)
        assert stream_text(outputs) == "hello Ada\n"

        assert interrupted_sleep(km, kc)["ename"] == "KeyboardInterrupt"
        assert _next_cell_output(kc, "print(1 + 1)") == "2\n"  # it lives on

        km.shutdown_kernel(now=False)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the local kernel outlived its shim's shutdown")
        assert client_env.shares() == []
        assert local_dirs() == before  # its connection files went with it
    finally:
        kc.stop_channels()
        if km.is_alive():
            km.shutdown_kernel(now=True)


def test_a_frontend_that_provisions_curve_keys_gets_encrypted_channels(
    client_env, tmp_path, monkeypatch
):
    # Our kernelspecs declare CurveZMQ support, so a Jupyter server with transport
    # encryption on (`bitfusion up` turns it on) hands the shim keys. The shim's ports on
    # this machine's loopback are then closed to a listener without them.
    from pathlib import Path

    import zmq
    from jupyter_client import KernelManager

    from tests.support.kernels import start_kernel

    if "transport_encryption" not in KernelManager.class_trait_names():
        pytest.skip("this jupyter_client cannot provision CurveZMQ keys (8.9 or later can)")
    data = tmp_path / "jupyter-data"
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(data))
    r = client_env.bf(
        "kernelspec", "install", "-m", "512", "--name", "sealed", "--user",
        env={**client_env.env("alice"), "JUPYTER_DATA_DIR": str(data)},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    km, kc = start_kernel(KernelManager(kernel_name="sealed", transport_encryption="auto"))
    listener = zmq.Context.instance().socket(zmq.SUB)
    try:
        kc.wait_for_ready(timeout=60)
        info = json.loads(Path(km.connection_file).read_text())
        assert info.get("curve_publickey") and info.get("curve_secretkey")
        listener.setsockopt(zmq.SUBSCRIBE, b"")
        listener.connect(f"tcp://127.0.0.1:{info['iopub_port']}")
        time.sleep(0.5)
        reply, outputs = run_cell(kc, "for i in range(20): print('secret', i)")
        assert reply["status"] == "ok" and "secret 19" in stream_text(outputs)
        assert not listener.poll(1000), "a listener without the keys heard the kernel"
    finally:
        listener.close(0)
        kc.stop_channels()
        km.shutdown_kernel(now=True)


@pytest.mark.parametrize(
    "mode, transport, keys, banner",
    [
        ("auto", "ipc", False, "python3 on unix sockets that Landlock keeps to its share"),
        ("curve", "tcp", True, "python3 with CurveZMQ-encrypted channels"),
        ("plain", "tcp", False, "python3 NOT encrypted on the loopback"),
    ],
)
def test_each_kernel_channel_mode_runs_kernels_as_the_banner_says(
    gateway_factory, monkeypatch, mode, transport, keys, banner
):
    # "auto" (the default, where Landlock can scope unix sockets: no encryption to pay for),
    # "curve" (TCP with keys), and the admin's choice for speed, "plain".
    from pathlib import Path

    from gateway import kernels, landlock

    if mode == "auto" and landlock.abi() < kernels.SCOPED_UNIX_ABI:
        pytest.skip(f"this Linux has no Landlock ABI {kernels.SCOPED_UNIX_ABI} to scope sockets")
    gw = gateway_factory("--simulate-gpus", "1x16GiB", "--kernel-channels", mode)
    point_client_at(gw, monkeypatch)
    km, kc = start_shim_kernel("-m", "1024")
    try:
        kc.wait_for_ready(timeout=60)
        assert _next_cell_output(kc, f"print('{mode}')") == f"{mode}\n"
        (conn_file,) = (Path(gw.state_dir) / "run" / "kernels").glob("*/kernel-*.json")
        info = json.loads(conn_file.read_text())
        assert info["transport"] == transport
        assert ("curve_publickey" in info) is keys
        assert f"kernels: {banner}" in gw.log()
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_jupyter_run_runs_a_file_on_a_share(client_env, tmp_path):
    # `jupyter run --kernel K FILE` also hands FILE to the kernel's command line, as it would
    # to a local kernel: the shim sets it aside, saying so, and the file runs on the share.
    install_shim_kernelspec(tmp_path / "share" / "jupyter", "-m", "1024", name="bitfusion-run")
    script = tmp_path / "hello.py"
    script.write_text("import os\nprint('on', os.environ['BITFUSION_MEMORY_MIB'], 'MiB')\n")
    r = subprocess.run(
        [sys.executable, "-m", "jupyter", "run", "--kernel", "bitfusion-run", str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "JUPYTER_PATH": str(tmp_path / "share" / "jupyter")},
    )
    assert r.returncode == 0, r.stderr
    assert "on 1024 MiB" in r.stdout
    assert f"not passing {script} to the kernel on the share" in r.stderr
    assert client_env.no_shares_within(15)


def test_a_mistyped_shim_option_is_still_refused(tmp_path):
    from bitfusion_jupyter import shim

    conn = tmp_path / "kernel.json"
    conn.write_text("{}")
    r = subprocess.run(
        [sys.executable, "-m", "bitfusion_jupyter.shim", "-f", str(conn), "--memroy", "1024"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "unrecognized arguments: --memroy" in r.stderr
    assert shim.parse_args(["-f", str(conn), "--IPKernelApp.pylab=inline"]).kernel == "python3"


def test_a_kernel_whose_idle_share_is_reclaimed_goes_on_locally_and_says_why(client_env):
    """Ending would make Jupyter restart it on a new share, for a notebook nobody uses."""
    admin = connect(client_env, "root", admin=True)
    try:
        with ready(start_shim_kernel("-m", "1024")) as (km, kc):
            reply, outputs = run_cell(kc, "import os; print(os.environ['BITFUSION_SHARE_ID'])")
            share_id = stream_text(outputs).strip()
            assert share_id.startswith("s-")
            admin.request("set_idle_timeout", seconds=2)
            assert client_env.no_shares_within(20), "the idle share was not reclaimed"
            # the shim hears it a moment after the gateway has freed the share
            assert wait_for(lambda: share_sidecar.read_notice(km.connection_file), 10)
            notice = share_sidecar.read_notice(km.connection_file)
            assert notice["action"] == "idle"
            assert share_id in notice["message"] and "runs locally" in notice["message"]
            assert share_sidecar.read(km.connection_file) is None  # the panel: on no share
            reply, outputs = run_cell(kc, "import os; print(os.environ.get('BITFUSION_SHARE_ID'))")
            assert reply["status"] == "ok" and stream_text(outputs).strip() == "None"
            assert km.is_alive()
            time.sleep(3)
            assert client_env.shares() == []  # it took no share again
            events = admin.request("list_shares")["events"]
            assert [e["kind"] for e in events].count("idle_reclaim") == 1
    finally:
        admin.request("set_idle_timeout", seconds=0)
        admin.close()
