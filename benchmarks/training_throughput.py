"""Latent-model training throughput: ``train_ldm`` (latent cache, its defaults) vs the recipe a user
writes from diffusers' text-to-image example (the autoencoder encodes every batch in fp32, the text
encoder runs every step, fp32 U-Net, no cache), with the same U-Net, data, text encoder and batch,
in one process.

    .venv/bin/python benchmarks/training_throughput.py [--steps 60] [--batch 64] [--json out.json]

Needs ``data/openmoji-32`` (``make data``). Uses the default run's autoencoder if it exists, else a
freshly initialised one of the same preset (the speed of a step does not depend on the weights).
Prints the steady-state images/s of both (after --warmup steps) and their ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autoencoder import build_autoencoder, load_autoencoder, save_autoencoder  # noqa: E402
from ldm.diffusion import training_scheduler  # noqa: E402
from ldm.text import load_minilm, tokenize  # noqa: E402
from ldm.unet import build_unet  # noqa: E402
from training.config import load_config  # noqa: E402
from training.data import load_records, train_loader  # noqa: E402
from training.train_ldm import LdmJobConfig, train  # noqa: E402

DATA = ROOT / "data" / "openmoji-32"
CONFIG = ROOT / "configs" / "ldm" / "openmoji-32.yaml"
DEFAULT_VAE = ROOT / "runs" / "autoencoder-openmoji-32-f4" / "vae"


def autoencoder_dir(tmp: Path) -> Path:
    if (DEFAULT_VAE / "config.json").is_file():
        return DEFAULT_VAE
    torch.manual_seed(0)
    return save_autoencoder(build_autoencoder("f4-small", 32), tmp / "vae")


def ours(vae_dir: Path, tmp: Path, steps: int, batch: int, warmup: int) -> dict:
    """train_ldm as shipped; the steady rate comes from its own log (images/s per log window)."""
    cfg = load_config(LdmJobConfig, CONFIG, [f"output_dir={tmp / 'ours'}", f"model.vae={vae_dir}", f"data.path={DATA}",
                                             f"train.batch_size={batch}", f"train.max_steps={steps}", f"train.checkpoint_every={steps}",
                                             "train.sample_every=1000000", "train.log_every=10", "eval.num_prompts=0",
                                             f"cache.dir={tmp / 'cache'}"])  # fmt: skip
    start = time.perf_counter()
    train(cfg)
    total = time.perf_counter() - start
    log = [json.loads(line) for line in (tmp / "ours" / "log.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in log if "images_per_s" in r and r["step"] > warmup]
    return {"images_per_s": sum(rates) / len(rates), "whole_command_s": total, "mixed_precision": log[0]["mixed_precision"]}


def per_step_encode_recipe(vae_dir: Path, steps: int, batch: int, warmup: int) -> dict:
    """The usual loop: decode + encode images, run the text encoder, fp32 throughout, every step."""
    torch.manual_seed(0)
    vae = load_autoencoder(vae_dir).eval().requires_grad_(False)
    tokenizer, text_encoder = load_minilm()
    text_encoder.eval().requires_grad_(False)
    latent_size = 32 // 2 ** (len(vae.config.block_out_channels) - 1)
    cfg = load_config(LdmJobConfig, CONFIG, [])
    unet = build_unet(cfg.model.unet, latent_size, text_encoder.config.hidden_size, vae.config.latent_channels).train()
    scheduler = training_scheduler("epsilon")
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.train.lr)
    loader = train_loader(load_records(DATA, cfg.data), cfg.data, batch, seed=0)
    times, batches = [], iter(loader)
    for step in range(steps):
        start = time.perf_counter()  # the image decoding counts: the cache is what removes it
        b = next(batches)
        with torch.no_grad():
            latents = vae.encode(b["pixel_values"]).latent_dist.sample() * vae.config.scaling_factor  # (B, 4, 8, 8)
            tokens = tokenize(tokenizer, text_encoder, b["text"])
            states = text_encoder(**tokens)[0]  # (B, L, 384)
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],))
        pred = unet(scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=states,
                    encoder_attention_mask=tokens["attention_mask"]).sample  # fmt: skip
        loss = F.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return {"images_per_s": batch * len(times) / sum(times), "mixed_precision": "no (fp32)", "unet": cfg.model.unet}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    if not (DATA / "train" / "metadata.jsonl").is_file():
        sys.exit(f"{DATA} is missing: run `make data` first")
    with tempfile.TemporaryDirectory() as tmp:
        vae_dir = autoencoder_dir(Path(tmp))
        results = {"baseline": per_step_encode_recipe(vae_dir, args.steps, args.batch, args.warmup),
                   "ours": ours(vae_dir, Path(tmp), args.steps, args.batch, args.warmup)}  # fmt: skip
    results["ratio"] = results["ours"]["images_per_s"] / results["baseline"]["images_per_s"]
    print(f"\nU-Net '{results['baseline']['unet']}', batch {args.batch}, 32x32 images -> 4x8x8 latents, MiniLM captions")
    print(f"per-step-encode fp32 recipe : {results['baseline']['images_per_s']:7.1f} images/s")
    print(f"train_ldm ({results['ours']['mixed_precision']:>4})          : {results['ours']['images_per_s']:7.1f} images/s")
    print(f"ratio: {results['ratio']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
