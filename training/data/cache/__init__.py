"""Encode a dataset once: posterior moments of every image (and, for a frozen text encoder, the
caption states), as safetensors shards. The training step then never runs the autoencoder.

    cache_dir/<key>/key.json                     what the cache was built from
    cache_dir/<key>/shard-00000.safetensors      by bucket: moments@HxW (n, 2C, h, w) float32 [+ moments_flipped@HxW],
                                                 index@HxW (n,) [+ text_states@HxW (n, L, D) bf16, text_mask@HxW (n, L) int8]
    cache_dir/<key>/complete.json                written last: the cache is usable; each shard's rows and bytes

A shard holds its images by bucket, each tensor once per bucket that has rows there, named
``<tensor>@<height>x<width>`` (``moments@24x40``, ``index@24x40``, ...): the latents of a bucket
are all of its shape. Square crops are the one-bucket case (``moments@32x32``, ...): one layout,
one reader. Cache rows are numbered bucket by bucket (from the tallest to the widest, as the bucket
set runs), each bucket's rows in shard order.

The processes of a run encode the shards between them (shard k by rank k mod world size); the
shards' bytes do not depend on how many there were.

L is the dataset's longest caption in tokens (CLIP: always 77, its states at padding positions
condition the U-Net as in Stable Diffusion); ``cache.text=false`` stores no caption states. Where an image
has several captions (``training/data/captions.py``) the states hold every one: text_states (n, V, L, D) and
text_mask (n, V, L), V the most captions one image has, and a step draws among an image's own.

``<key>`` hashes the autoencoder weights, the resolution and transforms, the dataset (files and
captions) and the text encoder weights: change any of them and a new cache is built; an
unchanged key is reused; an interrupted encode keeps its finished shards and resumes.
Every launch checks each shard against ``complete.json`` (its size, and the rows its header
holds): a truncated, emptied or missing shard is named and encoded again, never dropped. A shard
whose images were all unreadable holds zero rows (a valid file, not an empty one).
The moments (mean, log-variance) are stored, not one sample: each step draws a fresh latent.
Training reads only each batch's rows from the shard files (:class:`ShardRows`, by bucket
:class:`BucketRows`), so no process
holds the cache in memory.
"""

from __future__ import annotations

from training.data.cache.key import CACHE_VERSION, cache_key, dataset_digest, folder_digest, key_name
from training.data.cache.read import LatentCache, load_latent_cache
from training.data.cache.write import build_latent_cache

__all__ = [
    "CACHE_VERSION",
    "LatentCache",
    "build_latent_cache",
    "cache_key",
    "dataset_digest",
    "folder_digest",
    "key_name",
    "load_latent_cache",
]
