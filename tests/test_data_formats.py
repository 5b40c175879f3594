"""Parquet and WebDataset inputs (training/data/formats.py through training/data/records.py): the same cache as
the imagefolder they were made from, and every bad-input case named in one line."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import datasets
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.conftest import fresh_state
from training.data.loader import ImageCaptionDataset
from training.data.records import DataConfig, DataError, has_split, load_records
from training.prepare_data import convert


@pytest.fixture(scope="module")
def converted(openmoji_small, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("formats")
    return {"imagefolder": openmoji_small,
            "parquet": _convert(openmoji_small, root / "parquet", "parquet"),
            "webdataset": _convert(openmoji_small, root / "wds", "webdataset")}  # fmt: skip


def _convert(src, out, kind):
    counts = convert(src, out, kind, shard_size=50)
    assert counts == {"train": len(load_records(src, DataConfig(path=str(src)))), "test": len(load_records(src, DataConfig(path=str(src)), split="test"))}
    return out


def test_prepare_data_writes_the_layouts_big_datasets_come_in(converted):
    parquet, wds = converted["parquet"], converted["webdataset"]
    n = -(-len(load_records(converted["imagefolder"], DataConfig())) // 50)
    assert sorted(p.name for p in (parquet / "train").iterdir()) == [f"train-{k:05d}-of-{n:05d}.parquet" for k in range(n)]  # the Hub's naming
    with tarfile.open(wds / "train" / "000000.tar") as tar:
        names = tar.getnames()
    assert names[:2] == ["000000000.png", "000000000.txt"] and len(names) == 100  # KEY.png + KEY.txt, 50 samples per shard
    for path in (parquet, wds):
        assert has_split(path, "test") and not has_split(path, "validation")


def test_parquet_and_webdataset_give_the_imagefolders_latent_cache_tensor_for_tensor(converted, tmp_path):
    """Same rows in the same order, same decoded pixels, same captions: every tensor of every
    shard is equal (the key differs only in the dataset digest: file paths vs image bytes)."""
    from autoencoder import build_autoencoder
    from ldm.text import build_clip_text_encoder, clip_tokenizer
    from training.data.cache import build_latent_cache, cache_key, load_latent_cache

    torch.manual_seed(0)
    vae, text = build_autoencoder("tiny", 32).eval(), (clip_tokenizer(), build_clip_text_encoder("tiny").eval())
    built = {}
    for kind, path in converted.items():
        data = DataConfig(path=str(path), random_flip=True)
        records = load_records(path, data, captions=True)
        key = cache_key("vae", data, records, "clip")
        folder = build_latent_cache(tmp_path / kind, key, vae, records, data, text, batch_size=32, shard_size=64, show_progress=False)
        built[kind] = (folder, key, load_latent_cache(folder, records).captions)
    ref_folder, ref_key, ref_captions = built.pop("imagefolder")
    ref = {p.name: load_file(str(p)) for p in sorted(ref_folder.glob("shard-*"))}
    assert len(ref) > 1 and set(ref["shard-00000.safetensors"]) == {f"{t}@32x32" for t in ("moments", "moments_flipped", "index", "text_states", "text_mask")}
    for kind, (folder, key, captions) in built.items():
        shards = {p.name: load_file(str(p)) for p in sorted(folder.glob("shard-*"))}
        assert shards.keys() == ref.keys(), kind
        for name, tensors in shards.items():
            assert tensors.keys() == ref[name].keys() and all(torch.equal(tensors[t], ref[name][t]) for t in tensors), (kind, name)
        assert list(captions) == list(ref_captions)
        assert {k: v for k, v in key.items() if k != "dataset"} == {k: v for k, v in ref_key.items() if k != "dataset"}
        assert json.loads((folder / "complete.json").read_text()) == json.loads((ref_folder / "complete.json").read_text())


def test_stage_2_trains_on_webdataset_shards_named_by_a_glob(converted, tmp_path):
    from autoencoder import build_autoencoder, save_autoencoder
    from tests.conftest import ldm_cfg
    from training.train_ldm import train

    torch.manual_seed(0)
    vae = save_autoencoder(build_autoencoder("tiny", 32), tmp_path / "vae")
    shards = converted["webdataset"] / "train" / "*.tar"
    fresh_state(train)(ldm_cfg(shards, vae, tmp_path / "run", "train.max_steps=2", "train.sample_every=100", "model.check_images=0",
                               "eval.num_prompts=0"))  # fmt: skip
    start = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert start["cached_images"] == len(load_records(converted["imagefolder"], DataConfig()))
    assert (tmp_path / "run" / "pipeline" / "model_index.json").is_file()


# ---- bad input ------------------------------------------------------------------------------


def _png(colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buf, "PNG")
    return buf.getvalue()


def _parquet(path: Path, rows: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(rows).to_parquet(str(path))


def _tar(path: Path, members: dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_a_missing_caption_column_is_named_and_an_autoencoder_needs_none(tmp_path):
    images = [{"bytes": _png(), "path": f"{i}.png"} for i in range(3)]
    _parquet(tmp_path / "pq" / "train" / "a.parquet", {"image": images, "caption": ["a", "b", "c"]})
    with pytest.raises(DataError, match="data.caption_column='text' is not a column"):
        load_records(tmp_path / "pq", DataConfig(path=str(tmp_path / "pq")), captions=True)
    assert load_records(tmp_path / "pq", DataConfig(caption_column="caption"), captions=True)["text"] == ["a", "b", "c"]
    assert load_records(tmp_path / "pq", DataConfig())["text"] == ["", "", ""]  # stage 1 reads no caption

    _tar(tmp_path / "wds" / "0.tar", {"k0.png": _png(), "k1.png": _png()})
    with pytest.raises(DataError, match="no KEY.txt either"):
        load_records(tmp_path / "wds", DataConfig(), captions=True)
    with pytest.raises(DataError, match="data.image_column='picture' is not a column.*image, caption"):
        load_records(tmp_path / "pq", DataConfig(image_column="picture"))


def test_a_sample_without_its_caption_is_named(tmp_path):
    members = {n: d for i in range(6) for n, d in ((f"k{i}.png", _png()), (f"k{i}.txt", b"red"))}
    _tar(tmp_path / "wds" / "0.tar", {**members, "k6.png": _png(), "k7.png": _png(), "k7.txt": b"blue"})
    with pytest.raises(DataError, match=r"1 of 8 images .* have no caption \(first: k6.png\)"):
        load_records(tmp_path / "wds", DataConfig(), captions=True)
    # among the first samples, from which datasets reads the columns, it is the shard that is named
    _tar(tmp_path / "early" / "0.tar", {"k0.png": _png(), "k0.txt": b"red", "k1.png": _png()})
    with pytest.raises(DataError, match=r"could not read the webdataset files of .*early.*same members"):
        load_records(tmp_path / "early", DataConfig(), captions=True)


@pytest.mark.parametrize("kind", ["parquet", "webdataset"])
def test_corrupt_image_bytes_are_skipped_and_counted_or_named(tmp_path, kind):
    blobs = [_png(), b"\x89PNG\r\n\x1a\n garbage", _png((0, 0, 255))]
    if kind == "parquet":
        _parquet(tmp_path / "d" / "train-0.parquet", {"image": [{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(blobs)],
                                                      "text": ["a", "b", "c"]})  # fmt: skip
    else:
        _tar(tmp_path / "d" / "0.tar", {n: d for i, b in enumerate(blobs) for n, d in ((f"k{i}.png", b), (f"k{i}.txt", b"x"))})
    data = DataConfig(path=str(tmp_path / "d"))
    records = load_records(data.path, data, captions=True)
    items = [ImageCaptionDataset(records, data)[i] for i in range(3)]
    assert [("bad" in it) for it in items] == [False, True, False] and items[1]["bad"].endswith("1.png")
    with pytest.raises(DataError, match="cannot read image '.*1.png'"):
        ImageCaptionDataset(records, DataConfig(on_bad_image="error"))[1]


@pytest.mark.parametrize("kind", ["parquet", "webdataset"])
def test_empty_shards_are_skipped_with_a_note_and_all_empty_is_an_error(tmp_path, kind, capsys):
    good = tmp_path / "d" / ("train-1.parquet" if kind == "parquet" else "1.tar")
    if kind == "parquet":
        _parquet(good, {"image": [{"bytes": _png(), "path": "0.png"}], "text": ["red"]})
        empty = good.with_name("train-0.parquet")
        _parquet(empty, {"image": [{"bytes": _png(), "path": "0.png"}], "text": ["red"]})
        datasets.load_dataset("parquet", data_files=str(empty), split="train").select([]).to_parquet(str(empty))  # 0 rows, same schema
    else:
        _tar(good, {"k0.png": _png(), "k0.txt": b"red"})
        empty = good.with_name("0.tar")
        _tar(empty, {})  # a tar without a member (the first file: datasets would read its features from it)
        (tmp_path / "d" / "2.tar").write_bytes(b"")  # a 0-byte file
    records = load_records(tmp_path / "d", DataConfig(), captions=True)
    assert records["text"] == ["red"]
    assert f"hold no sample and are skipped (first: {empty})" in capsys.readouterr().out
    good.unlink()
    with pytest.raises(DataError, match="holds no images: every .* file is empty"):
        load_records(tmp_path / "d", DataConfig(), captions=True)


@pytest.mark.parametrize("name", ["train-0.parquet", "0.tar"])
def test_a_file_that_is_not_parquet_or_tar_is_named(tmp_path, name):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / name).write_bytes(b"this is not the format its name says" * 50)
    with pytest.raises(DataError, match=f"'{tmp_path / 'd' / name}' is not a readable"):
        load_records(tmp_path / "d", DataConfig())


def test_a_glob_that_matches_nothing_or_mixes_formats_is_an_error(tmp_path):
    with pytest.raises(DataError, match="matches no .parquet or .tar file"):
        load_records(str(tmp_path / "*.tar"), DataConfig())
    _tar(tmp_path / "d" / "train-1.tar", {"k0.png": _png(), "k0.txt": b"red"})
    _parquet(tmp_path / "d" / "train-0.parquet", {"image": [{"bytes": _png(), "path": "0.png"}], "text": ["red"]})
    with pytest.raises(DataError, match="mixes parquet and .tar files"):
        load_records(tmp_path / "d", DataConfig())
