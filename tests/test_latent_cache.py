"""The latent cache (training/latent_cache.py): shards, counts, resumed encodes."""

import pytest
import torch
from PIL import Image

from tests.conftest import write_imagefolder


def test_upscaled_count_survives_an_interrupted_encode(tmp_path):
    """Each shard keeps its own count, so an encode resumed after an interruption still reports
    every upscaled image, not only those of the shards it encoded itself."""
    from autoencoder import build_autoencoder
    from training.data import DataConfig, load_records
    from training.latent_cache import build_latent_cache, load_latent_cache

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
    from training.data import DataConfig, load_records

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
    from training.latent_cache import build_latent_cache

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
    from training.latent_cache import build_latent_cache

    vae, data, records = _setup(tmp_path, n=4)
    with pytest.raises(RuntimeError, match=r"shards \[1\] were not written"):  # rank 1 never ran
        build_latent_cache(tmp_path / "c", {"k": 1}, vae, records, data, shard_size=2, show_progress=False, rank=0, world_size=2)


def test_rows_read_from_the_shard_files_equal_the_saved_tensors_in_any_order_across_shards(tmp_path):
    """ShardRows reads rows from several safetensors files without loading them: the result is
    what safetensors itself reads, for any order, repeats and shard boundaries, bf16 included."""
    from safetensors.torch import load_file, save_file

    from training.latent_cache import ShardRows, _tensor_files

    g = torch.Generator().manual_seed(0)
    parts = [{"x": torch.randn(n, 2, 3, generator=g), "h": torch.randn(n, 4, generator=g).bfloat16(), "i": torch.arange(n) * 7}
             for n in (3, 1, 4)]  # fmt: skip
    for k, p in enumerate(parts):
        save_file(p, str(tmp_path / f"shard-{k}.safetensors"), metadata={"upscaled": "0"})
    files = [_tensor_files(tmp_path / f"shard-{k}.safetensors") for k in range(3)]
    idx = torch.tensor([7, 0, 3, 3, 4, 2, 6])
    for name in ("x", "h", "i"):
        rows = ShardRows([f[name] for f in files])
        whole = torch.cat([load_file(str(tmp_path / f"shard-{k}.safetensors"))[name] for k in range(3)])
        assert rows.shape == tuple(whole.shape) and len(rows) == 8
        got = rows[idx]
        assert got.dtype == whole.dtype and torch.equal(got, whole[idx]) and torch.equal(rows.read_all(), whole)
