"""What the dashboard says runs in a share, and how the shares table is ordered."""

from gateway.web import views
from gateway.web.cluster import Reply


def _share(share_id, processes, created=100.0):
    return {
        "share_id": share_id, "owner": "alice", "client_host": "laptop", "created": created,
        "idle_s": 3.0, "usage_mib": {"0": 700},
        "gpus": [{"index": 0, "name": "Sim", "mib": 2048, "simulated": True}],
        "processes": processes,
    }  # fmt: skip


def test_a_share_says_whether_a_kernel_a_command_or_nothing_runs_in_it():
    kernel = {"proc_id": "p1", "argv": ["python", "-m", "ipykernel_launcher"], "pid": 1,
              "kernel": "python3"}  # fmt: skip
    command = {"proc_id": "p2", "argv": ["python", "train.py"], "pid": 2, "kernel": None}
    assert views.what_runs(_share("s-1", [kernel])) == "kernel python3"
    assert views.what_runs(_share("s-2", [command])) == "python train.py"
    assert views.what_runs(_share("s-3", [])) == "nothing (held)"


def test_the_shares_table_lists_each_servers_shares_oldest_first_with_their_usage():
    reply = Reply("h:1", {"server": "gpu1", "shares": [_share("new", [], 150.0),
                                                         _share("old", [], 100.0)]})  # fmt: skip
    rows = views.shares_view({"h:1": reply}, now=200.0)
    assert [(r["share_id"], r["age_s"], r["hostname"]) for r in rows] == [
        ("old", 100.0, "gpu1"),
        ("new", 50.0, "gpu1"),
    ]
    assert rows[0]["gpus"][0]["used_mib"] == 700
