"""``/metrics``: the cluster in Prometheus text format, made fresh for each scrape.

Memory is in MiB, as everywhere in Bitfusion; counters count since each gateway started.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

# counter name -> (the gateway's counter key, help)
COUNTERS = {
    "bitfusion_grants": ("grants", "Shares granted."),
    "bitfusion_refusals": ("refusals", "Share requests refused (no room, or can never fit)."),
    "bitfusion_lease_expiries": ("lease_expiries", "Shares freed because the holder vanished."),
    "bitfusion_idle_reclaims": ("idle_reclaims", "Shares reclaimed after the idle timeout."),
}
GPU_GAUGES = {
    "bitfusion_gpu_memory_total_mib": ("memory_total_mib", "GPU memory, MiB."),
    "bitfusion_gpu_memory_used_mib": ("memory_used_mib", "GPU memory in use (NVML), MiB."),
    "bitfusion_gpu_memory_shared_mib": ("memory_granted_mib", "GPU memory granted to shares, MiB."),
    "bitfusion_gpu_utilization_percent": ("utilization_pct", "GPU utilisation (NVML), percent."),
    "bitfusion_gpu_draining": ("draining", "1 while the GPU takes no new share."),
    "bitfusion_gpu_shares": ("shares", "Shares on the GPU."),
}


class _Snapshot:
    """A one-off collector of the cluster view (servers as served by /api/v1/cluster)."""

    def __init__(self, servers: list[dict[str, Any]], admin: bool) -> None:
        self.servers = servers
        self.admin = admin  # only an admin's scrape names owners (a user's has only their own)

    def collect(self) -> list[Metric]:
        up = GaugeMetricFamily(
            "bitfusion_server_up", "1 when the gateway answered.", labels=["server"]
        )
        queue = GaugeMetricFamily(
            "bitfusion_queue_length", "Requests waiting for room (--wait).", labels=["server"]
        )
        counters = {
            name: CounterMetricFamily(name, text, labels=["server"])
            for name, (_, text) in COUNTERS.items()
        }
        police = CounterMetricFamily(
            "bitfusion_police_events", "Policing actions on over-share processes.",
            labels=["server", "action"],
        )  # fmt: skip
        gpu = {
            name: GaugeMetricFamily(
                name, text, labels=["server", "gpu", "uuid", "name", "simulated"]
            )
            for name, (_, text) in GPU_GAUGES.items()
        }
        share_labels = ["server", "gpu", "uuid", "share", *(["owner"] if self.admin else [])]
        size = GaugeMetricFamily(
            "bitfusion_share_size_mib", "A share's memory on a GPU, MiB.", labels=share_labels
        )
        used = GaugeMetricFamily(
            "bitfusion_share_used_mib",
            "A share's memory in use on a GPU, MiB.",
            labels=share_labels,
        )
        for s in self.servers:
            server = s["address"]
            up.add_metric([server], 1.0 if s["state"] == "ok" else 0.0)
            if s["state"] != "ok":
                continue
            queue.add_metric([server], s.get("queued", 0))
            c = s.get("counters", {})
            for name, (key, _) in COUNTERS.items():
                counters[name].add_metric([server], c.get(key, 0))
            police.add_metric([server, "warn"], c.get("police_warn", 0))
            police.add_metric([server, "stop"], c.get("police_stop", 0))
            for g in s["gpus"]:
                labels = [
                    server,
                    str(g["index"]),
                    g["uuid"],
                    g["name"],
                    str(g["simulated"]).lower(),
                ]
                values = {**g, "shares": len(g["share_sizes_mib"]), "draining": int(g["draining"])}
                for name, (key, _) in GPU_GAUGES.items():
                    if values.get(key) is not None:
                        gpu[name].add_metric(labels, float(values[key]))
                for share in g["shares"]:
                    labels_s = [server, str(g["index"]), g["uuid"], share["share_id"]]
                    if self.admin:
                        labels_s.append(share["owner"])
                    size.add_metric(labels_s, share["mib"])
                    used.add_metric(labels_s, share["used_mib"])
        return [up, queue, *counters.values(), police, *gpu.values(), size, used]


def render(servers: list[dict[str, Any]], admin: bool) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(servers, admin))
    return generate_latest(registry)
