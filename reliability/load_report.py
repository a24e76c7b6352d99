"""The load run's figures: gathered into one JSON-able dict, and printed as a table."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from reliability.load_checker import Checker, Records

OPERATIONS = ("allocate", "renew", "list_shares", "spawn", "release")
MAX_ERRORS_SHOWN = 50


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _latency(values: list[float]) -> dict[str, Any]:
    p50, p99 = percentile(values, 0.50), percentile(values, 0.99)
    return {
        "n": len(values),
        "p50": round(p50, 2) if p50 is not None else None,
        "p99": round(p99, 2) if p99 is not None else None,
        "max": round(max(values), 2) if values else None,
    }


def summarize(
    recs: Records,
    rss: list[float],
    held_at_kill: int,
    checker: Checker,
    elapsed: float,
    leaked: list[dict],
) -> dict[str, Any]:
    """``rss``: the gateway's resident MiB, sampled; ``held_at_kill``: the shares the killed
    worker held."""
    with recs.lock:
        latency = {k: list(v) for k, v in recs.latency.items()}
        counts = dict(recs.counts)
        errors = list(recs.errors)
        record_delay = recs.record_delay_max_s
    latency.update(checker.latency)
    ops = {k: len(latency.get(k, [])) for k in OPERATIONS}
    total = sum(ops.values())
    counters = checker.last_gpus.get("counters", {})
    freed = checker.freed_after_death_s
    return {
        "seconds": round(elapsed, 1),
        "operations": ops,
        "operations_total": total,
        "ops_per_s": round(total / elapsed, 1) if elapsed > 0 else 0.0,
        "commands_run": len(latency.get("spawn→exit", [])),
        "refusals": {
            "no_fit": counts.get("refused_no_fit", 0),
            "never_fits": counts.get("refused_never_fits", 0),
        },
        "unexpected_errors": counts.get("unexpected", 0),
        "errors": errors[:MAX_ERRORS_SHOWN],
        "latency_ms": {k: _latency(v) for k, v in sorted(latency.items())},
        "gateway_rss_mib": {
            "start": round(rss[0], 1) if rss else None,
            "peak": round(max(rss), 1) if rss else None,
            "end": round(rss[-1], 1) if rss else None,
        },
        "invariant": {
            "checks": checker.checks,
            "violations": checker.violation_count,
            "details": checker.violations,
        },
        "dead_holders": {
            "killed_worker_held": held_at_kill,
            "dropped": counts.get("abandoned", 0),
            "dropped_with_process": counts.get("abandoned_running", 0),
            "released_with_stubborn_process": counts.get("released_running", 0),
            "freed_seen": len(freed),
            "freed_after_death_max_s": round(max(freed), 2) if freed else None,
            "gateway_lease_expiries": counters.get("lease_expiries"),
        },
        "gateway_counters": counters,
        "record_delay_max_s": round(record_delay, 3),
        "leaked_shares": [s["share_id"] for s in leaked],
    }


def log_problems(log: str) -> dict[str, Any]:
    """What in the gateway's log is a bug: tracebacks, internal errors, ERROR lines."""
    lines = log.splitlines()
    bad = [
        i
        for i, line in enumerate(lines)
        if "Traceback" in line or "internal error" in line or " ERROR " in line
    ]
    return {
        "tracebacks": sum("Traceback" in line for line in lines),
        "internal_errors": sum("internal error" in line for line in lines),
        "error_lines": sum(" ERROR " in line for line in lines),
        "warnings": sum(" WARNING " in line for line in lines),
        "excerpts": ["\n".join(lines[i : i + 12]) for i in bad[:5]],
    }


def verdict(figures: dict[str, Any]) -> bool:
    log = figures["gateway_log"]
    return (
        figures["invariant"]["violations"] == 0
        and figures["unexpected_errors"] == 0
        and not figures["leaked_shares"]
        and not figures["expired_live"]
        and log["tracebacks"] == 0
        and log["internal_errors"] == 0
        and log["error_lines"] == 0
    )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def print_report(f: dict[str, Any]) -> None:
    cfg, lat = f["config"], f["latency_ms"]
    print(
        f"\nLoad: {cfg['clients']} clients for {f['seconds']:g} s on a simulated "
        f"{cfg['gpus']} × {cfg['gpu_gib']} GiB pool, lease grace {cfg['lease_s']:g} s\n"
    )
    print(f"{'request':<20} {'count':>9} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9}")
    for kind in [*OPERATIONS, "spawn→exit", "admin list_gpus", "admin list_shares"]:
        row = lat.get(kind, {"n": 0, "p50": None, "p99": None, "max": None})
        print(
            f"{kind:<20} {row['n']:>9,} {_ms(row['p50']):>9} {_ms(row['p99']):>9} "
            f"{_ms(row['max']):>9}"
        )
    print(f"{'client total':<20} {f['operations_total']:>9,}  ({f['ops_per_s']:,.0f}/s)\n")
    ref, dead, rss = f["refusals"], f["dead_holders"], f["gateway_rss_mib"]
    inv, log = f["invariant"], f["gateway_log"]
    print(
        f"refusals (all clear): no_fit {ref['no_fit']:,}, never_fits {ref['never_fits']:,}\n"
        f"unexpected errors: {f['unexpected_errors']}\n"
        f"invariant: {inv['checks']:,} checks, {inv['violations']} violations\n"
        f"dead holders: the killed worker's clients held {dead['killed_worker_held']}, "
        f"{dead['dropped']} shares dropped ({dead['dropped_with_process']} with a process "
        f"running); {dead['freed_seen']} freed by lease expiry, the last "
        f"{_ms(dead['freed_after_death_max_s'])} s after its holder died; the gateway "
        f"counted {dead['gateway_lease_expiries']} lease expiries\n"
        f"gateway RSS MiB: start {_ms(rss['start'])}, peak {_ms(rss['peak'])}, "
        f"end {_ms(rss['end'])}\n"
        f"gateway log: {log['tracebacks']} tracebacks, {log['internal_errors']} internal "
        f"errors, {log['error_lines']} ERROR lines, {log['warnings']} warnings\n"
        f"leaked shares: {len(f['leaked_shares'])}; live holders' shares expired: "
        f"{len(f['expired_live'])}"
    )
    for text in f["expired_live"][:10]:
        print(f"  EXPIRED WITH A LIVE HOLDER {text}")
    for text in inv["details"][:10]:
        print(f"  VIOLATION {text}")
    for text in f["errors"][:10]:
        print(f"  ERROR {text}")
    for text in log["excerpts"]:
        print(f"  GATEWAY LOG {text}")
    print(f"\nresult: {'OK' if f['ok'] else 'FAILED'}")
