"""The latent cache (training/latent_cache.py): shards, counts, resumed encodes."""

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
