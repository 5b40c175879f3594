"""training/data/cache/: shards split over processes, counts, resumed encodes, damaged shards encoded
again, row readers, the key, and each cached row at its image's bucket."""

import json

import pytest
import torch
from PIL import Image

from tests.conftest import write_imagefolder
from training.data.buckets import cover_and_crop


def test_upscaled_count_survives_an_interrupted_encode(tmp_path):
    """Each shard keeps its own count, so an encode resumed after an interruption still reports
    every upscaled image, not only those of the shards it encoded itself."""
    from autoencoder import build_autoencoder
    from training.data.cache import build_latent_cache, load_latent_cache
    from training.data.records import DataConfig, load_records

    images = {f"{i}.png": Image.new("RGB", (16 if i < 3 else 32, 16 if i < 3 else 32), (40 * i, 90, 200)) for i in range(5)}
    data = DataConfig(path=str(write_imagefolder(tmp_path / "imgs", images)), resolution=32, caption="an emoji")
    records = load_records(data.path, data)
    vae = build_autoencoder("tiny", 32).eval()
    build = lambda: build_latent_cache(tmp_path / "cache", {"k": 1}, vae, records, data, shard_size=2, show_progress=False)  # noqa: E731
    folder = build()
    assert load_latent_cache(folder, records).upscaled == 3
    (folder / "complete.json").unlink()  # interrupted after shard 0: shards 1 and 2 to encode again
    for k in (1, 2):
        (folder / f"shard-{k:05d}.safetensors").unlink()
    assert load_latent_cache(build(), records).upscaled == 3


def _setup(tmp_path, n=10):
    from autoencoder import build_autoencoder
    from training.data.records import DataConfig, load_records

    images = {f"{i}.png": Image.new("RGB", (32, 32), (25 * i, 90, 200 - 15 * i)) for i in range(n)}
    data = DataConfig(path=str(write_imagefolder(tmp_path / "imgs", images)), resolution=32, caption="an emoji")
    torch.manual_seed(0)
    return build_autoencoder("tiny", 32).eval(), data, load_records(data.path, data)


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_shards_split_over_processes_are_byte_identical_to_one_process_and_an_interrupted_encode_finishes_the_same(tmp_path):
    """Rank r encodes shards r, r + world, ...; rank 0 marks the cache complete once all exist.
    (The ranks run one after the other here, with a no-op barrier; tests/test_train_ldm.py runs two
    real processes.)"""
    from training.data.cache import build_latent_cache

    vae, data, records = _setup(tmp_path)
    build = lambda root, **kw: build_latent_cache(root, {"k": 1}, vae, records, data, batch_size=2, shard_size=3,  # noqa: E731
                                                  show_progress=False, **kw)  # fmt: skip
    one = build(tmp_path / "one")
    build(tmp_path / "two", rank=1, world_size=2)  # shards 1 and 3, and no completion: rank 0 has not finished
    assert not (tmp_path / "two" / one.name / "complete.json").exists()
    two = build(tmp_path / "two", rank=0, world_size=2)  # shards 0 and 2, then complete
    assert _files(one) == _files(two) and len([n for n in _files(one) if n.startswith("shard-")]) == 4

    class Killed(Exception):
        pass

    calls = {"n": 0}
    real_encode = vae.encode

    def dies_in_shard_2(x):  # shards 0 and 1 (two batches each) finish, then the process is "killed"
        calls["n"] += 1
        if calls["n"] > 4:
            raise Killed
        return real_encode(x)

    vae.encode = dies_in_shard_2
    with pytest.raises(Killed):
        build(tmp_path / "killed")
    vae.encode = real_encode
    killed = tmp_path / "killed" / one.name
    assert sorted(n for n in _files(killed) if n.startswith("shard-")) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert _files(build(tmp_path / "killed")) == _files(one)


def test_a_missing_shard_stops_the_completion_with_its_number(tmp_path):
    from training.data.cache import build_latent_cache

    vae, data, records = _setup(tmp_path, n=4)
    with pytest.raises(RuntimeError, match=r"shards \[1\] were not written"):  # rank 1 never ran
        build_latent_cache(tmp_path / "c", {"k": 1}, vae, records, data, shard_size=2, show_progress=False, rank=0, world_size=2)


def test_rows_read_from_the_shard_files_equal_the_saved_tensors_in_any_order_across_shards(tmp_path):
    """ShardRows reads rows from several safetensors files without loading them: the result is
    what safetensors itself reads, for any order, repeats and shard boundaries, bf16 included."""
    from safetensors.torch import load_file, save_file

    from training.data.cache.shards import ShardRows, tensor_files

    g = torch.Generator().manual_seed(0)
    parts = [{"x": torch.randn(n, 2, 3, generator=g), "h": torch.randn(n, 4, generator=g).bfloat16(), "i": torch.arange(n) * 7}
             for n in (3, 1, 4)]  # fmt: skip
    for k, p in enumerate(parts):
        save_file(p, str(tmp_path / f"shard-{k}.safetensors"), metadata={"upscaled": "0"})
    files = [tensor_files(tmp_path / f"shard-{k}.safetensors") for k in range(3)]
    idx = torch.tensor([7, 0, 3, 3, 4, 2, 6])
    for name in ("x", "h", "i"):
        rows = ShardRows([f[name] for f in files])
        whole = torch.cat([load_file(str(tmp_path / f"shard-{k}.safetensors"))[name] for k in range(3)])
        assert rows.shape == tuple(whole.shape) and len(rows) == 8
        got = rows[idx]
        assert got.dtype == whole.dtype and torch.equal(got, whole[idx]) and torch.equal(rows.read_all(), whole)


