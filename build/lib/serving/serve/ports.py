"""Free local ports for services started beside an embedded Ray (tests and benchmarks).

Ray's own processes bind ports while a service starts: its workers take ports from
min_worker_port..max_worker_port (10002-19999 by default), its fixed defaults sit at 6379, 8265,
10001 and 52365 (and the next 40 after each), and everything else (raylet, object manager, agents,
GCS, Serve's replicas) binds port 0, i.e. the kernel's ephemeral range. A port found by binding port
0 ourselves comes from that same range, so a Ray process can take it before our proxy binds it
("Address already in use"). These ports come from a range no Ray process binds in, outside both;
a port something already listens on is skipped, and none is handed out twice by one process.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

RAY_WORKER_PORTS = range(10002, 20000)
CANDIDATE_RANGES = (range(20000, 30000), range(61000, 65536), range(1025, 6000))
_handed_out: set[int] = set()


def ephemeral_ports() -> range:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    return range(low, high + 1)


def service_port_range() -> range:
    ephemeral = ephemeral_ports()
    for candidates in CANDIDATE_RANGES:
        if not any(r.start < candidates.stop and candidates.start < r.stop for r in (ephemeral, RAY_WORKER_PORTS)):
            return candidates
    raise RuntimeError(f"no port range outside the ephemeral ports {ephemeral} and Ray's worker ports "
                       f"{RAY_WORKER_PORTS}; narrow net.ipv4.ip_local_port_range")


def listening(port: int) -> bool:
    """Whether something listens on `port` (a socket in TIME_WAIT does not count)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


def free_port() -> int:
    candidates = service_port_range()
    offset = os.getpid() * 7919 % len(candidates)  # concurrent processes start at different places
    for i in range(len(candidates)):
        port = candidates[(offset + i) % len(candidates)]
        if port not in _handed_out and not listening(port):
            _handed_out.add(port)
            return port
    raise RuntimeError(f"every port in {candidates} is taken")
