"""Stage 2's latent cache: the dataset encoded once by the frozen autoencoder (and the frozen text
encoder), keyed by what it was built from, every process its share of the shards."""

from __future__ import annotations

from pathlib import Path

from runtime.files import file_digest
from training.data.buckets import Size
from training.data.cache import LatentCache, build_latent_cache, cache_key, folder_digest, load_latent_cache
from training.ldm_config import LdmJobConfig
from training.stage2.models import Models


def open_latent_cache(cfg: LdmJobConfig, models: Models, records, sizes: list[Size] | None, accelerator) -> LatentCache:
    """The cache of ``records`` under ``cache.dir`` (default ``output_dir/latent-cache``): reused when its key matches,
    else encoded (caption states too when ``models.cache_text``); with ``sizes``, each image at its bucket's shape."""
    text_digest = "".join(folder_digest(d) for d in models.text_encoder_dirs) if models.cache_text else None
    key = cache_key(
        file_digest(Path(models.vae_dir) / "diffusion_pytorch_model.safetensors"), cfg.data, records, text_digest, sizes
    )
    if models.xl:  # Stable Diffusion XL's size and crop conditioning of each image too, and its tokenizers (the second's
        key["time_ids"] = True  # padding token changes its states)
        if models.cache_text:
            key["tokenizers"] = "".join(folder_digest(Path(models.source) / t) for t in ("tokenizer", "tokenizer_2"))
    folder = build_latent_cache(
        Path(cfg.cache.dir or Path(cfg.output_dir) / "latent-cache"),
        key,
        models.vae,
        records,
        cfg.data,
        (models.tokenizer, models.text_encoder) if models.cache_text else None,
        cfg.cache.batch_size,
        cfg.cache.shard_size,
        show_progress=True,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        wait=accelerator.wait_for_everyone,
        buckets=sizes,
        time_ids=models.xl,
    )
    return load_latent_cache(folder, records)