def test_a_zeroed_or_truncated_shard_is_named_and_encoded_again_to_the_same_cache(tmp_path, capsys):

    from training.data.cache import build_latent_cache, load_latent_cache

    vae, data, records = _setup(tmp_path, n=10)
    build = lambda: build_latent_cache(tmp_path / "cache", {"k": 1}, vae, records, data, batch_size=2, shard_size=3,  # noqa: E731
                                       show_progress=False)  # fmt: skip
    folder = build()
    before = _files(folder)
    (folder / "shard-00001.safetensors").write_bytes(b"")  # zeroed
    shard = folder / "shard-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated
    capsys.readouterr()
    assert build() == folder and _files(folder) == before
    said = capsys.readouterr().out
    assert "shard-00001.safetensors has 0 bytes" in said and "shard-00002.safetensors has" in said and "encoding the damaged shards again" in said
    assert len(load_latent_cache(folder, records)) == 10


def test_a_shard_without_a_readable_image_is_a_valid_empty_shard_not_an_empty_file(tmp_path):
    from PIL import Image

    from autoencoder import build_autoencoder
    from tests.conftest import write_imagefolder
    from training.data.cache import build_latent_cache, load_latent_cache
    from training.data.records import DataConfig, load_records

    images = {"0.png": Image.new("RGB", (32, 32), "red"), "1.png": b"not a png", "2.png": b"nor this", "3.png": Image.new("RGB", (32, 32))}
    data = DataConfig(path=str(write_imagefolder(tmp_path / "imgs", images)), caption="x")
    records = load_records(data.path, data)
    folder = build_latent_cache(tmp_path / "cache", {"k": 1}, build_autoencoder("tiny", 32).eval(), records, data, shard_size=1,
                                show_progress=False)  # fmt: skip
    assert json.loads((folder / "complete.json").read_text())["shard_rows"] == [1, 0, 0, 1]
    assert all(p.stat().st_size > 0 for p in folder.glob("shard-*"))  # 0 bytes would be damage
    assert load_latent_cache(folder, records).source_index.tolist() == [0, 3]


def test_the_cache_key_changes_with_the_bucket_set_and_the_square_is_the_one_bucket_set(mixed_shapes):
    from training.data.cache import cache_key, dataset_digest, key_name
    from training.data.records import DataConfig, load_records

    data = DataConfig(path=str(mixed_shapes))
    records = load_records(mixed_shapes, data)
    square = cache_key("vae", data, records, None)
    keys = {key_name(k) for k in (square, cache_key("vae", data, records, None, [(32, 32), (16, 64)]),
                                   cache_key("vae", data, records, None, [(32, 32), (24, 40)]))}  # fmt: skip
    assert len(keys) == 3
    assert square == cache_key("vae", data, records, None, [(32, 32)])  # square crops are the one-bucket set
    assert square == {"version": 4, "vae": "vae", "resolution": 32, "buckets": ["32x32"], "images": 54 - 6, "text_encoder": None,
                      "transforms": {"resize": "cover the bucket (Lanczos down, bicubic up)", "crop": "center", "random_flip": False},
                      "dataset": dataset_digest(records)}  # fmt: skip  (pinned: a change of it re-encodes every user's cache)


def test_each_cached_row_is_its_own_images_latent_at_its_bucket_across_uneven_shards(tmp_path):
    """5 tall images, 4 wide and an unreadable file, in shards of 3: one shard holds only tall
    images, one both shapes, one only wide, and the last none readable. Row j of the cache is
    the latent of image source_index[j], at the bucket bucket_of[j] names."""
    import numpy as np

    from autoencoder.latents import encode_moments
    from autoencoder.model import build_autoencoder
    from tests.conftest import write_imagefolder
    from training.data.cache import build_latent_cache, load_latent_cache
    from training.data.loader import open_rgb, to_tensor
    from training.data.records import DataConfig, load_records

    rng = np.random.default_rng(0)
    images = {f"{i}.png": Image.fromarray(rng.integers(0, 255, (72, 24, 3) if i < 5 else (24, 72, 3), dtype=np.uint8)) for i in range(9)}
    images["9.png"] = b"not an image"
    root = write_imagefolder(tmp_path / "data", images)
    data = DataConfig(path=str(root), resolution=32)
    records = load_records(root, data)
    torch.manual_seed(0)
    vae = build_autoencoder("tiny", 32).eval()
    sizes = [(48, 20), (32, 32), (20, 48)]
    folder = build_latent_cache(tmp_path / "cache", {"k": 1}, vae, records, data, batch_size=2, shard_size=3, show_progress=False,
                                buckets=sizes)  # fmt: skip
    cache = load_latent_cache(folder, records)
    assert cache.sizes == [(48, 20), (20, 48)] and cache.bucket_of.tolist() == [0] * 5 + [1] * 4
    assert cache.source_index.tolist() == list(range(9))  # tall first, then wide, each in shard order
    with torch.no_grad():
        for j in range(len(cache)):
            size = cache.sizes[int(cache.bucket_of[j])]
            x = to_tensor(cover_and_crop(open_rgb(records[int(cache.source_index[j])]["image"]), size)[0])[None]
            row = cache.moments[[j]]
            assert row.shape[2:] == (size[0] // 4, size[1] // 4)
            torch.testing.assert_close(row, encode_moments(vae, x).float(), atol=1e-4, rtol=1e-4)
