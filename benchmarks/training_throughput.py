"""Latent-model training: ``train_ldm`` (latent cache, its defaults) vs the recipe a user writes from
diffusers' text-to-image example (the autoencoder encodes every batch in fp32, the text encoder runs
every step, fp32 U-Net, no cache), with the same U-Net, data, text encoder, batch and LR, in one process.

    .venv/bin/python benchmarks/training_throughput.py [--steps 200] [--every 50] [--batch 64] [--json out.json]

Needs ``data/openmoji-32`` (``make data``). The autoencoder is --vae (``make bench`` passes the one
benchmarks/autoencoder_recipe.py trained), else the default run's if it exists, else a freshly
initialised one of the same preset (throughput does not depend on its weights; the loss curve does). Reports
- the steady-state images/s of both (median over logged windows / steps after the first) and their ratio;
- where the recipe's step goes (image decoding, autoencoder encode, text encoder, U-Net step);
- time to a fixed loss: every --every steps both U-Nets (train_ldm: its raw, non-EMA weights from the
  checkpoint) are scored with the plain DDPM loss E||eps - eps_theta(x_t, t)||^2 on one fixed set of 256
  training latents, timesteps and noises; the target is the worse of the two final scores, and the time
  is wall-clock from the start of each job (train_ldm's includes building its latent cache and writing
  its checkpoints).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import runtime  # noqa: E402
from autoencoder import build_autoencoder, encode_latents, load_autoencoder, save_autoencoder  # noqa: E402
from ldm.diffusion import training_scheduler  # noqa: E402
from ldm.text import load_minilm, tokenize  # noqa: E402
from ldm.unet import build_unet  # noqa: E402
from training.run.checkpoint import checkpoints  # noqa: E402
from training.config import load_config  # noqa: E402
from training.data.records import load_records  # noqa: E402
from training.data.loader import train_loader
from training.data.sampler import BatchStream
from training.ldm_config import LdmJobConfig  # noqa: E402
from training.train_ldm import train  # noqa: E402

DATA = ROOT / "data" / "openmoji-32"
CONFIG = ROOT / "configs" / "ldm" / "openmoji-32.yaml"
DEFAULT_VAE = ROOT / "runs" / "autoencoder-openmoji-32-f4" / "vae"


def autoencoder_dir(tmp: Path, given: Path | None) -> Path:
    for folder in (given, DEFAULT_VAE):
        if folder is not None and (folder / "config.json").is_file():
            return folder
    torch.manual_seed(0)
    return save_autoencoder(build_autoencoder("f4-small", 32), tmp / "vae")


class Probe:
    """The plain DDPM loss on a fixed set: 256 training latents (posterior means, scaled), one
    timestep and one noise each, their captions' text states."""

    def __init__(self, vae, tokenizer, text_encoder, cfg: LdmJobConfig, n: int = 256) -> None:
        loader = train_loader(load_records(DATA, cfg.data), cfg.data, BatchStream(len(load_records(DATA, cfg.data)), n, seed=123, random_flip=cfg.data.random_flip))
        batch = next(iter(loader))
        g = torch.Generator().manual_seed(123)
        with torch.no_grad():
            self.x0 = encode_latents(vae, batch["pixel_values"])  # posterior means, normalised
            tokens = tokenize(tokenizer, text_encoder, batch["text"])
            self.states, self.mask = text_encoder(**tokens)[0], tokens["attention_mask"]
        self.scheduler = training_scheduler("epsilon")
        self.t = torch.randint(0, self.scheduler.config.num_train_timesteps, (n,), generator=g)
        self.eps = torch.randn(self.x0.shape, generator=g)

    @torch.no_grad()
    def __call__(self, unet) -> float:
        x_t = self.scheduler.add_noise(self.x0, self.eps, self.t)
        pred = unet(x_t, self.t, encoder_hidden_states=self.states, encoder_attention_mask=self.mask).sample
        return F.mse_loss(pred.float(), self.eps).item()


def ours(vae_dir: Path, tmp: Path, steps: int, batch: int, every: int, probe: Probe, unet_factory) -> dict:
    """train_ldm as shipped; rates from its own log, scores from its checkpoints."""
    out = tmp / "ours"
    cfg = load_config(LdmJobConfig, CONFIG, [f"output_dir={out}", f"model.vae={vae_dir}", f"data.path={DATA}",
                                             f"train.batch_size={batch}", f"train.max_steps={steps}", f"train.checkpoint_every={every}",
                                             f"train.keep_checkpoints={steps // every + 1}", "train.sample_every=1000000",
                                             "train.log_every=10", "eval.num_prompts=0", f"cache.dir={tmp / 'cache'}"])  # fmt: skip
    start = time.time()
    train(cfg)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in log if "images_per_s" in r and r["step"] > 10]
    at = {r["step"]: r["time"] - start for r in log if "images_per_s" in r}
    curve = []
    for ckpt in checkpoints(out):
        unet = unet_factory()
        weights = {k.removeprefix("unet."): v for k, v in load_file(ckpt / "model.safetensors").items() if k.startswith("unet.")}
        unet.load_state_dict(weights)
        step = int(ckpt.name.split("-")[1])
        curve.append({"step": step, "seconds": round(at[step], 1), "probe_loss": round(probe(unet.eval()), 5)})
    return {"images_per_s": statistics.median(rates), "mixed_precision": log[0]["mixed_precision"], "curve": curve}


