"""Share and process ids are short, and never one that the ledger has already used."""

from gateway import ledger as ledger_module
from gateway.gpus import GpuInfo
from gateway.ledger import Ledger
from remoting.shares import Want


def test_a_new_share_never_gets_the_id_of_an_ended_one(tmp_path, monkeypatch):
    # 8 hex digits collide after some 10^4 shares (the load run met one); force it here.
    ledger = Ledger(tmp_path / "ledger.sqlite3", [GpuInfo(0, "GPU-0", "Sim", 16384, True)])
    try:
        first = ledger.grant("alice", "h", {0: 1024}, Want(1, 1024, None), 30, False)
        ledger.release(first.id, "done")
        draws = iter([first.id[2:], first.id[2:], "0000beef"])
        monkeypatch.setattr(ledger_module.secrets, "token_hex", lambda n: next(draws))
        second = ledger.grant("bob", "h", {0: 1024}, Want(1, 1024, None), 30, False)
        assert second.id == "s-0000beef"
    finally:
        ledger.close()
