"""training/data/sampler.py: batch streams that resume at any batch, are the same for 1 or 2 ranks, and
never mix buckets."""

from __future__ import annotations

import random
from collections import Counter
from itertools import islice

import pytest

from tests.conftest import data_cfg, rgb, write_imagefolder
from training.data.loader import train_loader
from training.data.records import DataConfig, DataError, load_records
from training.data.sampler import BatchStream, BucketBatchSampler


def sampler(bucket_of, batch, **kw):
    return BucketBatchSampler(bucket_of, max(bucket_of) + 1, batch, seed=3, **kw)


def test_batches_never_mix_buckets_and_every_image_is_seen_each_epoch_small_buckets_included():
    bucket_of = [0] * 37 + [1] * 8 + [2] * 3 + [3] * 20  # bucket 2 has fewer images than a batch
    s = sampler(bucket_of, 8)
    epoch = list(islice(iter(s), len(s)))
    assert len(s) == 5 + 1 + 1 + 3
    for batch in epoch:
        assert len(batch) == 8 and len({bucket_of[i] for i, _ in batch}) == 1
    seen = Counter(i for batch in epoch for i, _ in batch)
    assert set(seen) == set(range(len(bucket_of)))  # nothing dropped
    assert s.repeated == [3, 0, 5, 4]  # slots filled by repeating a bucket's own images, reported


def test_a_resumed_stream_and_two_ranks_equal_one_rank():
    bucket_of = [random.Random(1).randrange(4) for _ in range(200)]
    one = list(islice(iter(sampler(bucket_of, 8, random_flip=True)), 60))
    assert list(islice(iter(sampler(bucket_of, 8, start=37, random_flip=True)), 23)) == one[37:]
    ranks = [list(islice(iter(sampler(bucket_of, 4, rank=r, world_size=2, random_flip=True)), 60)) for r in (0, 1)]
    for k in range(60):
        assert sorted(ranks[0][k] + ranks[1][k]) == sorted(one[k])  # the same global batch, split across ranks
    assert one[:len(sampler(bucket_of, 8))] != one[len(sampler(bucket_of, 8)):2 * len(sampler(bucket_of, 8))]  # a new order each epoch


def square(num_items, batch_size, seed, start=0, **kw):
    """The sampler of square crops: the one-bucket case."""
    return BatchStream(num_items, batch_size, seed, **kw).sampler(start)


def test_random_flip_is_off_by_default_and_deterministic_when_on():
    assert DataConfig().random_flip is False
    s1 = list(zip(range(3), square(40, 4, seed=1, random_flip=True)))
    s2 = list(zip(range(3), square(40, 4, seed=1, random_flip=True)))
    assert s1 == s2 and any(f for _, b in s1 for _, f in b)
    assert not any(f for _, b in zip(range(5), square(40, 4, seed=1)) for _, f in b)


def test_sampler_resumes_mid_stream_and_splits_ranks():
    full = [b for _, b in zip(range(12), square(30, 4, seed=7))]
    resumed = [b for _, b in zip(range(5), square(30, 4, seed=7, start=7))]
    assert resumed == full[7:12]
    # an epoch sees every image: 8 batches of 4 from 30 items, the last filled from the start of its order
    epoch0 = [i for b in full[:8] for i, _ in b]
    assert set(epoch0) == set(range(30)) and len(epoch0) == 32
    # two ranks with half the batch see exactly the global batch of one rank
    r0 = [b for _, b in zip(range(3), square(30, 2, seed=7, rank=0, world_size=2))]
    r1 = [b for _, b in zip(range(3), square(30, 2, seed=7, rank=1, world_size=2))]
    for g, a, b in zip(full[:3], r0, r1):
        assert sorted(g) == sorted(a + b)


def test_fewer_images_than_a_batch_is_a_clear_error(tmp_path):
    root = write_imagefolder(tmp_path / "d", {"a.png": rgb(), "b.png": rgb()})
    cfg = data_cfg(root)
    with pytest.raises(DataError, match="fewer than one global batch"):
        train_loader(load_records(root, cfg), cfg, BatchStream(2, batch_size=4, seed=0))
