"""The layouts large datasets come in, read through ``datasets``' own parquet and webdataset builders.

* **parquet** (the Hub / LAION layout): files with an image column (datasets' ``Image`` feature,
  i.e. ``{bytes, path}``, or raw bytes) and a caption column.
* **WebDataset**: ``.tar`` shards of samples ``KEY.jpg`` (or ``.png``, ``.webp``...) + ``KEY.txt``;
  the image is the one image-typed member (or ``data.image_column``, e.g. ``jpg``), the caption is
  ``data.caption_column`` if a sample has a member of that name, else ``KEY.txt``.

Where the files of a split are found, first match wins: ``PATH/<split>/*.parquet|*.tar``;
``PATH/data/<split>-*`` and ``PATH/<split>-*`` (the Hub's ``train-00000-of-00004.parquet``); for the
train split, every such file in ``PATH``. ``data.path`` may also be a glob (``/data/laion/*.tar``),
which names the train split.

``datasets`` converts the files once into memory-mapped Arrow tables in its cache
(``HF_DATASETS_CACHE``, by default ``~/.cache/huggingface/datasets``; reused while the files are
unchanged): rows are read as they are asked for, nothing is held in memory. Every file is checked
first: an unreadable one is an error naming it, an empty one is skipped with a note.
"""

from __future__ import annotations

import glob
import tarfile
from pathlib import Path

import datasets

FORMATS = {".parquet": "parquet", ".tar": "webdataset"}


class FormatError(ValueError):
    """A parquet / WebDataset input that cannot be read (training.data re-raises it as DataError)."""


def is_glob(path: str | Path) -> bool:
    return glob.has_magic(str(path))


def find_files(path: str | Path, split: str) -> tuple[str, list[Path]] | None:
    """(``"parquet"`` or ``"webdataset"``, the split's files), or None if ``path`` holds neither."""
    if is_glob(path):
        files = sorted(Path(p) for p in glob.glob(str(path)) if Path(p).suffix in FORMATS)
        if not files:
            raise FormatError(f"data.path '{path}' matches no .parquet or .tar file")
        return (_one_kind(files, str(path)), files) if split == "train" else None
    root = Path(path)
    places = [(root / split, "*"), (root / "data", f"{split}-*"), (root, f"{split}-*")]
    if split == "train":
        places.append((root, "*"))
    for folder, stem in places:
        files = sorted(p for suffix in FORMATS for p in folder.glob(stem + suffix) if p.is_file())
        if files:
            return _one_kind(files, str(folder)), files
    return None


def _one_kind(files: list[Path], where: str) -> str:
    kinds = {FORMATS[p.suffix] for p in files}
    if len(kinds) > 1:
        raise FormatError(f"'{where}' mixes parquet and .tar files; keep one format per split")
    return kinds.pop()


def _rows(path: Path, kind: str) -> int:
    """Rows of a parquet file (its footer) / whether a tar holds any member (its first header);
    an unreadable file is an error naming it."""
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
        with tarfile.open(path) as tar:
            return int(tar.next() is not None)
    except (OSError, tarfile.TarError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        if kind == "webdataset" and path.stat().st_size == 0:
            return 0  # an empty file: nothing to read (tarfile calls it "empty file")
        raise FormatError(f"'{path}' is not a readable {'parquet' if kind == 'parquet' else 'tar'} file ({err})") from None


def load_files(kind: str, files: list[Path], split: str, image_column: str, caption_column: str, where: str) -> datasets.Dataset:
    """The split as a memory-mapped ``datasets.Dataset`` with columns ``image`` (undecoded:
    ``{bytes, path}`` or bytes) and ``text`` (None where there is no caption column)."""
    rows = {p: _rows(p, kind) for p in files}
    empty = [p for p, n in rows.items() if n == 0]
    if empty:
        print(f"note: {len(empty)} of {len(files)} {kind} files of '{where}' hold no sample and are skipped (first: {empty[0]})")
    files = [p for p in files if rows[p]]
    if not files:
        raise FormatError(f"'{where}' (split '{split}') holds no images: every {kind} file is empty")
    try:
        ds = datasets.load_dataset(kind, data_files={split: [str(p) for p in files]}, split=split)
    except (datasets.exceptions.DatasetGenerationError, ValueError) as err:
        hint = " (every sample of a shard needs the same members, e.g. KEY.jpg + KEY.txt)" if kind == "webdataset" else ""
        raise FormatError(f"could not read the {kind} files of '{where}': {err.__cause__ or err}{hint}") from None
    image = _image_column(ds, image_column, kind, where)
    caption = (
        caption_column
        if caption_column in ds.column_names
        else "txt"
        if kind == "webdataset" and "txt" in ds.column_names
        else None
    )
    if isinstance(ds.features[image], datasets.Image):
        ds = ds.cast_column(image, datasets.Image(decode=False))  # decoded by the training data, which catches bad files
    ds = ds.select_columns([image] + ([caption] if caption else []))
    names = {image: "image", **({caption: "text"} if caption else {})}
    ds = ds.rename_columns({old: new for old, new in names.items() if old != new})
    return ds if caption else ds.add_column("text", [None] * len(ds))


def _image_column(ds: datasets.Dataset, name: str, kind: str, where: str) -> str:
    if name in ds.column_names:
        return name
    images = [c for c, f in ds.features.items() if isinstance(f, datasets.Image)]
    if kind == "webdataset" and len(images) == 1:  # KEY.jpg / KEY.png: the member's extension names the column
        return images[0]
    raise FormatError(f"data.image_column='{name}' is not a column of '{where}'; columns: {', '.join(ds.column_names)}")


def write_parquet(rows: list[dict], path: Path) -> None:
    """``rows`` of ``{"image": {"bytes", "path"}, "text"}`` as one parquet file with datasets' Image feature."""
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))


def write_tar(rows: list[dict], path: Path, keys: list[str]) -> None:
    """``rows`` as a WebDataset shard: ``KEY.<image extension>`` + ``KEY.txt`` per row, in order,
    with fixed owner and times so the same rows always give the same bytes."""
    import io

    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, row in zip(keys, rows, strict=True):
            ext = Path(row["image"]["path"]).suffix.lower() or ".png"
            for name, data in ((f"{key}{ext}", row["image"]["bytes"]), (f"{key}.txt", row["text"].encode("utf-8"))):
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))
