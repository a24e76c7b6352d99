"""The bytecode kept for the client's folder in the user's server home does not grow for ever:
at most once a day, what has gone unused for 30 days is dropped."""

import os
import time
from pathlib import Path

from gateway.share_site import bitfusion_folder_bytecode as bytecode

DAY = 86400


def _pyc(path: Path, age_days: float, now: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"bytecode")
    then = now - age_days * DAY
    os.utime(path, (then, then))
    return path


def test_bytecode_unused_for_a_month_goes_and_the_rest_stays(tmp_path):
    now = time.time()
    prefix = tmp_path / "pycache"
    old = _pyc(prefix / "home/alice/old-project/helper.cpython-311.pyc", 40, now)
    recent = _pyc(prefix / "home/alice/project/train.cpython-311.pyc", 3, now)
    other = prefix / "home/alice/project/notes.txt"
    other.write_text("not ours to judge")
    os.utime(other, (now - 40 * DAY, now - 40 * DAY))
    bytecode.prune(str(prefix), now)
    assert not old.exists() and not old.parent.exists()  # its emptied folder went too
    assert recent.exists() and other.exists()


def test_it_prunes_at_most_once_a_day(tmp_path):
    now = time.time()
    prefix = tmp_path / "pycache"
    _pyc(prefix / "a/m.cpython-311.pyc", 40, now)
    bytecode.prune(str(prefix), now)
    again = _pyc(prefix / "b/m.cpython-311.pyc", 40, now)
    bytecode.prune(str(prefix), now + DAY / 2)
    assert again.exists()  # not yet a day since the last time
    bytecode.prune(str(prefix), now + DAY + 1)
    assert not again.exists()


def test_no_cache_yet_is_left_alone(tmp_path):
    bytecode.prune(str(tmp_path / "pycache"))
    assert not (tmp_path / "pycache").exists()
