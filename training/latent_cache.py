"""Encode a dataset once: posterior moments of every image (and, for a frozen text encoder, the
caption states), as safetensors shards. The training step then never runs the autoencoder.

    cache_dir/<key>/key.json                     what the cache was built from
    cache_dir/<key>/shard-00000.safetensors      moments (n, 2C, h, w) float32 [+ moments_flipped], index (n,)
                                                 [+ text_states (n, L, D) bfloat16, text_mask (n, L) int8]
    cache_dir/<key>/complete.json                written last: the cache is usable; each shard's rows and bytes

With aspect-ratio buckets (``data.buckets``) a shard holds its images by bucket, each tensor
once per bucket that has rows there, named ``<tensor>@<height>x<width>`` (``moments@24x40``,
``index@24x40``, ...): the latents of a bucket are all of its shape. Cache rows are numbered
bucket by bucket (from the tallest to the widest, as the bucket set runs), each bucket's rows in
shard order.

The processes of a run encode the shards between them (shard k by rank k mod world size); the
shards' bytes do not depend on how many there were.

L is the dataset's longest caption in tokens (CLIP: always 77, its states at padding positions
condition the U-Net as in Stable Diffusion); ``cache.text=false`` stores no caption states.

``<key>`` hashes the autoencoder weights, the resolution and transforms, the dataset (files and
captions) and the text encoder weights: change any of them and a new cache is built; an
unchanged key is reused; an interrupted encode keeps its finished shards and resumes.
Every launch checks each shard against ``complete.json`` (its size, and the rows its header
holds): a truncated, emptied or missing shard is named and encoded again, never dropped. A shard
whose images were all unreadable holds zero rows (a valid file, not an empty one).
The moments (mean, log-variance) are stored, not one sample: each step draws a fresh latent.
Training reads only each batch's rows from the shard files (:class:`ShardRows`), so no process
holds the cache in memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import datasets
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from autoencoder.latents import encode_moments
from runtime.files import file_digest
from ldm.text import encode_text, tokenize
from training.buckets import Size, assign_buckets
from training.data import DataConfig, eval_loader

CACHE_VERSION = 2  # 2: caption states in bf16, masks in int8
TEXT_DTYPE = torch.bfloat16


@dataclass(frozen=True)
class TensorFile:
    """Where one tensor lies in a safetensors file: byte offset of its data, shape, dtype."""

    path: Path
    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype


class ShardRows:
    """One tensor of the cache, split over its shard files: ``rows[idx]`` reads only the bytes of
    the rows asked for (``os.pread``), so training holds no copy of the cache. (A memory map would
    do the same in principle, but the kernel maps whole large page-cache folios around each
    touched row: measured +180 MiB resident for 240 scattered rows of a 220 MiB cache.)"""

    def __init__(self, parts: list[TensorFile]) -> None:
        self.parts, self.dtype = parts, parts[0].dtype
        self.ends = torch.tensor([p.shape[0] for p in parts]).cumsum(0)  # (S,) one past each shard's last global row
        self.shape = (int(self.ends[-1]), *parts[0].shape[1:])
        self.row_bytes = math.prod(self.shape[1:]) * self.dtype.itemsize
        self._fds: dict[int, int] = {}

    def __len__(self) -> int:
        return self.shape[0]

    def _fd(self, k: int) -> int:
        if k not in self._fds:  # opened lazily, per process (a forked worker opens its own)
            self._fds[k] = os.open(self.parts[k].path, os.O_RDONLY)
        return self._fds[k]

    def __getitem__(self, idx) -> torch.Tensor:
        """(B, ...) rows at the global indices ``idx`` (B,), in that order."""
        idx = torch.as_tensor(idx, dtype=torch.int64).reshape(-1)
        buf = bytearray(len(idx) * self.row_bytes)
        shard = torch.searchsorted(self.ends, idx, right=True)  # (B,) which file holds each row
        for j, (row, k) in enumerate(zip(idx.tolist(), shard.tolist())):
            local = row - (int(self.ends[k - 1]) if k else 0)
            data = os.pread(self._fd(k), self.row_bytes, self.parts[k].offset + local * self.row_bytes)
            buf[j * self.row_bytes:(j + 1) * self.row_bytes] = data
        return torch.frombuffer(buf, dtype=self.dtype).reshape(len(idx), *self.shape[1:])

    def read_all(self) -> torch.Tensor:
        """Every row, one read per shard (for the small tensors, e.g. the dataset index)."""
        parts = [os.pread(self._fd(k), p.shape[0] * self.row_bytes, p.offset) for k, p in enumerate(self.parts)]
        return torch.frombuffer(bytearray(b"".join(parts)), dtype=self.dtype).reshape(self.shape)

    def __del__(self) -> None:
        for fd in self._fds.values():
            os.close(fd)


class BucketRows:
    """One tensor of a bucketed cache: the :class:`ShardRows` of each bucket, numbered one bucket
    after another. A batch's rows come from one bucket (the sampler's rule): asking for rows of
    several is an error."""

    def __init__(self, buckets: list[ShardRows]) -> None:
        self.buckets, self.dtype = buckets, buckets[0].dtype
        self.ends = torch.tensor([len(b) for b in buckets]).cumsum(0)  # (K,) one past each bucket's last row

    def __len__(self) -> int:
        return int(self.ends[-1])

    @property
    def shape(self) -> tuple[int, ...]:
        """(N, ...) where every bucket's rows have one shape (caption states); moments have none."""
        shapes = {b.shape[1:] for b in self.buckets}
        if len(shapes) > 1:
            raise ValueError(f"the buckets' rows have different shapes {sorted(shapes)}")
        return (len(self), *shapes.pop())

    def __getitem__(self, idx) -> torch.Tensor:
        idx = torch.as_tensor(idx, dtype=torch.int64).reshape(-1)
        which = torch.searchsorted(self.ends, idx, right=True)  # (B,) each row's bucket
        local = idx - torch.cat([torch.zeros(1, dtype=torch.int64), self.ends])[which]
        if not (which == which[0]).all():
            raise ValueError(f"rows {idx.tolist()} lie in {len(which.unique())} buckets; a batch comes from one")
        return self.buckets[int(which[0])][local]

    def read_all(self) -> torch.Tensor:
        return torch.cat([b.read_all() for b in self.buckets])


