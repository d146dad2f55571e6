"""FASTA text: entries, and FLIP-style headers (`>id KEY=value ...`). One reader for training's data,
the batch job and the client (importable without torch)."""
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


def read_fasta(path: str) -> list[tuple[str, str]]:
    """(id, sequence) of every entry of a FASTA file; the id is the header's first word."""
    with open(path) as f:
        return [(parse_header(header)[0], body) for header, body in fasta_entries(f.read())]
