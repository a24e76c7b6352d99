"""The example notebooks run end to end, as a newcomer runs them: the tour under nbclient
(a local kernel moved onto a share by %bitfusion, and back), and the PyTorch notebook in a
kernel on a share of the simulated pool, where it says plainly that no GPU is behind it."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

from tests.support.kernels import install_shim_kernelspec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _text(cell) -> str:
    out = []
    for o in cell.outputs:
        if o["output_type"] == "stream":
            out.append(o["text"])
        elif "data" in o:
            out.append(o["data"].get("text/plain", ""))
    return "".join(out)


def test_the_tour_runs_end_to_end_on_a_share_and_back(client_env, tmp_path):
    nb = nbformat.read(EXAMPLES / "tour.ipynb", as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={
        "metadata": {"path": str(tmp_path)}}).execute()  # fmt: skip
    code = [c for c in nb.cells if c.cell_type == "code"]
    texts = [_text(c) for c in code]
    assert "runs locally, on no share" in texts[0]
    assert "SIMULATED" in texts[1]  # list_gpus
    assert "moves to the python3 kernel in share s-" in texts[2]
    env = dict(line.split(None, 1) for line in texts[3].strip().splitlines())
    assert env["BITFUSION_MEMORY_MIB"] == "2048" and env["BITFUSION_SIMULATED"] == "1"
    assert env["BITFUSION_SHARE_ID"].startswith("s-")
    assert "This kernel runs in share" in texts[4]  # %bitfusion on the share
    assert "sum of squares: 2666664666667000000" in texts[5]
    assert "the gateway saw this share use 512 of its 2048 MiB" in texts[5]
    assert "moves back to a local kernel" in texts[6]
    assert len(texts) == 7
    assert client_env.no_shares_within(15), "the tour left a share behind"


def test_the_pytorch_notebook_says_what_it_does_without_a_gpu(client_env, tmp_path, monkeypatch):
    install_shim_kernelspec(tmp_path / "jupyter", "-m", "4096", name="bitfusion-test")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    nb = nbformat.read(EXAMPLES / "pytorch_on_a_share.ipynb", as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="bitfusion-test").execute()
    [cell] = [c for c in nb.cells if c.cell_type == "code"]
    assert "is on a SIMULATED pool: there is no GPU behind it" in _text(cell)
    assert client_env.no_shares_within(15)
