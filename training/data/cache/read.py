"""A complete cache opened for training: its tensors as row readers, its index and captions."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch

from training.data.buckets import Size, parse_size, size_name
from training.data.masks import loss_weights
from training.data.sampler import BatchStream
from training.data.cache.shards import BucketRows, ShardRows, index_rows, tensor_files


class Captions(Sequence[str]):
    """The caption of each cache row, read from the dataset's rows when a batch asks (caption states are
    in the cache; the captions themselves are needed only without them): 40,000 long captions held as a
    list would be ~10 MB more memory for a larger dataset."""

    def __init__(self, records: datasets.Dataset, index: torch.Tensor) -> None:
        self.texts, self.index = records.select_columns(["text"]), index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> str:
        return self.texts[int(self.index[i])]["text"]

    def __iter__(self):
        return (self[i] for i in range(len(self)))


@dataclass
class LatentCache:
    moments: BucketRows  # (N, 2C, h, w) posterior mean and logvar, float32 (h, w: the row's bucket's)
    moments_flipped: BucketRows | None  # the same for the mirrored image (data.random_flip)
    text_states: BucketRows | None  # (N, L, D) bf16 frozen text encoder's states of the captions (None: not cached)
    text_mask: BucketRows | None  # (N, L) int8 1 = token, 0 = padding
    captions: Captions  # N captions, in row order, read from the dataset as asked
    source_index: torch.Tensor  # (N,) row of the dataset each entry came from (unreadable images are absent)
    path: Path
    upscaled: int = 0  # images smaller than the resolution (upscaled to it)
    sizes: list[Size] = field(default_factory=list)  # (height, width) in pixels of each bucket that holds images (square: one)
    bucket_of: torch.Tensor | None = None  # (N,) each row's bucket, an index into ``sizes``
    masks: BucketRows | None = None  # (N, 1, h, w) uint8 data.mask's loss weights in 255ths (None: no mask)
    masks_flipped: BucketRows | None = None  # the same for the mirrored image
    text_pooled: BucketRows | None = None  # (N, [V,] P) bf16 Stable Diffusion XL's pooled caption embeddings
    time_ids: BucketRows | None = None  # (N, 6) int32 Stable Diffusion XL's size and crop conditioning of each image
    time_ids_flipped: BucketRows | None = None  # the same for the mirrored image

    def __len__(self) -> int:
        return len(self.moments)

    def batch_stream(
        self, batch_size: int, seed: int, rank: int, world_size: int, random_flip: bool, bucket_set: list[Size] | None = None
    ) -> BatchStream:
        """The run's batches over the cached rows: with ``bucket_set`` (the whole configured set, as the layout records
        it) one bucket per batch, of the buckets that hold images; without, square batches, drawn with replacement when
        there are fewer rows than one global batch."""
        sizes, bucket_of = (self.sizes, self.bucket_of) if bucket_set else (None, None)
        return BatchStream(len(self), batch_size, seed, rank, world_size, random_flip, sizes, bucket_of, True, bucket_set)

    def posteriors(self, idx: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        """(B, 2C, h, w): the posteriors (mean, log-variance) of rows ``idx`` (B,), of the mirrored image where ``flip``
        (B,); h, w are the rows' bucket's. A training step draws x_0 from each (:func:`autoencoder.sample_latents`)."""
        moments = self.moments[idx]
        if self.moments_flipped is not None:
            moments = torch.where(flip[:, None, None, None], self.moments_flipped[idx], moments)
        return moments

    def loss_masks(self, idx: torch.Tensor, flip: torch.Tensor) -> torch.Tensor | None:
        """(B, 1, h, w) in [0, 1]: data.mask's weights of rows ``idx`` on the latent grid, mirrored where ``flip``;
        None without masks (every element weighs 1)."""
        if self.masks is None:
            return None
        masks = self.masks[idx]
        if self.masks_flipped is not None:
            masks = torch.where(flip[:, None, None, None], self.masks_flipped[idx], masks)
        return loss_weights(masks)

    def size_conditions(self, idx: torch.Tensor, flip: torch.Tensor) -> torch.Tensor | None:
        """(B, 6) float: Stable Diffusion XL's time ids (original height, width, crop top, left, target height, width) of
        rows ``idx``, of the mirrored image where ``flip``; None where the cache holds none."""
        if self.time_ids is None:
            return None
        ids = self.time_ids[idx]
        if self.time_ids_flipped is not None:
            ids = torch.where(flip[:, None], self.time_ids_flipped[idx], ids)
        return ids.float()


def load_latent_cache(folder: str | Path, records: datasets.Dataset) -> LatentCache:
    """The complete cache in ``folder``, read row by row as batches ask (only the small index is read whole)."""
    folder = Path(folder)
    if not (folder / "complete.json").is_file():
        raise ValueError(f"{folder} is not a complete latent cache")
    shards = [tensor_files(path) for path in sorted(folder.glob("shard-*.safetensors"))]
    shards = [s for s in shards if index_rows({n: t.shape for n, t in s.items()})]  # 0 rows: none of its images was readable
    if not shards:
        raise ValueError(f"the latent cache {folder} holds no image: none of the dataset's images could be read")
    # by bucket: "moments@24x40" of every shard that has rows of 24x40, one bucket after another (tallest first)
    sizes = sorted({parse_size(name.split("@")[1]) for s in shards for name in s}, key=lambda hw: (hw[1] / hw[0], hw[0]))
    names = {name.split("@")[0] for s in shards for name in s}  # moments, index, ...
    per_bucket = [
        {name: ShardRows([s[f"{name}@{size_name(hw)}"] for s in shards if f"index@{size_name(hw)}" in s]) for name in names}
        for hw in sizes
    ]
    rows = {name: BucketRows([bucket[name] for bucket in per_bucket]) for name in names}
    bucket_of = torch.cat([torch.full((len(bucket["index"]),), j) for j, bucket in enumerate(per_bucket)])
    index = rows["index"].read_all()  # (N,)
    captions = Captions(records, index)
    upscaled = json.loads((folder / "complete.json").read_text()).get("upscaled", 0)
    return LatentCache(
        rows["moments"],
        rows.get("moments_flipped"),
        rows.get("text_states"),
        rows.get("text_mask"),
        captions,
        index,
        folder,
        upscaled,
        sizes,
        bucket_of,
        rows.get("mask"),
        rows.get("mask_flipped"),
        rows.get("text_pooled"),
        rows.get("time_ids"),
        rows.get("time_ids_flipped"),
    )