@dataclass
class LatentCache:
    moments: ShardRows | BucketRows  # (N, 2C, h, w) posterior mean and logvar, float32 (h, w: the row's bucket's)
    moments_flipped: ShardRows | BucketRows | None  # the same for the mirrored image (data.random_flip)
    text_states: ShardRows | BucketRows | None  # (N, L, D) bf16 frozen text encoder's states of the captions (None: not cached)
    text_mask: ShardRows | BucketRows | None  # (N, L) int8 1 = token, 0 = padding
    captions: list[str]  # N captions, in row order
    source_index: torch.Tensor  # (N,) row of the dataset each entry came from (unreadable images are absent)
    path: Path
    upscaled: int = 0  # images smaller than the resolution (upscaled to it)
    sizes: list[Size] | None = None  # with buckets: the (height, width) in pixels of each bucket that holds images
    bucket_of: torch.Tensor | None = None  # (N,) each row's bucket, an index into ``sizes``

    def __len__(self) -> int:
        return len(self.moments)


def folder_digest(folder: str | Path) -> str:
    """Digest of a model folder's weights and configs (not of its path: a moved folder is the same model)."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json", ".txt", ".model"))
    h = hashlib.sha256()
    for p in files:
        h.update(p.relative_to(folder).as_posix().encode() + b"\0" + file_digest(p).encode())
    return h.hexdigest()


def dataset_digest(records: datasets.Dataset) -> str:
    """Digest of what the cache would encode: each image's bytes, or its path, size and mtime, plus the caption."""
    h = hashlib.sha256()
    for row in records:
        image, text = row["image"], row["text"]
        if isinstance(image, dict):
            image = image.get("bytes") or image.get("path")
        if isinstance(image, (bytes, bytearray)):
            h.update(hashlib.sha256(image).digest())
        else:
            st = os.stat(image)
            h.update(f"{image}|{st.st_size}|{st.st_mtime_ns}".encode())
        h.update(b"\0" + str(text).encode() + b"\n")
    return h.hexdigest()


