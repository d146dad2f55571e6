"""Soak: steady gRPC load with a mix of adapters and periodic uploads/removals. Prints one JSON object.

  python -m bench.soak [--minutes 10] [--concurrency 8] [--adapters 16] [--upload-every 20]

A local service (embedded Ray, loopback) on the default base; `concurrency` requests always in
flight, each naming a random live adapter, on real FLIP sequences (50-500 residues). Every
`upload-every` seconds a new adapter is published and the oldest upload removed, so the registry
keeps its size. Reported per 30 s window: requests, errors, p99 latency, the replica's resident
memory. Pass criteria (issue 6): errors == 0 and resident memory growth after warm-up < 5%.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import threading
import time
from pathlib import Path

from bench.engine import publish_random_adapters, sequences
from bench.grpc import InFlight, percentile
from serving.serve.ports import free_port
from modeling import registry as store
from modeling.base import load_base
from serving import serve as service

WINDOW_S = 30


def replica_rss_mb() -> float:
    """Resident memory of the Serve replica process(es), read from /proc."""
    total = 0.0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if b"ServeReplica:esm-adapters" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                continue
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            continue
    return round(total, 1)


class Load:
    """Calls a random live adapter with a random sequence, `concurrency` calls in flight, until stopped."""

    def __init__(self, target: str, seqs: list[str], concurrency: int, live: list[str]):
        self.flight = InFlight(target, concurrency)
        self.seqs, self.live = seqs, live
        self.lock, self.stop = threading.Lock(), threading.Event()
        self.rng = random.Random(0)

    def run(self) -> None:
        while not self.stop.is_set():
            with self.lock:
                adapter = self.rng.choice(self.live)
            self.flight.send(adapter, self.rng.choice(self.seqs))

    def retire(self, name: str) -> None:
        """Stop naming an adapter (calls already sent may still be in flight)."""
        with self.lock:
            self.live.remove(name)

    def add(self, name: str) -> None:
        with self.lock:
            self.live.append(name)


def window_stats(records: list, since: float, t_s: int) -> dict:
    recent = [r for r in records if r[0] >= since]
    return {"t_s": t_s, "requests": len(recent), "errors": sum(error is not None for *_, error in recent),
            "p99_ms": round(percentile([seconds for _, seconds, _ in recent], 99) * 1000, 1) if recent else None,
            "replica_rss_mb": replica_rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--upload-every", type=float, default=20)
    parser.add_argument("--base")
    args = parser.parse_args()
    base = load_base(args.base)
    out: dict = {"machine": f"{os.cpu_count()} cores, device cpu", "base": base.name, "minutes": args.minutes,
                 "concurrency": args.concurrency, "adapters": args.adapters, "upload_every_s": args.upload_every}
    with tempfile.TemporaryDirectory() as tmp:
        registry = Path(tmp) / "adapters"
        names = publish_random_adapters(base, registry, args.adapters, 16)
        grpc_port = free_port()
        service.start({"registry": str(registry), "base": args.base}, grpc_port, free_port(), num_cpus=0.5,
                      ray_cpus=2, http_port=free_port())
        load = Load(f"127.0.0.1:{grpc_port}", sequences(200, seed=1), args.concurrency, list(names))
        driver = threading.Thread(target=load.run, daemon=True)
        start = time.perf_counter()
        driver.start()
        uploads, windows, uploaded = 0, [], []  # uploaded: the uploads not yet removed
        next_upload, next_window = start + args.upload_every, start + WINDOW_S
        try:
            while time.perf_counter() - start < args.minutes * 60:
                time.sleep(0.5)
                now = time.perf_counter()
                if now >= next_upload:  # publish one, retire the oldest upload (stop naming it first)
                    uploaded.append(publish_random_adapters(base, registry, 1, 16, prefix=f"soak{uploads}-")[0])
                    uploads += 1
                    time.sleep(1.0)  # visible to the replica within its 0.5 s poll
                    load.add(uploaded[-1])
                    if len(uploaded) > 4:
                        load.retire(uploaded[0])
                        time.sleep(0.5)  # let calls already naming it finish
                        store.remove(registry, uploaded.pop(0))
                    next_upload += args.upload_every
                if now >= next_window:
                    windows.append(window_stats(load.flight.records, next_window - WINDOW_S, round(now - start)))
                    next_window += WINDOW_S
        finally:
            load.stop.set()
            driver.join(timeout=60)
            load.flight.close()
            service.stop()
    errors = [error for *_, error in load.flight.records if error is not None]
    warm = [w for w in windows if w["t_s"] >= max(60, args.minutes * 60 * 0.2)] or windows
    out.update(requests=len(load.flight.records), errors=len(errors), error_codes=sorted(set(errors)),
               uploads=uploads, removals=uploads - len(uploaded), windows=windows,
               p99_ms_after_warmup={"first": warm[0]["p99_ms"], "last": warm[-1]["p99_ms"]} if warm else None,
               rss_mb_after_warmup={"first": warm[0]["replica_rss_mb"], "last": warm[-1]["replica_rss_mb"]} if warm else None,
               rss_growth_after_warmup=round(warm[-1]["replica_rss_mb"] / warm[0]["replica_rss_mb"] - 1, 4)
               if warm and warm[0]["replica_rss_mb"] else None)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
