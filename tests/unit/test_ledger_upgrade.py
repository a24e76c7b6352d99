"""A gateway upgraded over an older state database keeps its shares and processes."""

import sqlite3

from gateway.gpus import GpuInfo
from gateway.ledger import Ledger

# The processes table as the first release shipped it (no kernel column).
OLD_SCHEMA = """
CREATE TABLE shares (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, client_host TEXT NOT NULL,
    gpus TEXT NOT NULL, whole INTEGER NOT NULL, created REAL NOT NULL,
    lease_expires REAL NOT NULL, release_on_exit INTEGER NOT NULL,
    state TEXT NOT NULL, ended REAL, end_reason TEXT
);
CREATE TABLE processes (
    id TEXT PRIMARY KEY, share_id TEXT NOT NULL, argv TEXT NOT NULL,
    socket_path TEXT, status_path TEXT, nanny_pid INTEGER, pid INTEGER,
    state TEXT NOT NULL, exit_code INTEGER, started REAL NOT NULL
);
INSERT INTO shares VALUES ('s-1', 'alice', 'h', '{"0": 2048}', 0, 1.0, 9e9, 0, 'active',
    NULL, NULL);
INSERT INTO processes VALUES ('p-1', 's-1', '["sleep", "9"]', NULL, NULL, NULL, 4242,
    'running', NULL, 1.0);
"""


def test_an_old_state_database_is_upgraded_in_place(tmp_path):
    db = tmp_path / "ledger.sqlite3"
    with sqlite3.connect(db) as conn:
        conn.executescript(OLD_SCHEMA)
    gpus = [GpuInfo(0, "GPU-0", "Sim", 16384, simulated=True)]
    ledger = Ledger(db, gpus)
    try:
        assert ledger.shares["s-1"].gpus == {0: 2048}
        assert ledger.processes["p-1"].pid == 4242 and ledger.processes["p-1"].kernel is None
        ledger.set_draining(0, True)
    finally:
        ledger.close()
    again = Ledger(db, gpus)
    assert again.draining == {0}
    again.close()
