"""A shard is sound when its size is what its own header says and complete.json agrees: the checks
every launch runs before a cache is reused."""

from __future__ import annotations

import json
from pathlib import Path

from training.data.cache.shards import index_rows, read_header


def shard_path(folder: Path, k: int) -> Path:
    return folder / f"shard-{k:05d}.safetensors"


def shard_rows(path: Path) -> int | None:
    """Rows of a shard file, from its header; None if it is missing, or its size is not what its
    own header says (truncated, emptied)."""
    try:
        n, header = read_header(path)
        end = max((t["data_offsets"][1] for name, t in header.items() if name != "__metadata__"), default=0)
        rows = index_rows({name: t["shape"] for name, t in header.items() if name != "__metadata__"})
        return rows if path.stat().st_size == 8 + n + end and ("index" in header or rows) else None
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def damaged_shards(folder: Path) -> dict[int | None, str]:
    """{shard: what is wrong} for a complete cache whose shards do not match complete.json
    (``None``: complete.json itself is unreadable; then every shard that is not sound)."""
    try:
        summary = json.loads((folder / "complete.json").read_text())
        expected = list(zip(summary["shard_rows"], summary["shard_bytes"], strict=True))
    except (OSError, ValueError, KeyError, TypeError):
        found = [int(p.stem.split("-")[1]) for p in folder.glob("shard-*.safetensors")]
        return {None: "complete.json is unreadable"} | {
            k: f"{shard_path(folder, k).name} is damaged" for k in found if shard_rows(shard_path(folder, k)) is None
        }
    damaged: dict[int | None, str] = {}
    for k, (rows, size) in enumerate(expected):
        path, name = shard_path(folder, k), shard_path(folder, k).name
        if not path.is_file():
            damaged[k] = f"{name} is missing"
        elif path.stat().st_size != size:
            damaged[k] = f"{name} has {path.stat().st_size} bytes, {size} expected"
        elif (found := shard_rows(path)) != rows:
            damaged[k] = f"{name} holds {found} rows, {rows} expected"
    return damaged
