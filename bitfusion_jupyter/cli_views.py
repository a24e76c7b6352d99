"""What `list_gpus`, `smi`, `health` and `list_shares` print: tables, or JSON for scripts."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from bitfusion_jupyter.pool import Pool
from remoting.client import GatewayError, server_label
from remoting.util import tables

SIM = "SIMULATED"


def _kind(simulated: bool) -> str:
    return SIM if simulated else "real"


def _errors(answers: list[tuple[str, Any]]) -> list[str]:
    return [ans.told() for _, ans in answers if isinstance(ans, GatewayError)]


def _emit_json(answers: list[tuple[str, Any]], key: str = "data") -> None:
    out = [
        {"server": s, "ok": False, "error": str(a), "code": a.code}
        if isinstance(a, GatewayError)
        else {"server": s, "ok": True, key: a}
        for s, a in answers
    ]
    print(json.dumps(out, indent=2))


def _finish(answers: list[tuple[str, Any]]) -> int:
    errors = _errors(answers)
    for line in errors:
        print(f"bitfusion: {line}", file=sys.stderr)
    return 1 if errors else 0


def list_gpus(pool: Pool, as_json: bool) -> int:
    answers = pool.ask_all("list_gpus")
    if as_json:
        _emit_json(answers)
        return 1 if _errors(answers) else 0
    rows = []
    for server, ans in answers:
        if isinstance(ans, GatewayError):
            continue
        for g in ans["gpus"]:
            rows.append(
                [
                    server,
                    g["index"],
                    g["name"],
                    g["memory_total_mib"],
                    g["memory_free_mib"],
                    g["shares"],
                    _kind(g["simulated"]) + (" draining" if g["draining"] else ""),
                ]
            )
    if rows:
        print(
            tables.render(
                ["SERVER", "GPU", "NAME", "TOTAL MiB", "FREE MiB", "SHARES", "KIND"],
                rows,
                right=(1, 3, 4, 5),
            )
        )
    if any(not isinstance(a, GatewayError) and a["simulated"] for _, a in answers):
        print("(SIMULATED GPUs are a stand-in pool for machines without a GPU.)")
    for server, ans in answers:  # a server whose shares are not sandboxed says so, always
        sandbox = {} if isinstance(ans, GatewayError) else ans.get("sandbox") or {}
        if sandbox and not sandbox.get("sandboxed"):
            print(f"{server}: shares {sandbox['line']}")
    return _finish(answers)


def smi(pool: Pool, as_json: bool) -> int:
    answers = pool.ask_all("smi")
    if as_json:
        _emit_json(answers)
        return 1 if _errors(answers) else 0
    for server, ans in answers:
        if isinstance(ans, GatewayError):
            continue
        mps = "on" if ans["mps"] else "off"
        tag = "  [SIMULATED pool]" if ans["simulated"] else ""
        print(
            f"{server_label(server, ans['server'])}: driver {ans['driver']}, "
            f"CUDA {ans['cuda'] or '-'}, MPS {mps}{tag}"
        )
        rows = [
            [
                g["index"],
                g["name"],
                f"{g['memory_used_mib'] or 0}/{g['memory_total_mib']}",
                g["memory_granted_mib"],
                _pct(g["utilization_pct"]),
                _unit(g["temperature_c"], "C"),
                _unit(g["power_w"], "W"),
                g["shares"],
            ]
            for g in ans["gpus"]
        ]
        print(
            tables.render(
                ["GPU", "NAME", "USED/TOTAL MiB", "SHARED MiB", "UTIL", "TEMP", "POWER", "SHARES"],
                rows,
                right=(0, 2, 3, 4, 5, 6, 7),
            )
        )
        if ans["processes"]:
            prow = [
                [p["gpu"], p["pid"] or "-", p["share_id"] or "(not yours)", p["mib"]]
                for p in ans["processes"]
            ]
            print(tables.render(["GPU", "PID", "SHARE", "MiB"], prow, right=(0, 1, 3)))
        else:
            print("No processes use these GPUs.")
        print()
    return _finish(answers)


def _pct(v: Any) -> str:
    return "-" if v is None else f"{v}%"


def _unit(v: Any, unit: str) -> str:
    return "-" if v is None else f"{v:g}{unit}" if isinstance(v, float) else f"{v}{unit}"


def health(pool: Pool, as_json: bool) -> int:
    results = []
    for server in pool.servers:
        row: dict[str, Any] = {"server": server}
        try:
            conn = pool.connect(server)
            first = conn.request("hello")  # includes connecting and the handshake
            start = time.perf_counter()
            conn.request("hello")
            row.update(
                reachable=True,
                token_accepted=True,
                rtt_ms=round((time.perf_counter() - start) * 1000, 2),
                version=first["version"],
                user=first["user"],
                admin=first["admin"],
                simulated=first["simulated"],
                name=first["server"],
            )
        except GatewayError as exc:
            # A token of another pool fails the encrypted handshake: the server did answer.
            row.update(reachable=exc.state != "unreachable", token_accepted=False, error=exc.told())
        results.append(row)
    if as_json:
        print(json.dumps(results, indent=2))
    else:
        rows = [
            [
                r["server"],
                "yes" if r["reachable"] else "NO",
                f"{r['rtt_ms']:.2f} ms" if "rtt_ms" in r else "-",
                r.get("version", "-"),
                "accepted" if r["token_accepted"] else ("REFUSED" if r["reachable"] else "-"),
                r.get("user", "-") + (" (admin)" if r.get("admin") else ""),
                (_kind(r["simulated"]) if "simulated" in r else "-"),
            ]
            for r in results
        ]
        print(
            tables.render(
                ["SERVER", "REACHABLE", "RTT", "VERSION", "TOKEN", "USER", "POOL"], rows, right=(2,)
            )
        )
        for r in results:
            if "error" in r:
                print(f"bitfusion: {r['error']}", file=sys.stderr)
    return 0 if all(r["token_accepted"] for r in results) else 1


def list_shares(pool: Pool, as_json: bool) -> int:
    answers = pool.ask_all("list_shares")
    if as_json:
        _emit_json(answers)
        return 1 if _errors(answers) else 0
    rows, events, packages = [], [], []
    for server, ans in answers:
        if isinstance(ans, GatewayError):
            continue
        packages += [[server, p["name"], p["version"]] for p in ans.get("packages", [])]
        for s in ans["shares"]:
            usage = s["usage_mib"]
            for g in s["gpus"]:
                rows.append(
                    [
                        server,
                        s["share_id"],
                        s["owner"],
                        g["index"],
                        g["name"],
                        g["mib"],
                        usage.get(str(g["index"]), 0),
                        len(s["processes"]),
                        f"{s['lease_expires_in']:g} s",
                    ]
                )
        events += [(server, e) for e in ans["events"]]
    if rows:
        print(
            tables.render(
                [
                    "SERVER",
                    "SHARE",
                    "OWNER",
                    "GPU",
                    "NAME",
                    "SHARE MiB",
                    "USED MiB",
                    "PROCS",
                    "LEASE",
                ],
                rows,
                right=(3, 5, 6, 7),
            )
        )
    else:
        print("No shares are held.")
    if events:
        print("\nRecent events:")
        erows = [
            [
                time.strftime("%H:%M:%S", time.localtime(e["ts"])),
                server,
                e["kind"],
                e["share_id"] or "-",
                e["detail"],
            ]
            for server, e in events[:15]
        ]
        print(tables.render(["TIME", "SERVER", "EVENT", "SHARE", "DETAIL"], erows))
    if packages:
        print(
            "\nPackages you installed (pip in a share; for you alone, in your home on that "
            "server; reset: bitfusion run -- sh -c 'rm -rf ~/.local/share/bitfusion/envs'):"
        )
        print(tables.render(["SERVER", "PACKAGE", "VERSION"], packages))
    return _finish(answers)
