"""What a latent cache is built from, as a key: change any of it and a new cache is built."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import datasets
import torch

from runtime.files import file_digest
from training.data.buckets import Size, size_name
from training.data.masks import mask_digest
from training.data.records import DataConfig

CACHE_VERSION = 4  # 2: caption states in bf16, masks in int8; 3: square crops are the one-bucket layout;
# 4: an image's caption lines are its variants (states (n, V, L, D) where one has several), data.mask's masks
TEXT_DTYPE = torch.bfloat16


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


def cache_key(
    vae_digest: str, data: DataConfig, records: datasets.Dataset, text_digest: str | None, buckets: list[Size] | None = None
) -> dict[str, Any]:
    """What a cache is built from; ``buckets`` None: square crops, the one bucket (data.resolution, data.resolution)."""
    return {
        "version": CACHE_VERSION,
        "vae": vae_digest,
        "resolution": data.resolution,
        "buckets": [size_name(size) for size in buckets or [(data.resolution, data.resolution)]],
        "transforms": {
            "resize": "cover the bucket (Lanczos down, bicubic up)",
            "crop": "center",
            "random_flip": data.random_flip,
        },
        "dataset": dataset_digest(records),
        "images": len(records),
        "text_encoder": text_digest,  # None: caption states are not cached (the encoder trains, or cache.text=false)
        **({"mask": mask_digest(records, data.mask)} if data.mask else {}),  # data.mask (no key before masks existed)
    }


def key_name(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
