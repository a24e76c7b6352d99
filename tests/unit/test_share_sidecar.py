"""The files the shim keeps beside a kernel's connection file for the panel."""

import os
import time

from bitfusion_jupyter import share_sidecar


def test_prune_removes_only_old_files_of_kernels_that_are_gone(tmp_path):
    live = tmp_path / "kernel-live.json"
    live.write_text("{}")
    for kernel in ("live", "gone", "fresh"):
        share_sidecar.write_notice(tmp_path / f"kernel-{kernel}.json", {"action": "kernel_stopped"})
    share_sidecar.write(
        tmp_path / "kernel-gone.json", "h:1", {"share_id": "s", "gpus": []}, "python3", 10
    )
    old = time.time() - 3600
    for name in ("kernel-live", "kernel-gone"):
        for suffix in (share_sidecar.SUFFIX, share_sidecar.NOTICE_SUFFIX):
            if (path := tmp_path / f"{name}{suffix}").exists():
                os.utime(path, (old, old))
    (tmp_path / "other.bitfusion-notice.json").write_text("{}")  # not a kernel's: not ours
    share_sidecar.prune(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "kernel-fresh.bitfusion-notice.json",  # may still be restarted
        "kernel-live.bitfusion-notice.json",  # its kernel still runs
        "kernel-live.json",
        "other.bitfusion-notice.json",
    ]
