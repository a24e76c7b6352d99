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


def test_the_dashboard_and_the_jupyter_panel_show_the_same_gpu_and_the_same_share_on_it():
    from bitfusion_jupyter.pool_model import Answer, server_view

    gpu = {
        "index": 0, "uuid": "GPU-0", "name": "Sim", "simulated": True, "draining": False,
        "memory_total_mib": 16384, "memory_granted_mib": 6144, "memory_free_mib": 10240,
        "memory_used_mib": 900, "utilization_pct": 40, "shares": 2,
        "share_sizes_mib": [2048, 4096],
    }  # fmt: skip
    gpus = {"server": "gpu1", "version": "0.1.0", "simulated": True, "gpus": [gpu]}
    shares = {"server": "gpu1", "shares": [_share("s-a", [])]}
    dashboard = views.server_view("h:1", Reply("h:1", gpus), Reply("h:1", shares))["gpus"][0]
    panel = server_view(Answer("h:1", gpus=gpus, shares=shares, user="alice"))["gpus"][0]
    both = set(dashboard) & set(panel)
    assert both >= {"index", "memory_granted_mib", "memory_used_mib", "utilization_pct"}
    assert {k: panel[k] for k in both if k != "shares"} == {
        k: dashboard[k] for k in both if k != "shares"
    }
    assert dashboard["shares"] == [{"share_id": "s-a", "owner": "alice", "mib": 2048,
                                    "used_mib": 700}]  # fmt: skip
    assert panel["mine"] == [{"share_id": "s-a", "mib": 2048, "used_mib": 700,
                              "kernel_id": None}]  # fmt: skip
    assert panel["others_mib"] == 4096
