"""Allocate+release round trips per second, 1 and 50 concurrent clients, against a baseline.

The baseline, measured in the same run on the same machine: a bare CurveZMQ DEALER/ROUTER
echo with the same message sizes (what our protocol costs on top of the transport).
Each client is its own process (as users' clients are), so Python's GIL does not cap the sum.

    python bench/alloc_release.py [--seconds 5] [--clients 50]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import threading
import time
from pathlib import Path

import zmq

from gateway.spawned import SpawnedGateway, free_port
from remoting import tokens
from remoting.client import GatewayConnection


def echo_server(port: int, public: bytes, secret: bytes, stop: threading.Event) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.curve_server, sock.curve_publickey, sock.curve_secretkey = True, public, secret
    sock.bind(f"tcp://127.0.0.1:{port}")
    while not stop.is_set():
        if sock.poll(100):
            sock.send_multipart(sock.recv_multipart())
    sock.close(0)
    ctx.term()


def echo_client(port: int, public: bytes, seconds: float, out: mp.Queue) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.curve_serverkey = public
    sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
    sock.connect(f"tcp://127.0.0.1:{port}")
    msg = [b"BF1", b'{"type":"allocate","token":"' + b"t" * 110 + b'","id":1,"gpus":1,"mib":1}']
    sock.send_multipart(msg)
    sock.recv_multipart()
    n, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(2):  # allocate and release: two round trips
            sock.send_multipart(msg)
            sock.recv_multipart()
        n += 1
    out.put(n)
    sock.close(0)
    ctx.term()


def pool_client(address: str, token: str, seconds: float, out: mp.Queue) -> None:
    conn = GatewayConnection(address, tokens.parse(token), timeout=30)
    n, refused, end = 0, 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        try:
            share = conn.request("allocate", gpus=1, mib=256, client_host="bench")["share"]
            conn.request("release", share_id=share["share_id"])
            n += 1
        except Exception:
            refused += 1
    out.put(n)
    conn.close()


def run_clients(target, args, clients: int, seconds: float) -> float:
    out: mp.Queue = mp.Queue()
    procs = [mp.Process(target=target, args=(*args, seconds, out)) for _ in range(clients)]
    for p in procs:
        p.start()
    total = sum(out.get(timeout=seconds + 60) for _ in procs)
    for p in procs:
        p.join()
    return total / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=50)
    args = parser.parse_args()

    public, secret = zmq.curve_keypair()
    echo_port, stop = free_port(), threading.Event()
    echo = threading.Thread(target=echo_server, args=(echo_port, public, secret, stop))
    echo.start()
    with tempfile.TemporaryDirectory() as tmp:
        gw = SpawnedGateway(
            Path(tmp) / "state",
            free_port(),
            ["--simulate-gpus", "8x80GiB"],
            log_path=Path(tmp) / "gateway.log",
        )
        gw.start()
        token = gw.token("bench")
        rows = []
        try:
            for clients in (1, args.clients):
                print(f"measuring {clients} client(s) for {args.seconds:g} s each...", flush=True)
                base = run_clients(echo_client, (echo_port, public), clients, args.seconds)
                ours = run_clients(pool_client, (gw.address, token), clients, args.seconds)
                rows.append((clients, ours, base, ours / base))
        finally:
            gw.stop()
            stop.set()
            echo.join()
    print()
    print(f"{'clients':>7}  {'allocate+release/s':>18}  {'raw CurveZMQ 2×RTT/s':>20}  {'ratio':>6}")
    for clients, ours, base, ratio in rows:
        print(f"{clients:>7}  {ours:>18.0f}  {base:>20.0f}  {ratio:>6.2f}")
    print(
        f"\ngoal: >= 1000 allocate+release/s for one client: "
        f"{'met' if rows[0][1] >= 1000 else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