def per_step_encode_recipe(cfg: LdmJobConfig, vae_dir: Path, steps: int, batch: int, every: int, probe: Probe, unet_factory) -> dict:
    """The usual loop: decode + encode images, run the text encoder, fp32 throughout, every step."""
    start = time.time()
    torch.manual_seed(0)
    vae = load_autoencoder(vae_dir).eval().requires_grad_(False)
    tokenizer, text_encoder = load_minilm()
    text_encoder.eval().requires_grad_(False)
    unet = unet_factory().train()
    scheduler = training_scheduler("epsilon")
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    loader = train_loader(load_records(DATA, cfg.data), cfg.data, BatchStream(len(load_records(DATA, cfg.data)), batch, seed=0, random_flip=cfg.data.random_flip))
    parts = {"image decoding": [], "autoencoder encode": [], "text encoder": [], "U-Net step": []}
    batches, curve, paused = iter(loader), [], 0.0
    for step in range(1, steps + 1):
        t0 = time.perf_counter()  # the image decoding counts: the cache is what removes it
        b = next(batches)
        t1 = time.perf_counter()
        with torch.no_grad():
            latents = encode_latents(vae, b["pixel_values"], sample=True)  # (B, 4, 8, 8), normalised
            t2 = time.perf_counter()
            tokens = tokenize(tokenizer, text_encoder, b["text"])
            states = text_encoder(**tokens)[0]  # (B, L, 384)
        t3 = time.perf_counter()
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],))
        pred = unet(scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=states,
                    encoder_attention_mask=tokens["attention_mask"]).sample  # fmt: skip
        F.mse_loss(pred, noise).backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        for name, seconds in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            parts[name].append(seconds)
        if step % every == 0:
            pause = time.perf_counter()
            curve.append({"step": step, "seconds": round(time.time() - start - paused, 1), "probe_loss": round(probe(unet.eval()), 5)})
            unet.train()
            paused += time.perf_counter() - pause
    step_times = [sum(p[i] for p in parts.values()) for i in range(10, steps)]
    split = {name: round(sum(p[10:]) / sum(step_times), 3) for name, p in parts.items()}
    return {"images_per_s": batch / statistics.median(step_times), "mixed_precision": "no (fp32)", "unet": cfg.model.unet,
            "step_split": split, "curve": curve}  # fmt: skip


def time_to(curve: list[dict], target: float) -> float | None:
    return next((c["seconds"] for c in curve if c["probe_loss"] <= target), None)


def main() -> None:
    runtime.configure()  # before any kernel is built
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--every", type=int, default=50, help="score both U-Nets every this many steps")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--vae", type=Path, default=None, help="a trained vae/ folder (default: the default run's, if any)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    if args.steps <= 10 or args.every > args.steps:
        sys.exit(f"--steps {args.steps} --every {args.every}: need --steps > 10 (the first 10 steps are warm-up) and --every <= --steps")
    if not (DATA / "train" / "metadata.jsonl").is_file():
        sys.exit(f"{DATA} is missing: run `make data` first")
    cfg = load_config(LdmJobConfig, CONFIG, [])
    with tempfile.TemporaryDirectory() as tmp:
        vae_dir = autoencoder_dir(Path(tmp), args.vae)
        vae = load_autoencoder(vae_dir).eval()
        tokenizer, text_encoder = load_minilm()
        probe = Probe(vae, tokenizer, text_encoder.eval(), cfg)

        def unet_factory():
            torch.manual_seed(0)
            return build_unet(cfg.model.unet, 32 // 4, text_encoder.config.hidden_size, vae.config.latent_channels)

        results = {"baseline": per_step_encode_recipe(cfg, vae_dir, args.steps, args.batch, args.every, probe, unet_factory),
                   "ours": ours(vae_dir, Path(tmp), args.steps, args.batch, args.every, probe, unet_factory)}  # fmt: skip
    base, mine = results["baseline"], results["ours"]
    results["ratio"] = mine["images_per_s"] / base["images_per_s"]
    target = max(base["curve"][-1]["probe_loss"], mine["curve"][-1]["probe_loss"])
    results["target_loss"] = target
    results["seconds_to_target"] = {"baseline": time_to(base["curve"], target), "ours": time_to(mine["curve"], target)}
    results["time_ratio"] = results["seconds_to_target"]["baseline"] / results["seconds_to_target"]["ours"]
    results["vae"] = str(vae_dir)
    print(f"\nU-Net '{base['unet']}', batch {args.batch}, 32x32 images -> 4x8x8 latents, MiniLM captions")
    print(f"per-step-encode fp32 recipe : {base['images_per_s']:7.1f} images/s   step: " +
          ", ".join(f"{k} {v:.0%}" for k, v in base["step_split"].items()))  # fmt: skip
    print(f"train_ldm ({mine['mixed_precision']:>4})          : {mine['images_per_s']:7.1f} images/s")
    print(f"steady-state ratio: {results['ratio']:.2f}x")
    print(f"{'step':>6}{'recipe s':>10}{'recipe loss':>13}{'ours s':>9}{'ours loss':>11}")
    for b, o in zip(base["curve"], mine["curve"]):
        print(f"{b['step']:>6}{b['seconds']:>10.1f}{b['probe_loss']:>13.4f}{o['seconds']:>9.1f}{o['probe_loss']:>11.4f}")
    print(f"time to probe loss {target:.4f}: recipe {results['seconds_to_target']['baseline']} s, ours "
          f"{results['seconds_to_target']['ours']} s -> {results['time_ratio']:.2f}x")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
