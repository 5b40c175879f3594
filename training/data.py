"""Image-caption datasets from local folders, validated before training starts.

Accepted ``data.path`` layouts:
- an imagefolder: image files, optionally with ``metadata.jsonl`` lines
  ``{"file_name": "a.png", "<caption_column>": "..."}`` (file names relative to the jsonl);
  a ``<split>/`` subfolder (``train/``, ``test/``) is used when present (the datasets convention);
- a folder written by ``datasets.Dataset.save_to_disk`` (or a DatasetDict, by split);
- parquet files or WebDataset ``.tar`` shards (``training/formats.py``), or a glob of them.
Images are decoded lazily; an unreadable one is skipped and counted (``on_bad_image=skip``)
or is an error naming the file (``on_bad_image=error``).
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import datasets
import numpy as np
import torch
from PIL import Image

from runtime.errors import InputError
from runtime.images import open_image, to_rgb
from training import formats
from training.buckets import BucketBatchSampler, BucketConfig, Size, cover_and_crop
from training.config import ConfigError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class OnBadImage(str, enum.Enum):
    skip = "skip"
    error = "error"


@dataclass(frozen=True)
class DataConfig:
    path: str = "data/openmoji-32"
    split: str = "train"  # subfolder / DatasetDict split used for training
    eval_split: str | None = "test"  # held-out split for metrics (None: no held-out metrics)
    image_column: str = "image"
    caption_column: str = "text"
    caption: str | None = None  # one caption for every image (e.g. "a photo of sks dog"); overrides any other
    resolution: int = 32
    random_flip: bool = False  # off by default: flipping changes meaning ("left arrow")
    on_bad_image: OnBadImage = OnBadImage.skip
    num_workers: int = 0
    buckets: BucketConfig = field(default_factory=BucketConfig)  # aspect-ratio buckets instead of square crops

    def __post_init__(self) -> None:
        if self.resolution < 1:
            raise ConfigError(f"data.resolution={self.resolution} must be >= 1")


class DataError(InputError):
    """A dataset that cannot be trained on; raised before any training work."""


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def split_dir(path: str | Path, split: str) -> Path | None:
    """The folder holding ``split``: ``path/split`` if it exists, else ``path`` itself for 'train'."""
    path = Path(path)
    if (path / split).is_dir():
        return path / split
    return path if split == "train" else None


def has_split(path: str | Path, split: str | None) -> bool:
    if split is None:
        return False
    if formats.is_glob(path):
        return split == "train"
    path = Path(path)
    if _is_saved_dataset(path) and (path / "dataset_dict.json").is_file():
        return split in json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
    return (path / split).is_dir() or (split != "train" and _data_files(path, split) is not None)


def load_records(path: str | Path, cfg: DataConfig, split: str | None = None, captions: bool = False) -> datasets.Dataset:
    """A ``datasets.Dataset`` with columns ``image`` (path or encoded bytes) and ``text``.

    Captions come from ``data.caption`` (one for all), else metadata.jsonl's caption column, a
    saved dataset's caption column, or a ``.txt`` file beside each image (same stem).
    ``captions=True`` (text-to-image training): an image without a caption is an error."""
    split = split or cfg.split
    root = Path(path)
    if not formats.is_glob(path):
        if not root.exists():
            raise DataError(f"dataset folder '{root}' does not exist (data.path)")
        if not root.is_dir():
            raise DataError(f"data.path '{root}' is a file; expected an image folder, a save_to_disk folder, "
                            "parquet files or .tar shards (a folder of them, or a glob such as 'shards/*.tar')")  # fmt: skip
    if _is_saved_dataset(root):
        ds = _load_saved(root, cfg, split, captions)
    elif found := _data_files(path, split):
        try:
            ds = formats.load_files(*found, split, cfg.image_column, cfg.caption_column, str(path))
        except formats.FormatError as err:
            raise DataError(str(err)) from None
    else:
        folder = split_dir(root, split)
        if folder is None:
            raise DataError(f"dataset '{root}' has no '{split}' split folder")
        ds = _scan_imagefolder(folder, cfg, is_root=folder == root)
    if len(ds) == 0:
        raise DataError(f"dataset '{root}' (split '{split}') holds no images")
    if cfg.caption is not None:
        return ds.remove_columns("text").add_column("text", [cfg.caption] * len(ds))
    texts = ds["text"]  # None: no caption column (parquet, WebDataset), or a sample without one
    if captions and all(t is None for t in texts):
        raise DataError(f"data.caption_column='{cfg.caption_column}' is not a column of '{path}' (WebDataset: no KEY.txt either); "
                        "set data.caption_column, or data.caption for one caption for all")  # fmt: skip
    if captions:
        missing = [i for i, text in enumerate(texts) if text is None or not str(text).strip()]
        if missing:
            raise DataError(
                f"{len(missing)} of {len(ds)} images in '{path}' have no caption (first: {describe(ds[missing[0]]['image'])}); add a "
                "metadata.jsonl with file_name + caption, a .txt file beside each image, or set data.caption for one caption for all"
            )
    elif None in texts:  # an autoencoder needs no caption
        ds = ds.remove_columns("text").add_column("text", ["" if t is None else t for t in texts])
    return ds


def _data_files(path: str | Path, split: str) -> tuple[str, list[Path]] | None:
    try:
        return formats.find_files(path, split)
    except formats.FormatError as err:
        raise DataError(str(err)) from None


def _load_saved(root: Path, cfg: DataConfig, split: str, captions: bool = False) -> datasets.Dataset:
    ds = datasets.load_from_disk(str(root))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"saved dataset '{root}' has no split '{split}'; splits: {', '.join(ds)}")
        ds = ds[split]
    if cfg.image_column not in ds.column_names:
        raise DataError(f"data.image_column='{cfg.image_column}' is not a column of '{root}'; columns: {', '.join(ds.column_names)}")
    if isinstance(ds.features.get(cfg.image_column), datasets.Image):
        ds = ds.cast_column(cfg.image_column, datasets.Image(decode=False))  # we decode, and catch bad files
    if cfg.caption_column not in ds.column_names:
        if captions and cfg.caption is None:
            raise DataError(f"data.caption_column='{cfg.caption_column}' is not a column of '{root}'; columns: {', '.join(ds.column_names)}")
        ds = ds.select_columns([cfg.image_column]).add_column("_caption", [""] * len(ds))  # an autoencoder needs none
        caption = "_caption"
    else:
        ds, caption = ds.select_columns([cfg.image_column, cfg.caption_column]), cfg.caption_column
        if ds.features[caption] != datasets.Value("string"):
            ds = ds.cast_column(caption, datasets.Value("string"))
    # renamed, not copied: a saved dataset stays memory-mapped
    return ds.rename_columns({old: new for old, new in ((cfg.image_column, "image"), (caption, "text")) if old != new})


def _safe_join(folder: Path, name: Any, where: str) -> Path:
    if not isinstance(name, str) or not name:
        raise DataError(f"{where}: 'file_name' must be a non-empty relative path, got {name!r}")
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise DataError(f"{where}: file_name '{name}' escapes the dataset folder; use a path relative to it")
    return folder / name


SPLIT_NAMES = {"train", "test", "validation", "valid", "val", "eval", "heldout"}


def _files(folder: Path, pattern: str, skip: set[str]) -> list[Path]:
    """``folder.rglob(pattern)`` minus anything under a top-level subfolder named in ``skip``."""
    return sorted(p for p in folder.rglob(pattern) if p.relative_to(folder).parts[0] not in skip)


def _scan_imagefolder(folder: Path, cfg: DataConfig, is_root: bool = False) -> datasets.Dataset:
    # When the dataset's root folder is itself the train split, its split subfolders (test/,
    # validation/, the configured eval split) hold held-out images: never train on them.
    skip = (SPLIT_NAMES | {cfg.eval_split or ""}) if is_root else set()
    metas = _files(folder, "metadata.jsonl", skip)
    paths: list[str] = []
    texts: list[str] = []
    if not metas:  # no metadata.jsonl: every image, captioned by a same-stem .txt file where there is one
        files = [p for p in _files(folder, "*", skip) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
        texts = [p.with_suffix(".txt").read_text(encoding="utf-8").strip() if p.with_suffix(".txt").is_file() else "" for p in files]
        return datasets.Dataset.from_dict({"image": [str(p) for p in files], "text": texts})
    for meta in metas:
        with open(meta, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{meta}:{lineno}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{where}: not valid JSON ({err.msg})") from None
                file = _safe_join(meta.parent, row.get("file_name"), where)
                if not file.is_file():
                    raise DataError(f"{where}: file_name '{row['file_name']}' does not exist in {meta.parent}")
                if cfg.caption_column not in row:
                    raise DataError(
                        f"{where}: data.caption_column='{cfg.caption_column}' is not in this line; "
                        f"keys: {', '.join(k for k in row if k != 'file_name')}"
                    )
                paths.append(str(file))
                texts.append(str(row[cfg.caption_column]))
    return datasets.Dataset.from_dict({"image": paths, "text": texts})


# ---- decoding and transforms ----------------------------------------------------------------


def open_rgb(source: Any) -> Image.Image:
    """Decode a path / bytes / ``{"bytes", "path"}`` into RGB; transparency goes onto white."""
    img = open_image(source)
    img.load()  # truncated files fail here, not later
    return to_rgb(img)


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    scale = size / min(w, h)
    if (w, h) != (size, size):
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return img


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float in [-1, 1]."""
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def describe(source: Any) -> str:
    if isinstance(source, dict):
        return source.get("path") or "<image bytes>"
    return str(source) if isinstance(source, (str, Path)) else "<image>"


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Decodes and transforms one record; the key may be ``index`` or ``(index, flip)``."""

    def __init__(self, records: datasets.Dataset, cfg: DataConfig, buckets: list[Size] | None = None,
                 bucket_of: list[int] | None = None) -> None:  # fmt: skip
        self.records = records
        self.resolution = cfg.resolution
        self.on_bad_image = OnBadImage(cfg.on_bad_image)
        self.buckets, self.bucket_of = buckets, bucket_of  # with buckets: each image covers its own, centre-cropped

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, bool]) -> dict:
        index, flip = key if isinstance(key, tuple) else (key, False)
        row = self.records[int(index)]
        try:
            img = open_rgb(row["image"])
        except Exception as err:  # noqa: BLE001 - any undecodable file is "bad data", never a crash
            if self.on_bad_image == OnBadImage.error:
                raise DataError(f"cannot read image '{describe(row['image'])}': {err} (set data.on_bad_image=skip to skip such files)") from None
            return {"bad": describe(row["image"])}
        if self.buckets is not None:
            h, w = self.buckets[self.bucket_of[int(index)]]
            upscaled = img.height < h or img.width < w
            x = to_tensor(cover_and_crop(img, (h, w))[0])  # (3, h, w)
        else:
            upscaled = min(img.size) < self.resolution
            x = to_tensor(resize_center_crop(img, self.resolution))  # (3, R, R)
        if flip:
            x = x.flip(-1)
        return {"pixel_values": x, "text": row["text"], "index": int(index), "upscaled": upscaled}


def collate(items: list[dict]) -> dict:
    good = [it for it in items if "bad" not in it]
    bad = [it["bad"] for it in items if "bad" in it]
    if good:
        pixels = torch.stack([it["pixel_values"] for it in good])
    else:
        pixels = torch.empty(0)
    return {
        "pixel_values": pixels,  # (B', 3, R, R), B' <= B after skipping bad files
        "text": [it["text"] for it in good],
        "index": [it["index"] for it in good],
        "bad_files": bad,
        "upscaled": sum(it["upscaled"] for it in good),  # images smaller than the resolution
    }


class ResumableBatchSampler(torch.utils.data.Sampler):
    """An endless, deterministic stream of batches that can start at any global batch.

    Epoch ``e`` visits a permutation seeded by ``(seed, e)``; each global batch of
    ``batch_size * world_size`` indices is split across ranks. Batch ``k`` is the same whether
    the run started at 0 or resumed at ``k``, and, for the same global batch size, whatever the
    number of processes.
    Incomplete last batches are dropped.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, start: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, random_flip: bool = False, repeat_small: bool = False) -> None:
        self.n, self.batch_size, self.seed, self.start = num_items, batch_size, seed, start
        self.rank, self.world, self.shuffle, self.random_flip = rank, world_size, shuffle, random_flip
        self.global_batch = batch_size * world_size
        # repeat_small: a dataset smaller than one global batch is drawn with replacement: each
        # epoch visits ceil(global batch / n) permutations back to back.
        self.repeats = 1
        if num_items < self.global_batch:
            if not repeat_small:
                raise DataError(
                    f"the dataset has {num_items} images, fewer than one global batch "
                    f"({batch_size} x {world_size} processes); lower train.batch_size"
                )
            self.repeats = -(-self.global_batch // num_items)
        self.batches_per_epoch = num_items * self.repeats // self.global_batch

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        b, epoch, perm, flips = self.start, -1, None, None
        while True:
            e, k = divmod(b, self.batches_per_epoch)
            if e != epoch:
                epoch = e
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + e)
                perm = torch.cat([torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
                                  for _ in range(self.repeats)])  # fmt: skip
                flips = torch.rand(self.n, generator=g) < 0.5 if self.random_flip else torch.zeros(self.n, dtype=torch.bool)
            idx = perm[k * self.global_batch:(k + 1) * self.global_batch][self.rank::self.world]
            yield [(int(i), bool(flips[i])) for i in idx]
            b += 1

    def __len__(self) -> int:  # endless; len() is one epoch
        return self.batches_per_epoch


