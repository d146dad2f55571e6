"""FASTA text: entries, and FLIP-style headers (`>id KEY=value ...`). Shared by training's data
readers and serving's batch job."""
from __future__ import annotations

import re


def parse_header(header: str) -> tuple[str, dict[str, str]]:
    rid, _, rest = header.partition(" ")
    return rid, dict(re.findall(r"(\w+)=(\S+)", rest))


def fasta_entries(text: str) -> list[tuple[str, str]]:
    entries, header, body = [], None, []
    for line in text.splitlines():
        if line.startswith(">"):
            if header is not None:
                entries.append((header, "".join(body)))
            header, body = line[1:].strip(), []
        elif line.strip():
            body.append(line.strip())
    if header is not None:
        entries.append((header, "".join(body)))
    return entries
