"""GPU history for the dashboard: memory used and granted, and utilisation, over time.

Two series are kept in the state database: the last hour at a 10 s step and the last day
at a 5 min step. Each is trimmed as it is written, so the table stays a few hundred rows a
series whatever the uptime.
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

# range -> (step in seconds, samples kept)
RANGES: dict[str, tuple[int, int]] = {"hour": (10, 360), "day": (300, 288)}

SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (range TEXT NOT NULL, t REAL NOT NULL, gpus TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS samples_range_t ON samples(range, t);
"""


class History:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.db.executescript(SCHEMA)
        self._last = {
            r: (self.db.execute("SELECT MAX(t) FROM samples WHERE range=?", (r,)).fetchone()[0])
            or 0.0
            for r in RANGES
        }

    def record(self, gpus: list[dict[str, Any]], now: float | None = None) -> None:
        """Offer a sample (per GPU: index, used_mib, granted_mib, utilization_pct); each
        series takes it when its step has passed."""
        now = time.time() if now is None else now
        for name, (step, keep) in RANGES.items():
            if now - self._last[name] < step:
                continue
            self._last[name] = now
            self.db.execute("INSERT INTO samples VALUES (?,?,?)", (name, now, json.dumps(gpus)))
            self.db.execute(
                "DELETE FROM samples WHERE range=? AND t < ?", (name, now - step * keep)
            )

    def samples(self, name: str) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT t, gpus FROM samples WHERE range=? ORDER BY t", (name,)
        ).fetchall()
        return [{"t": t, "gpus": json.loads(gpus)} for t, gpus in rows]
