"""The batch sampler: an endless, deterministic stream of batches that starts at any batch, the same
for one global batch size whatever the number of processes. Square crops are the one-bucket case of
aspect-ratio buckets: one sampler serves both."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from training.data.buckets import Size, size_name
from training.data.records import DataError


class BucketBatchSampler(torch.utils.data.Sampler):
    """An endless, deterministic stream of batches, each from one bucket (square crops: every image in
    bucket 0), that can start at any global batch.

    Epoch ``e``: every bucket's images in an order seeded by ``(seed, e, bucket)``, cut into global
    batches of ``batch_size * world_size``; a bucket's last, incomplete batch is filled from the
    start of its own order (so no image is dropped, and a bucket smaller than a batch still trains,
    its images repeated); then the batches of all buckets in an order seeded by ``(seed, e)``. Each
    global batch is split across ranks. Batch ``k`` is the same whether the run started at 0 or
    resumed at ``k``, and, for one global batch size, whatever the number of processes.
    """

    def __init__(
        self,
        bucket_of: Sequence[int],
        num_buckets: int,
        batch_size: int,
        seed: int,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
        random_flip: bool = False,
    ) -> None:
        self.bucket_of = torch.as_tensor(list(bucket_of), dtype=torch.long)
        self.members = [torch.nonzero(self.bucket_of == b).flatten() for b in range(num_buckets)]
        self.batch_size, self.seed, self.start, self.rank, self.world = batch_size, seed, start, rank, world_size
        self.random_flip, self.global_batch = random_flip, batch_size * world_size
        self.batches_of = [math.ceil(len(m) / self.global_batch) for m in self.members]  # per bucket and epoch
        self.batches_per_epoch = sum(self.batches_of)
        self.repeated = [self.batches_of[b] * self.global_batch - len(m) for b, m in enumerate(self.members)]  # filled slots

    def _epoch(self, e: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + e)
        batches = []
        for b, members in enumerate(self.members):
            if not len(members):
                continue
            gb = torch.Generator().manual_seed((self.seed * 1_000_003 + e) * 1_009 + b)
            order = members[torch.randperm(len(members), generator=gb)]
            need = self.batches_of[b] * self.global_batch
            order = order.repeat(math.ceil(need / len(order)))[:need]
            batches += list(order.view(-1, self.global_batch))
        flips = (
            torch.rand(len(self.bucket_of), generator=g) < 0.5
            if self.random_flip
            else torch.zeros(len(self.bucket_of), dtype=torch.bool)
        )
        return [batches[i] for i in torch.randperm(len(batches), generator=g)], flips

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        b, epoch, batches, flips = self.start, -1, [], None
        while True:
            e, k = divmod(b, self.batches_per_epoch)
            if e != epoch:
                epoch, (batches, flips) = e, self._epoch(e)
            yield [(int(i), bool(flips[i])) for i in batches[k][self.rank :: self.world]]
            b += 1

    def __len__(self) -> int:  # endless; len() is one epoch
        return self.batches_per_epoch


@dataclass(frozen=True)
class BatchStream:
    """Which images make up every micro-batch of a run, from (seed, batch number) alone: square
    crops (``sizes`` None: one bucket holding every image) or one aspect-ratio bucket per batch
    (``sizes`` and each image's bucket in ``bucket_of``). ``layout`` is what a checkpoint records of
    it: a run resumes only under the same one."""

    num_items: int
    batch_size: int  # per process
    seed: int
    rank: int = 0
    world_size: int = 1
    random_flip: bool = False
    sizes: list[Size] | None = None  # (height, width) of each bucket, in pixels
    bucket_of: Sequence[int] | None = None  # with sizes: each image's bucket
    repeat_small: bool = False  # square: a dataset smaller than one global batch is drawn with replacement (else an error)
    bucket_set: list[Size] | None = None  # the configured buckets, empty ones too (default: sizes), as the layout records them

    def __post_init__(self) -> None:
        if self.bucket_set is None:
            object.__setattr__(self, "bucket_set", self.sizes)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def layout(self) -> dict:
        layout = {"batch_size": self.batch_size, "num_processes": self.world_size, "seed": self.seed}
        return layout | ({"buckets": [size_name(size) for size in self.bucket_set]} if self.bucket_set else {})

    @property
    def bucket_counts(self) -> list[int]:
        """With buckets: the images of each bucket of ``sizes``."""
        return torch.bincount(torch.as_tensor(self.bucket_of), minlength=len(self.sizes)).tolist()

    @property
    def with_replacement(self) -> bool:
        """Whether square batches repeat images within an epoch (fewer images than one global batch)."""
        return not self.sizes and self.num_items < self.global_batch

    def sampler(self, start: int = 0) -> BucketBatchSampler:
        """The batches from batch ``start`` on, each a list of (image index, flip) for this rank."""
        if not self.sizes and not self.repeat_small and self.num_items < self.global_batch:
            raise DataError(
                f"the dataset has {self.num_items} images, fewer than one global batch "
                f"({self.batch_size} x {self.world_size} processes); lower train.batch_size"
            )
        bucket_of, buckets = (self.bucket_of, len(self.sizes)) if self.sizes else ([0] * self.num_items, 1)
        return BucketBatchSampler(
            bucket_of, buckets, self.batch_size, self.seed, start, self.rank, self.world_size, self.random_flip
        )
