"""Every command in docs/*.md runs here, so the docs cannot rot.

The convention (also in docs/README.md):

- A block fenced as ```sh is run: one command a line, in order, each in its own ``bash -c``,
  in a scratch HOME, against a real gateway on a simulated pool (2 × 16 GiB, named ``gpu1``,
  lease grace 2 s, police grace 1 s) started for that file. Lines that are empty or start
  with ``#`` are skipped.
- Each command must exit 0, unless its line ends with ``# fails`` (any non-zero status) or
  ``# exits N`` (exactly N).
- A block fenced as ```output right after a ```sh block holds text that the commands of that
  block must print (stdout and stderr together): each non-empty line must appear, where
  ``…`` stands for any text and a run of spaces for any run of whitespace.
- Blocks that cannot run here (a real GPU, systemd, root paths, MPS, PyPI) are fenced
  ```text or ```console and are not run.
- Before a file's first block the scratch client is initialised as user alice
  (``bitfusion init --token bf1.u.alice.… --server gpu1:56001``), so examples can use the
  pool at once.

Placeholders the docs may use, replaced before running (SUBSTITUTIONS below; in ```output
blocks only the addresses and paths are replaced, tokens stay a ``…`` wildcard):

    gpu1:56001          the test gateway's client address (127.0.0.1:PORT)
    gpu1:54000          its dashboard (127.0.0.1:PORT)
    gpu9:56001          a loopback port where nothing listens (a server that is down)
    https://github.com/bitfusion-jupyter/bitfusion-jupyter   this checkout (its commit)
    /opt/bitfusion, /usr/local/bin/bitfusion                 scratch paths
    --port 56001        --port of the test gateway (for localhealth)
    /var/lib/bitfusion  the test gateway's state directory
    bf1.u.alice.…       a token of user alice
    bf1.a.admin.…       the pool's admin token
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gateway.spawned import free_port, stop_leftovers
from tests.support.env import REPO, base_env
from tests.support.gateways import start_web_gateway

DOCS = REPO / "docs"
DOC_FILES = sorted(p.name for p in DOCS.glob("*.md"))
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
EXPECT = re.compile(r"#\s*(fails|exits\s+(\d+))\s*$")
COMMAND_TIMEOUT_S = 240  # building the wheel (the panel with it) takes about half a minute
CLONE_URL = "https://github.com/bitfusion-jupyter/bitfusion-jupyter"


@dataclass
class Block:
    line: int  # where it starts in the file, for messages
    commands: list[str]
    output: list[str] = field(default_factory=list)


def runnable_blocks(text: str) -> list[Block]:
    """The ```sh blocks of a Markdown file, each with the ```output block that follows it."""
    blocks: list[Block] = []
    last_end = -1
    for m in FENCE.finditer(text):
        lang, body = m.group(1), m.group(2)
        line = text.count("\n", 0, m.start()) + 1
        if lang == "sh":
            commands = [
                c for c in body.splitlines() if c.strip() and not c.lstrip().startswith("#")
            ]
            blocks.append(Block(line, commands))
        elif lang == "output":
            between = text[last_end : m.start()]
            if not blocks or last_end < 0 or between.strip():
                raise AssertionError(f"line {line}: an ```output block must follow a ```sh block")
            blocks[-1].output = [o for o in body.splitlines() if o.strip()]
        last_end = m.end() if lang == "sh" else -1
    return blocks


def expected_status(command: str) -> int | None:
    """0, a given status, or None for 'any non-zero status'."""
    m = EXPECT.search(command)
    if m is None:
        return 0
    return int(m.group(2)) if m.group(2) else None


def substitute(text: str, table: dict[str, str]) -> str:
    for placeholder in sorted(table, key=len, reverse=True):
        text = text.replace(placeholder, table[placeholder])
    return text


def output_pattern(line: str) -> re.Pattern[str]:
    parts = [re.sub(r"\\\s+", r"\\s+", re.escape(p.strip())) for p in line.split("…")]
    return re.compile(r".*?".join(parts))


def test_the_fence_convention_is_parsed_as_documented() -> None:
    text = (
        "```sh\ntrue\n# a comment\nfalse  # fails\nexit 3  # exits 3\n```\n\n"
        "```output\na … b\n```\n"
    )
    [block] = runnable_blocks(text)
    assert block.commands == ["true", "false  # fails", "exit 3  # exits 3"]
    assert [expected_status(c) for c in block.commands] == [0, None, 3]
    assert block.output == ["a … b"]
    assert output_pattern("a … b").search("x a  and  b y")


@pytest.fixture
def docs_pool(tmp_path: Path):
    gw, web = start_web_gateway(
        tmp_path,
        "--simulate-gpus",
        "2x16GiB",
        "--lease-grace",
        "2",
        "--police-grace",
        "1",
        name="gpu1",
    )
    home = tmp_path / "home"
    home.mkdir()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    usr_local_bin = tmp_path / "usr-local-bin"
    usr_local_bin.mkdir()
    # The docs say `bitfusion` and `python`: both are this interpreter and this checkout.
    for name, argv in {
        "bitfusion": f'"{sys.executable}" -m bitfusion_jupyter "$@"',
        "python": f'"{sys.executable}" "$@"',
        "python3": f'"{sys.executable}" "$@"',
    }.items():
        script = bindir / name
        script.write_text(f"#!/bin/sh\nexec {argv}\n")
        script.chmod(0o755)
    env = {k: v for k, v in base_env(tmp_path).items() if not k.startswith(("JUPYTER_", "XDG_"))}
    env.update(
        HOME=str(home),
        PATH=f"{bindir}{os.pathsep}{env.get('PATH', '')}",
        # request_gpus holds its share for this session: the test process stands for the shell.
        BITFUSION_SESSION=str(os.getpid()),
        # deployment.md's pip installs skip compiling bytecode, a third of their time here;
        # what they install is the same.
        PIP_NO_COMPILE="1",
    )
    dead = f"127.0.0.1:{free_port()}"
    table = {
        "gpu1:56001": gw.address,
        "gpu1:54000": web.removeprefix("http://"),
        "gpu9:56001": dead,
        "/var/lib/bitfusion": str(gw.state_dir),
        "--port 56001": f"--port {gw.port}",
        # The install: this checkout's commit stands for the public repository, and scratch
        # folders for the system's.
        f"git clone {CLONE_URL}": f"git clone {REPO} bitfusion-jupyter",
        "/opt/bitfusion": str(tmp_path / "opt-bitfusion"),
        "/usr/local/bin/bitfusion": str(usr_local_bin / "bitfusion"),
    }
    tokens = {
        "bf1.u.alice.…": gw.token("alice"),
        "bf1.a.admin.…": (gw.state_dir / "admin.token").read_text().strip(),
    }
    init = subprocess.run(
        ["bitfusion", "init", "--token", tokens["bf1.u.alice.…"], "--server", gw.address],
        env=env,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
    )
    assert init.returncode == 0, init.stderr
    yield env, home, table, tokens
    gw.kill(signal.SIGTERM)
    stop_leftovers(gw.state_dir)
    for held in (home / ".bitfusion" / "held").glob("*.json"):
        try:
            os.kill(json.loads(held.read_text())["holder_pid"], signal.SIGTERM)
        except (OSError, ValueError, KeyError):
            pass


# deployment.md builds a wheel and installs it into a venv: about 2 minutes beside other tests.
@pytest.mark.timeout(400)
@pytest.mark.parametrize("doc", DOC_FILES)
def test_every_command_in_the_docs_runs(doc: str, docs_pool) -> None:
    env, home, table, tokens = docs_pool
    text = (DOCS / doc).read_text()
    if "curl " in text and shutil.which("curl") is None:
        pytest.skip(f"{doc} calls the dashboard with curl, which is not installed")
    problems: list[str] = []
    for block in runnable_blocks(text):
        printed = ""
        for command in block.commands:
            real = substitute(command, {**table, **tokens})
            r = subprocess.run(
                ["bash", "-c", real],
                env=env,
                cwd=home,
                capture_output=True,
                text=True,
                timeout=COMMAND_TIMEOUT_S,
                stdin=subprocess.DEVNULL,
            )
            # Where the docs' gateway gpu1 is reached as gpu1:56001, a client names it gpu1;
            # here it is reached as 127.0.0.1:PORT, so the client adds the name: undo that.
            printed += (r.stdout + r.stderr).replace(f"{table['gpu1:56001']} (gpu1)", "gpu1")
            want = expected_status(command)
            ok = r.returncode != 0 if want is None else r.returncode == want
            if not ok:
                problems.append(
                    f"{doc}:{block.line}: `{command}` exited {r.returncode}, "
                    f"expected {'non-zero' if want is None else want}:\n{r.stdout}{r.stderr}"
                )
        for line in block.output:
            if not output_pattern(substitute(line, table)).search(printed):
                problems.append(
                    f"{doc}:{block.line}: the docs say the commands print\n  {line}\n"
                    f"but they printed:\n{printed}"
                )
    assert not problems, "\n\n".join(problems)


def test_every_doc_is_linked_from_the_docs_index() -> None:
    index = (DOCS / "README.md").read_text()
    missing = [d for d in DOC_FILES if d != "README.md" and f"({d})" not in index]
    assert not missing, f"docs/README.md does not link {missing}"


def test_the_install_in_the_readme_and_the_unit_is_the_one_the_docs_test_runs() -> None:
    """The package is not on PyPI: README and the unit's comments give the install that
    deployment.md's blocks run, line for line, and never `pip install bitfusion-jupyter`."""
    tested = {c.strip() for b in runnable_blocks((DOCS / "deployment.md").read_text())
              for c in b.commands}  # fmt: skip
    readme = (REPO / "README.md").read_text()
    readme_install = runnable_blocks(readme[readme.index("## Setting up a pool") :])[0].commands
    unit = (REPO / "systemd" / "bitfusion-gateway.service").read_text()
    unit_install = [
        line.removeprefix("#").strip()
        for line in unit.splitlines()
        if line.startswith("#   ")
        and ("wheel" in line or "/opt/bitfusion" in line or "clone" in line)
    ]
    assert len(readme_install) == 5 and len(unit_install) == 5
    assert set(readme_install) <= tested and set(unit_install) <= tested
    for text in (readme, unit, *(p.read_text() for p in DOCS.glob("*.md"))):
        assert "pip install bitfusion-jupyter" not in text