def cache_key(vae_digest: str, data: DataConfig, records: datasets.Dataset, text_digest: str | None,
              buckets: list[Size] | None = None) -> dict[str, Any]:  # fmt: skip
    key = {
        "version": CACHE_VERSION,
        "vae": vae_digest,
        "resolution": data.resolution,
        "transforms": {"resize": "shorter-side bicubic", "crop": "center", "random_flip": data.random_flip},
        "dataset": dataset_digest(records),
        "images": len(records),
        "text_encoder": text_digest,  # None: caption states are not cached (the encoder trains, or cache.text=false)
    }
    if buckets:  # absent without buckets, so the square caches of earlier versions keep their key
        key["buckets"] = [_size_name(size) for size in buckets]
        key["transforms"] |= {"resize": "cover the bucket (Lanczos down, bicubic up)", "crop": "center of the bucket"}
    return key


def _size_name(size: Size) -> str:
    return f"{size[0]}x{size[1]}"


def _key_name(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


@torch.no_grad()
def build_latent_cache(
    cache_dir: str | Path,
    key: dict[str, Any],
    vae,
    records: datasets.Dataset,
    data: DataConfig,
    text: tuple[Any, Any] | None = None,
    batch_size: int = 64,
    shard_size: int = 2048,
    show_progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
    wait: Callable[[], None] = lambda: None,
    buckets: list[Size] | None = None,
) -> Path:
    """Encode ``records`` into ``cache_dir/<key>/`` unless a complete cache with that key exists.
    ``text``: (tokenizer, frozen text encoder) to cache caption states, or None. ``buckets``: the
    bucket sizes (pixels); each image is encoded at the one nearest its aspect ratio (read from its
    header, as each shard is encoded: a reused cache opens no image).

    Every process of a run calls this with its ``rank`` of ``world_size`` and ``wait`` (a barrier:
    ``accelerator.wait_for_everyone``): process r encodes shards k = r, r + world, ... that are not
    there yet, each written atomically, so a shard's bytes do not depend on the number of processes
    and a killed encode keeps every finished shard; rank 0 marks the cache complete once every
    shard exists."""
    key = {**key, "shard_size": shard_size}  # which rows each shard file holds (an interrupted encode resumes by shard)
    folder = Path(cache_dir) / _key_name(key)
    damaged = _damaged_shards(folder) if (folder / "complete.json").is_file() else None  # every process, before any deletes
    wait()
    if damaged == {}:
        return folder
    if damaged and rank == 0:
        problems = "; ".join(f"{why}" for why in list(damaged.values())[:3])
        print(f"warning: latent cache {folder} is damaged ({problems}); encoding the damaged shards again")
        (folder / "complete.json").unlink()
        for k in damaged:
            if k is not None:
                _shard_path(folder, k).unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (folder / "key.json").write_text(json.dumps(key, indent=2, sort_keys=True))
    wait()
    text_length = None
    if text is not None:  # one padded length for every shard: the longest caption's (CLIP: always 77)
        tokenizer, encoder = text
        captions = records["text"]  # tokenised in chunks: a tokenizer's output for every caption at once grows with the dataset
        text_length = max(tokenize(tokenizer, encoder, [*captions[i:i + 1024], ""])["input_ids"].shape[1]
                          for i in range(0, max(len(captions), 1), 1024))  # fmt: skip

    n_shards = (len(records) + shard_size - 1) // shard_size
    rows = lambda k: range(k * shard_size, min((k + 1) * shard_size, len(records)))  # noqa: E731  (shard k's dataset rows)
    mine = range(rank, n_shards, world_size)
    todo = [k for k in mine if _shard_rows(_shard_path(folder, k)) is None]  # not there, or not a readable shard
    mine_images = sum(len(rows(k)) for k in mine)
    bar = tqdm(total=mine_images, initial=mine_images - sum(len(rows(k)) for k in todo), desc=f"encoding latents (process {rank} of "
               f"{world_size})" if world_size > 1 else "encoding latents", disable=not show_progress, dynamic_ncols=True)  # fmt: skip
    for k in todo:
        _encode_shard(folder, k, rows(k), vae, records, data, text, text_length, batch_size, bar, buckets)
    bar.close()
    wait()
    if rank == 0:
        rows_per_shard = [_shard_rows(_shard_path(folder, k)) for k in range(n_shards)]
        missing = [k for k, n in enumerate(rows_per_shard) if n is None]
        if missing:
            raise RuntimeError(f"latent cache {folder}: shards {missing[:5]} were not written (a process failed, or on several "
                               "machines cache.dir is not one shared folder); relaunch to finish")  # fmt: skip
        upscaled = sum(_shard_upscaled(p) for p in folder.glob("shard-*.safetensors"))  # shards of an earlier, interrupted encode too
        summary = {"images": len(records), "shards": n_shards, "text_length": text_length, "upscaled": upscaled,
                   "shard_rows": rows_per_shard, "shard_bytes": [_shard_path(folder, k).stat().st_size for k in range(n_shards)]}
        (folder / "complete.json").write_text(json.dumps(summary))
        for other in Path(cache_dir).iterdir():  # caches of an older autoencoder / dataset / encoder
            if other.is_dir() and other != folder and (other / "key.json").is_file():
                shutil.rmtree(other, ignore_errors=True)
    wait()
    return folder


def _shard_path(folder: Path, k: int) -> Path:
    return folder / f"shard-{k:05d}.safetensors"


def _encode_shard(folder: Path, k: int, rows: range, vae, records, data: DataConfig, text, text_length, batch_size: int, bar,
                  buckets: list[Size] | None = None) -> None:  # fmt: skip
    """``folder/shard-k.safetensors``: moments [+ flipped], dataset index [+ caption states] of ``rows``
    (by bucket, with ``buckets``), written under a temporary name and renamed, so a finished shard
    survives an interruption."""
    upscaled = 0  # this shard's images smaller than the resolution (or their bucket), kept in its metadata
    if buckets:  # one group of rows per bucket, named by its size
        bucket_of = assign_buckets([row["image"] for row in records.select(rows).select_columns(["image"])], buckets)
        groups = [(f"@{_size_name(size)}", [rows.start + i for i, b in enumerate(bucket_of) if b == j], size)
                  for j, size in enumerate(buckets)]  # fmt: skip
    else:
        groups = [("", list(rows), None)]
    shard: dict[str, torch.Tensor] = {}
    for suffix, group, size in groups:
        tensors: dict[str, list[torch.Tensor]] = {"moments": [], "moments_flipped": [], "index": [], "text_states": [], "text_mask": []}
        for batch in eval_loader(records.select(group), data, batch_size, size) if group else ():
            bar.update(len(batch["index"]) + len(batch["bad_files"]))
            upscaled += batch["upscaled"]
            if not batch["index"]:
                continue
            x = batch["pixel_values"].to(vae.device, vae.dtype)  # (b, 3, H, W) in [-1, 1]
            tensors["moments"].append(encode_moments(vae, x).float().cpu())  # (b, 2C, h, w)
            if data.random_flip:
                tensors["moments_flipped"].append(encode_moments(vae, x.flip(-1)).float().cpu())
            tensors["index"].append(torch.tensor([group[i] for i in batch["index"]], dtype=torch.int64))
            if text is not None:
                tokenizer, encoder = text
                emb = encode_text(tokenizer, encoder, batch["text"], pad_to=text_length)
                tensors["text_states"].append(emb.states.to(TEXT_DTYPE).cpu())
                mask = emb.mask if emb.mask is not None else torch.ones(emb.states.shape[:2])
                tensors["text_mask"].append(mask.to(torch.int8).cpu())
        shard |= {name + suffix: torch.cat(parts).contiguous() for name, parts in tensors.items() if parts}
    tmp = folder / f".shard-{k:05d}.tmp"
    if not shard:  # every image of the shard was unreadable: zero rows, so it is not encoded again
        shard = {"index": torch.zeros(0, dtype=torch.int64)}
    save_file(shard, str(tmp), metadata={"upscaled": str(upscaled)})
    os.replace(tmp, _shard_path(folder, k))


def _shard_rows(path: Path) -> int | None:
    """Rows of a shard file, from its header; None if it is missing, or its size is not what its
    own header says (truncated, emptied)."""
    try:
        n, header = _header(path)
        end = max((t["data_offsets"][1] for name, t in header.items() if name != "__metadata__"), default=0)
        rows = _index_rows({name: t["shape"] for name, t in header.items() if name != "__metadata__"})
        return rows if path.stat().st_size == 8 + n + end and ("index" in header or rows) else None
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def _damaged_shards(folder: Path) -> dict[int | None, str]:
    """{shard: what is wrong} for a complete cache whose shards do not match complete.json
    (``None``: complete.json itself is unreadable; then every shard that is not sound)."""
    try:
        summary = json.loads((folder / "complete.json").read_text())
        expected = list(zip(summary["shard_rows"], summary["shard_bytes"], strict=True))
    except (OSError, ValueError, KeyError, TypeError):
        found = [int(p.stem.split("-")[1]) for p in folder.glob("shard-*.safetensors")]
        return {None: "complete.json is unreadable"} | {k: f"{_shard_path(folder, k).name} is damaged" for k in found
                                                           if _shard_rows(_shard_path(folder, k)) is None}  # fmt: skip
    damaged: dict[int | None, str] = {}
    for k, (rows, size) in enumerate(expected):
        path, name = _shard_path(folder, k), _shard_path(folder, k).name
        if not path.is_file():
            damaged[k] = f"{name} is missing"
        elif path.stat().st_size != size:
            damaged[k] = f"{name} has {path.stat().st_size} bytes, {size} expected"
        elif (found := _shard_rows(path)) != rows:
            damaged[k] = f"{name} holds {found} rows, {rows} expected"
    return damaged


def _shard_upscaled(path: Path) -> int:
    with safe_open(str(path), "pt") as f:
        return int((f.metadata() or {}).get("upscaled", 0))


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I8": torch.int8}


def _header(path: Path) -> tuple[int, dict]:
    """(header length, header) of a safetensors file. The format: 8 bytes of header length
    (little-endian), the JSON header (dtype, shape, data_offsets per tensor), then the data."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 2 <= n <= 1 << 26:
            raise ValueError(f"{path}: a header of {n} bytes is not a safetensors header")
        return n, json.loads(f.read(n))


def _tensor_files(path: Path) -> dict[str, TensorFile]:
    """Where each tensor of a safetensors file lies (:func:`_header`)."""
    n, header = _header(path)
    return {name: TensorFile(path, 8 + n + info["data_offsets"][0], tuple(info["shape"]), _DTYPES[info["dtype"]])
            for name, info in header.items() if name != "__metadata__"}  # fmt: skip


def load_latent_cache(folder: str | Path, records: datasets.Dataset) -> LatentCache:
    """The complete cache in ``folder``, read row by row as batches ask (only the small index is read whole)."""
    folder = Path(folder)
    if not (folder / "complete.json").is_file():
        raise ValueError(f"{folder} is not a complete latent cache")
    shards = [s for s in map(_tensor_files, sorted(folder.glob("shard-*.safetensors"))) if _index_rows({n: t.shape for n, t in s.items()})]  # fmt: skip  (0 rows: none readable)
    if not shards:
        raise ValueError(f"the latent cache {folder} holds no image: none of the dataset's images could be read")
    named = {name.split("@")[1] for s in shards for name in s if "@" in name}  # the buckets that hold images: "24x40", ...
    if not named:  # square: one tensor of each name per shard
        rows: dict[str, Any] = {name: ShardRows([s[name] for s in shards]) for name in shards[0]}
        sizes = bucket_of = None
    else:  # by bucket: "moments@24x40" of every shard that has rows of 24x40, one bucket after another (tallest first)
        present = sorted(named, key=lambda b: (int(b.split("x")[1]) / int(b.split("x")[0]), int(b.split("x")[0])))
        names = {name.split("@")[0] for s in shards for name in s if "@" in name}  # moments, index, ...
        per_bucket = [{name: ShardRows([s[f"{name}@{b}"] for s in shards if f"index@{b}" in s]) for name in names} for b in present]
        rows = {name: BucketRows([bucket[name] for bucket in per_bucket]) for name in names}
        sizes = [tuple(map(int, b.split("x"))) for b in present]
        bucket_of = torch.cat([torch.full((len(bucket["index"]),), j) for j, bucket in enumerate(per_bucket)])
    index = rows["index"].read_all()  # (N,)
    texts = records["text"]
    captions = [texts[int(i)] for i in index]
    upscaled = json.loads((folder / "complete.json").read_text()).get("upscaled", 0)
    return LatentCache(rows["moments"], rows.get("moments_flipped"), rows.get("text_states"), rows.get("text_mask"), captions, index,
                       folder, upscaled, sizes, bucket_of)  # fmt: skip


def _index_rows(shapes: dict[str, Any]) -> int:
    """The rows a shard holds, from its tensors' shapes: its ``index``, or one ``index@HxW`` per bucket."""
    return sum(shape[0] for name, shape in shapes.items() if name.split("@")[0] == "index")
