"""`run-tests` (the README's test command) runs every folder of tests, each in one of its two
runs: a new folder left out of both would never run in CI."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_every_folder_of_tests_is_in_exactly_one_run() -> None:
    script = (REPO / "run-tests").read_text()
    runs = [
        re.findall(r"\btests/(\w+)", line)
        for line in script.splitlines()
        if line.startswith("python3 -m pytest") or line.startswith("    tests/")
    ]
    named = [folder for run in runs for folder in run]
    folders = sorted(
        d.name for d in (REPO / "tests").iterdir() if d.is_dir() and any(d.glob("test_*.py"))
    )
    assert sorted(named) == folders, f"run-tests names {named}; the test folders are {folders}"