def train_loader(records: datasets.Dataset, cfg: DataConfig, batch_size: int, seed: int, start_batch: int = 0,
                 rank: int = 0, world_size: int = 1, buckets: tuple[list[Size], list[int]] | None = None) -> torch.utils.data.DataLoader:
    """Endless shuffled batches from ``start_batch`` on; with ``buckets`` (the sizes, and each image's
    bucket) every batch holds images of one bucket, each covering it and centre-cropped."""
    if buckets is not None:
        sampler = BucketBatchSampler(buckets[1], len(buckets[0]), batch_size, seed, start_batch, rank, world_size, cfg.random_flip)
    else:
        sampler = ResumableBatchSampler(len(records), batch_size, seed, start_batch, rank, world_size, True, cfg.random_flip)
    return torch.utils.data.DataLoader(
        ImageCaptionDataset(records, cfg, *(buckets or (None, None))), batch_sampler=sampler, collate_fn=collate,
        num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0,
        generator=_own_generator(seed),
    )


def spread_indices(num_items: int, n: int) -> list[int]:
    """``min(n, num_items)`` indices spread evenly over ``range(num_items)``."""
    n = min(n, num_items)
    return [i * num_items // n for i in range(n)]


def eval_loader(records: datasets.Dataset, cfg: DataConfig, batch_size: int, size: Size | None = None) -> torch.utils.data.DataLoader:
    """Every image in order, resized and centre-cropped to the square ``data.resolution``, or to
    cover ``size`` (height, width), aspect kept, and centre-cropped to it."""
    dataset = ImageCaptionDataset(records, cfg, *(([size], [0] * len(records)) if size else ()))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate, generator=_own_generator(0))


def _own_generator(seed: int) -> torch.Generator:
    """DataLoader iterators draw a seed at creation; from the global RNG that would shift every
    later random draw and break exact resume, so each loader gets its own generator."""
    return torch.Generator().manual_seed(seed)
