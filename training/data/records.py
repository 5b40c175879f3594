"""Image-caption datasets from local folders, validated before training starts.

Accepted ``data.path`` layouts:
- an imagefolder: image files, optionally with ``metadata.jsonl`` lines
  ``{"file_name": "a.png", "<caption_column>": "..."}`` (file names relative to the jsonl);
  a ``<split>/`` subfolder (``train/``, ``test/``) is used when present (the datasets convention);
- a folder written by ``datasets.Dataset.save_to_disk`` (or a DatasetDict, by split);
- parquet files or WebDataset ``.tar`` shards (``training/data/formats.py``), or a glob of them.
Images are decoded lazily (``training/data/loader.py``); an unreadable one is skipped and counted
(``on_bad_image=skip``) or is an error naming the file (``on_bad_image=error``).
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from runtime.errors import InputError
from training.config import ConfigError
from training.data import formats
from training.data.buckets import BucketConfig

LIST_FEATURES = (datasets.List, datasets.Sequence, datasets.LargeList)  # a caption column of several captions per image
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
    # masked loss (the latent model): "alpha" (each image's alpha channel; none: all counts) or a folder of mask images
    # named like the images (same stem, any image format; white counts, black does not, grey in between)
    mask: str | None = None

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
    saved dataset's caption column, or a ``.txt`` file beside each image (same stem). Several captions of one image
    (a list, or a ``.txt`` file's lines) are its variants, one a line of ``text`` (``training/data/captions.py``).
    ``captions=True`` (text-to-image training): an image without a caption is an error."""
    split = split or cfg.split
    root = Path(path)
    if not formats.is_glob(path):
        if not root.exists():
            raise DataError(f"dataset folder '{root}' does not exist (data.path)")
        if not root.is_dir():
            raise DataError(
                f"data.path '{root}' is a file; expected an image folder, a save_to_disk folder, "
                "parquet files or .tar shards (a folder of them, or a glob such as 'shards/*.tar')"
            )
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
    ds = _variants_as_lines(ds)
    texts = ds.select_columns(["text"])  # read 1,024 rows at a time: the whole column as one list grows with the dataset
    nones, missing = 0, []  # None: no caption column (parquet, WebDataset), or a sample without one
    for start in range(0, len(ds), 1024):
        for i, text in enumerate(texts[start : start + 1024]["text"], start):
            nones += text is None
            if text is None or not str(text).strip():
                missing.append(i)
    if captions and nones == len(ds):
        raise DataError(
            f"data.caption_column='{cfg.caption_column}' is not a column of '{path}' (WebDataset: no KEY.txt either); "
            "set data.caption_column, or data.caption for one caption for all"
        )
    if captions and missing:
        raise DataError(
            f"{len(missing)} of {len(ds)} images in '{path}' have no caption (first: {describe(ds[missing[0]]['image'])}); add a "
            "metadata.jsonl with file_name + caption, a .txt file beside each image, or set data.caption for one caption for all"
        )
    if not captions and nones:  # an autoencoder needs no caption
        ds = ds.remove_columns("text").add_column("text", ["" if t is None else t for t in ds["text"]])
    return ds


def _variants_as_lines(ds: datasets.Dataset) -> datasets.Dataset:
    """A list column of captions (several per image: a saved dataset's or parquet's) as one text per image, the
    variants one a line (``training.data.captions``)."""
    if not isinstance(ds.features["text"], LIST_FEATURES):
        return ds
    texts = [_joined(t) for chunk in ds.select_columns(["text"]).iter(batch_size=1024) for t in chunk["text"]]
    return ds.remove_columns("text").add_column("text", texts)  # the images stay memory-mapped (a map would copy them)


def _joined(captions: Any) -> str | None:
    """A caption, or a list of captions one a line (a newline inside one becomes a space)."""
    if isinstance(captions, (list, tuple)):
        return "\n".join(" ".join(str(c).split("\n")) for c in captions if c is not None and str(c).strip())
    return None if captions is None else str(captions)


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
        raise DataError(
            f"data.image_column='{cfg.image_column}' is not a column of '{root}'; columns: {', '.join(ds.column_names)}"
        )
    if isinstance(ds.features.get(cfg.image_column), datasets.Image):
        ds = ds.cast_column(cfg.image_column, datasets.Image(decode=False))  # we decode, and catch bad files
    if cfg.caption_column not in ds.column_names:
        if captions and cfg.caption is None:
            raise DataError(
                f"data.caption_column='{cfg.caption_column}' is not a column of '{root}'; columns: {', '.join(ds.column_names)}"
            )
        ds = ds.select_columns([cfg.image_column]).add_column("_caption", [""] * len(ds))  # an autoencoder needs none
        caption = "_caption"
    else:
        ds, caption = ds.select_columns([cfg.image_column, cfg.caption_column]), cfg.caption_column
        if ds.features[caption] != datasets.Value("string") and not isinstance(ds.features[caption], LIST_FEATURES):
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
        texts = [
            p.with_suffix(".txt").read_text(encoding="utf-8").strip() if p.with_suffix(".txt").is_file() else "" for p in files
        ]
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
                texts.append(_joined(row[cfg.caption_column]) or "")  # a list: several captions, one a line
    return datasets.Dataset.from_dict({"image": paths, "text": texts})


def describe(source: Any) -> str:
    if isinstance(source, dict):
        return source.get("path") or "<image bytes>"
    return str(source) if isinstance(source, (str, Path)) else "<image>"
