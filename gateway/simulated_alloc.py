"""``python -m gateway.simulated_alloc MIB [--seconds S]``: hold simulated GPU memory.

Run inside a share on a simulated pool, it claims MIB MiB on each GPU the share sees, the way a
real program would allocate GPU memory, so that the gateway's accounting and policing can be
seen at work without a GPU. The claim is a file the gateway's SimulatedInventory reads; it is
removed when this process ends (and ignored by the gateway if it is killed outright).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from gateway import simulated_claims
from remoting.json_file import write_json

EXIT_USAGE = 2


def _fail(message: str) -> int:
    print(f"simulated_alloc: {message}", file=sys.stderr)
    return EXIT_USAGE


class NotASimulatedShare(RuntimeError):
    pass


def _where() -> tuple[list[str], Path]:
    """The share's simulated GPUs (UUIDs) and the folder its claims go to."""
    uuids = [u.strip() for u in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if u.strip()]
    usage_dir = os.environ.get("BITFUSION_SIMULATED_USAGE_DIR", "")
    if not uuids or not usage_dir:
        raise NotASimulatedShare(
            "this is not a share on a simulated pool (CUDA_VISIBLE_DEVICES and "
            "BITFUSION_SIMULATED_USAGE_DIR are not both set); run it with "
            "`bitfusion run -- python -m gateway.simulated_alloc MIB`."
        )
    if not all(u.startswith("GPU-") for u in uuids):
        raise NotASimulatedShare(f"CUDA_VISIBLE_DEVICES={','.join(uuids)} does not list GPU UUIDs.")
    if not Path(usage_dir).is_dir():
        raise NotASimulatedShare(f"the simulated usage directory {usage_dir} does not exist.")
    return uuids, Path(usage_dir)


def hold(mib: int) -> Path:
    """Claim ``mib`` MiB on each GPU of the share for this process, as a notebook cell would
    with ``torch.empty``; it counts until the process ends or the returned file is removed."""
    uuids, usage_dir = _where()
    claim = usage_dir / f"{simulated_claims.claim_name()}.json"
    write_json(claim, {u: mib for u in uuids})
    return claim


def _on_signal(signum: int, _frame: object) -> None:
    # Unwind through the finally below so the claim is removed.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.simulated_alloc",
        description="Hold simulated GPU memory on every GPU of a simulated share.",
    )
    parser.add_argument("mib", type=int, metavar="MIB", help="MiB to hold on each visible GPU")
    parser.add_argument("--seconds", type=float, help="hold that long (default: until killed)")
    args = parser.parse_args(argv)
    if args.mib < 0:
        return _fail(f"MIB must be 0 or more, not {args.mib}.")
    try:
        uuids, _ = _where()
    except NotASimulatedShare as exc:
        return _fail(str(exc))

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    claim = hold(args.mib)  # written whole: never read half-written
    try:
        print(f"allocated {args.mib} MiB on {', '.join(uuids)} (simulated)", flush=True)
        if args.seconds is not None:
            time.sleep(max(args.seconds, 0))
        else:
            while True:
                time.sleep(3600)
    finally:
        claim.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
