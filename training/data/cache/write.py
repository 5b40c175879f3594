"""Encoding a dataset into the cache: every process its share of the shards, each written atomically."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import datasets
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from autoencoder.latents import encode_moments
from ldm.text import encode_text, tokenize
from training.data.buckets import Size, assign_buckets, size_name
from training.data.captions import caption_variants
from training.data.cache.key import TEXT_DTYPE, key_name
from training.data.cache.verify import damaged_shards, shard_path, shard_rows
from training.data.loader import eval_loader
from training.data.masks import latent_mask
from training.data.records import DataConfig


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
    time_ids: bool = False,
) -> Path:
    """Encode ``records`` into ``cache_dir/<key>/`` unless a complete cache with that key exists.
    ``text``: (tokenizer, frozen text encoder) to cache caption states, or None. ``buckets``: the
    bucket sizes (pixels); each image is encoded at the one nearest its aspect ratio (read from its
    header, as each shard is encoded: a reused cache opens no image). ``time_ids``: Stable Diffusion XL's size and crop
    conditioning of each image (and of its mirror) too.

    Every process of a run calls this with its ``rank`` of ``world_size`` and ``wait`` (a barrier:
    ``accelerator.wait_for_everyone``): process r encodes shards k = r, r + world, ... that are not
    there yet, each written atomically, so a shard's bytes do not depend on the number of processes
    and a killed encode keeps every finished shard; rank 0 marks the cache complete once every
    shard exists."""
    key = {**key, "shard_size": shard_size}  # which rows each shard file holds (an interrupted encode resumes by shard)
    folder = Path(cache_dir) / key_name(key)
    damaged = damaged_shards(folder) if (folder / "complete.json").is_file() else None  # every process, before any deletes
    wait()
    if damaged == {}:
        return folder
    if damaged and rank == 0:
        problems = "; ".join(f"{why}" for why in list(damaged.values())[:3])
        print(f"warning: latent cache {folder} is damaged ({problems}); encoding the damaged shards again")
        (folder / "complete.json").unlink()
        for k in damaged:
            if k is not None:
                shard_path(folder, k).unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (folder / "key.json").write_text(json.dumps(key, indent=2, sort_keys=True))
    wait()
    text_shape = _caption_shape(text, records) if text is not None else None

    n_shards = (len(records) + shard_size - 1) // shard_size
    rows = lambda k: range(k * shard_size, min((k + 1) * shard_size, len(records)))  # noqa: E731  (shard k's dataset rows)
    mine = range(rank, n_shards, world_size)
    todo = [k for k in mine if shard_rows(shard_path(folder, k)) is None]  # not there, or not a readable shard
    mine_images = sum(len(rows(k)) for k in mine)
    bar = tqdm(
        total=mine_images,
        initial=mine_images - sum(len(rows(k)) for k in todo),
        desc=f"encoding latents (process {rank} of {world_size})" if world_size > 1 else "encoding latents",
        disable=not show_progress,
        dynamic_ncols=True,
    )
    for k in todo:
        _encode_shard(folder, k, rows(k), vae, records, data, text, text_shape, batch_size, bar, buckets, time_ids)
    bar.close()
    wait()
    if rank == 0:
        rows_per_shard = [shard_rows(shard_path(folder, k)) for k in range(n_shards)]
        missing = [k for k, n in enumerate(rows_per_shard) if n is None]
        if missing:
            raise RuntimeError(
                f"latent cache {folder}: shards {missing[:5]} were not written (a process failed, or on several "
                "machines cache.dir is not one shared folder); relaunch to finish"
            )
        upscaled = sum(
            shard_upscaled(p) for p in folder.glob("shard-*.safetensors")
        )  # shards of an earlier, interrupted encode too
        summary = {
            "images": len(records),
            "shards": n_shards,
            "text_length": text_shape and text_shape[0],
            "caption_variants": text_shape and text_shape[1],
            "upscaled": upscaled,
            "shard_rows": rows_per_shard,
            "shard_bytes": [shard_path(folder, k).stat().st_size for k in range(n_shards)],
        }
        (folder / "complete.json").write_text(json.dumps(summary))
        for other in Path(cache_dir).iterdir():  # caches of an older autoencoder / dataset / encoder
            if other.is_dir() and other != folder and (other / "key.json").is_file():
                shutil.rmtree(other, ignore_errors=True)
    wait()
    return folder


def _encode_shard(
    folder: Path,
    k: int,
    rows: range,
    vae,
    records,
    data: DataConfig,
    text,
    text_shape,
    batch_size: int,
    bar,
    buckets: list[Size] | None = None,
    time_ids: bool = False,
) -> None:
    """``folder/shard-k.safetensors``: moments [+ flipped], dataset index [+ caption states] of ``rows``
    by bucket (``buckets`` None: the one square bucket of data.resolution), written under a temporary
    name and renamed, so a finished shard survives an interruption."""
    upscaled = 0  # this shard's images smaller than their bucket, kept in its metadata
    buckets = buckets or [(data.resolution, data.resolution)]
    if len(buckets) > 1:  # each image's from its header
        bucket_of = assign_buckets([row["image"] for row in records.select(rows).select_columns(["image"])], buckets)
    else:
        bucket_of = [0] * len(rows)
    groups = [
        (f"@{size_name(size)}", [rows.start + i for i, b in enumerate(bucket_of) if b == j], size)
        for j, size in enumerate(buckets)
    ]
    shard: dict[str, torch.Tensor] = {}
    for suffix, group, size in groups:
        columns = _Columns(len(group))
        for batch in eval_loader(records.select(group), data, batch_size, size) if group else ():
            bar.update(len(batch["index"]) + len(batch["bad_files"]))
            upscaled += batch["upscaled"]
            if not batch["index"]:
                continue
            x = batch["pixel_values"].to(vae.device, vae.dtype)  # (b, 3, H, W) in [-1, 1]
            rows_of = {"moments": encode_moments(vae, x).float(), "index": torch.tensor([group[i] for i in batch["index"]])}
            if data.random_flip:
                rows_of["moments_flipped"] = encode_moments(vae, x.flip(-1)).float()  # (b, 2C, h, w)
            if "mask" in batch:  # data.mask: the loss weights on the latent grid (b, 1, h, w) uint8, mirrored too
                latent_size = rows_of["moments"].shape[-2:]
                rows_of["mask"] = latent_mask(batch["mask"], latent_size)
                if data.random_flip:
                    rows_of["mask_flipped"] = latent_mask(batch["mask"].flip(-1), latent_size)
            if time_ids:  # (b, 6) int32: original size, crop top-left, target size
                rows_of["time_ids"] = batch["time_ids"]
                if data.random_flip:
                    rows_of["time_ids_flipped"] = batch["time_ids_flipped"]
            if text is not None:
                rows_of |= _caption_states(text, batch["text"], *text_shape)
            columns.append(rows_of)
        shard |= {name + suffix: rows for name, rows in columns.filled().items()}
    tmp = folder / f".shard-{k:05d}.tmp"
    if not shard:  # every image of the shard was unreadable: zero rows, so it is not encoded again
        shard = {"index": torch.zeros(0, dtype=torch.int64)}
    save_file(shard, str(tmp), metadata={"upscaled": str(upscaled)})
    os.replace(tmp, shard_path(folder, k))


def _caption_shape(text: tuple[Any, Any], records: datasets.Dataset) -> tuple[int, int]:
    """(L, V): one padded length for every shard, the longest caption's in tokens (CLIP: always 77), and the most
    captions one image has (``training.data.captions``); tokenised 1,024 images at a time: every caption's tokens at
    once grow with the dataset."""
    tokenizer, encoder = text
    length, most = 0, 1
    for chunk in records.select_columns(["text"]).iter(batch_size=1024):
        per_image = [caption_variants(t) for t in chunk["text"]]
        most = max(most, *map(len, per_image))
        length = max(length, tokenize(tokenizer, encoder, [*(v for vs in per_image for v in vs), ""])["input_ids"].shape[-1])
    return length, most


def _caption_states(text: tuple[Any, Any], texts: list[str], length: int, most: int) -> dict[str, torch.Tensor]:
    """The frozen encoder's ``text_states`` (b, L, D) bf16 and ``text_mask`` (b, L) int8 of each image's caption (and
    Stable Diffusion XL's ``text_pooled`` (b, P) bf16); where an image of the dataset has several, (b, V, L, D), (b, V, L)
    and (b, V, P), an image's variants first and the empty caption after them (never drawn:
    :func:`training.data.captions.variant_index` draws among an image's own)."""
    tokenizer, encoder = text
    flat = [v for t in texts for vs in [caption_variants(t)] for v in vs + [""] * (most - len(vs))]
    emb = encode_text(tokenizer, encoder, flat, pad_to=length)
    columns = {
        "text_states": emb.states.to(TEXT_DTYPE),
        "text_mask": (emb.mask if emb.mask is not None else torch.ones(emb.states.shape[:2])).to(torch.int8),
    }
    if emb.pooled is not None:
        columns["text_pooled"] = emb.pooled.to(TEXT_DTYPE)
    if most == 1:
        return columns
    return {name: column.reshape(len(texts), most, *column.shape[1:]) for name, column in columns.items()}


class _Columns:
    """A shard's tensors for ``capacity`` rows, each allocated once at its full size by the first batch and
    filled in place: the shard's largest column (caption states: ~80 MB for 2,048 long captions) is held
    once, not as a list of batches and then again as their concatenation. Unreadable images leave rows
    unfilled; ``filled()`` is the first rows, each still one contiguous block."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.n, self.columns = capacity, 0, {}

    def append(self, rows_of: dict[str, torch.Tensor]) -> None:
        b = len(rows_of["index"])
        for name, t in rows_of.items():
            if name not in self.columns:
                self.columns[name] = torch.empty((self.capacity, *t.shape[1:]), dtype=t.dtype)
            self.columns[name][self.n : self.n + b] = t
        self.n += b

    def filled(self) -> dict[str, torch.Tensor]:
        return {name: column[: self.n] for name, column in self.columns.items()}


def shard_upscaled(path: Path) -> int:
    with safe_open(str(path), "pt") as f:
        return int((f.metadata() or {}).get("upscaled", 0))
