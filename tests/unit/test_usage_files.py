"""The per-share usage file a kernel's widget reads."""

import json

from gateway import usage_files


def test_a_lease_is_held_while_renewed_and_in_grace_after_missed_renewals():
    now = 1000.0
    assert usage_files.lease_state(now + 29, 30, now) == "held"
    assert usage_files.lease_state(now + 14, 30, now) == "grace"
    assert usage_files.lease_state(now - 1, 30, now) == "grace"


def test_files_of_ended_shares_are_removed_and_others_kept(tmp_path):
    gpu = {"index": 1, "uuid": "GPU-x", "name": "Sim", "mib": 4096, "total_mib": 16384,
           "simulated": True}  # fmt: skip

    def content(share):
        return usage_files.record(
            share_id=share, server="h:1", lease="held", gpus=[gpu], used_mib={1: 300},
            utilization={1: 7},
        )  # fmt: skip

    usage_files.write_all(tmp_path, {"live": content("live"), "gone": content("gone")})
    assert usage_files.path_for(tmp_path, "gone").exists()
    usage_files.write_all(tmp_path, {"live": content("live")})  # "gone" ended
    assert not usage_files.path_for(tmp_path, "gone").exists()
    seen = json.loads(usage_files.path_for(tmp_path, "live").read_text())
    assert seen["simulated"] is True
    assert seen["gpus"] == [
        {"index": 1, "uuid": "GPU-x", "name": "Sim", "mib": 4096, "used_mib": 300,
         "utilization_pct": 7, "memory_total_mib": 16384, "simulated": True}
    ]  # fmt: skip
