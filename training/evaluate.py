"""Evaluate trained models and print the figures as JSON.

    python -m training.evaluate autoencoder --vae DIR --data DIR [--ood DIR ...] [--out FILE]
    python -m training.evaluate pipeline --model DIR --data DIR [--num-prompts N] [--steps S] [--guidance G] [--seed S]

``autoencoder``: PSNR (dB), SSIM, LPIPS-VGG and colour error (mean absolute difference of the
8x8-pixel block averages, in 0-255 levels) of reconstructions (posterior mean) of every image in
an imagefolder (or save_to_disk folder), at the autoencoder's own resolution; the same figures
for two simple codes of the latent's size (``references``: bicubic down to k x k x 3 values and
back, and PCA fitted on the training split); and all of it again for each ``--ood`` folder
(images of other kinds, under ``ood``).

``pipeline``: for N captions of DIR (spread over it), one generated image each, then
(a) FD-VGG: the Frechet distance between generated and real images in the feature space of the
    pretrained VGG16 that LPIPS uses (channel means of its five taps, 1,472 numbers per image).
    It is NOT comparable to Inception FID. Floors from real data alone: N real images vs the rest
    (same sample sizes as the generated comparison) and two halves of the real data.
(b) prompt adherence: each generated image ranks its caption's real image among 20 candidates
    (it and 19 random others) by LPIPS distance; top-1 accuracy is reported (chance: 5%).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from diffusers import AutoencoderKL

from autoencoder import downsampling_factor, load_autoencoder
from autoencoder.metrics import Code, autoencoder_code, compare_codes, reconstruct
from autoencoder.perceptual import LPIPS
from autoencoder.references import PCACode, bicubic_code, bicubic_side, pca_fits
import runtime
from runtime.errors import one_line_errors
from runtime.files import write_json_atomic
from training.data import DataConfig, eval_loader, load_records, spread_indices
from training.utils import save_grid


def load_images(records, cfg: DataConfig, max_images: int | None = None, batch_size: int = 256) -> torch.Tensor:
    """Every readable image of ``records`` (or ``max_images`` spread over them): (N, 3, R, R) in [-1, 1]."""
    if max_images and len(records) > max_images:
        records = records.select(spread_indices(len(records), max_images))
    parts = [b["pixel_values"] for b in eval_loader(records, cfg, batch_size) if b["pixel_values"].numel()]
    if not parts:
        raise ValueError(f"no readable images in '{cfg.path}'")
    return torch.cat(parts)


def latent_values(vae: AutoencoderKL, resolution: int) -> int:
    """How many numbers the latent of one ``resolution`` x ``resolution`` image holds."""
    side = resolution // downsampling_factor(vae)
    return int(vae.config.latent_channels) * side * side


def reference_codes(num_values: int, train_images: torch.Tensor | None) -> dict[str, Code]:
    """The simple codes of ``num_values`` numbers an autoencoder is read against: bicubic always,
    PCA when training images are given (load them only where :func:`pca_fits`)."""
    k = bicubic_side(num_values)
    codes: dict[str, Code] = {f"bicubic_{k}x{k}": lambda x: bicubic_code(x, num_values)}
    if train_images is not None:
        codes[f"pca_{num_values}"] = PCACode.fit(train_images, num_values)
    return codes


def autoencoder_report(vae: AutoencoderKL, held_out: dict[str, torch.Tensor], train_images: torch.Tensor | None = None,
                       lpips: LPIPS | None = None, batch_size: int = 64) -> dict:
    """Reconstruction figures of ``vae`` on each named image set, beside references of its latent size.

    ``held_out``: {name: (N, 3, R, R) images in [-1, 1]}; the first is the in-domain held-out
    split, whose figures go at the top level; every other set goes under ``ood``. Each set gets
    PSNR / SSIM / LPIPS / colour error, and the same for the bicubic and PCA codes (PCA fitted on
    ``train_images``) under ``references``."""
    lpips = (lpips or LPIPS.pretrained()).float().cpu()
    resolution = next(iter(held_out.values())).shape[-1]
    n = latent_values(vae, resolution)
    codes = {"vae": autoencoder_code(vae), **reference_codes(n, train_images)}
    report: dict = {"latent_values": n, "resolution": resolution}
    for i, (name, images) in enumerate(held_out.items()):
        figures = compare_codes(codes, images.split(batch_size), lpips)
        entry = figures.pop("vae") | {"references": figures}
        if i == 0:
            report |= {"split": name, **entry}
        else:
            report.setdefault("ood", {})[name] = entry
    return report


def ood_sets(paths: list[str] | tuple[str, ...], resolution: int, max_images: int | None = None) -> dict[str, torch.Tensor]:
    """{folder name: images} for out-of-domain imagefolders (``--ood``, ``eval.ood``)."""
    sets = {}
    for path in paths:
        cfg = DataConfig(path=str(path), resolution=resolution, eval_split=None)
        name = Path(path).name
        if name in sets:
            raise ValueError(f"two out-of-domain folders are named '{name}'; give them different names")
        sets[name] = load_images(load_records(path, cfg), cfg, max_images)
    return sets


def evaluate_autoencoder(vae_dir: str | Path, data_dir: str | Path, resolution: int | None = None,
                         batch_size: int = 64, image_column: str = "image", max_images: int | None = None,
                         grid: str | Path | None = None, grid_images: int = 12, train_data: str | Path | None = None,
                         ood: list[str] | tuple[str, ...] = (), pca_fit_images: int = 4096) -> dict:  # fmt: skip
    """Reconstruction figures of ``vae_dir`` on every image of ``data_dir`` and of each ``ood`` folder,
    beside the bicubic reference and a PCA fitted on ``train_data`` (default: the ``train/`` folder
    beside ``data_dir``, if there is one). ``grid`` also saves a PNG of ``grid_images`` inputs
    (top row) over their reconstructions (bottom row)."""
    vae = load_autoencoder(vae_dir).eval()
    resolution = resolution or int(vae.config.sample_size)
    cfg = DataConfig(path=str(data_dir), resolution=resolution, image_column=image_column)
    records = load_records(data_dir, cfg)
    if max_images:
        records = records.select(range(min(max_images, len(records))))
    if train_data is None and Path(data_dir).name != "train" and (Path(data_dir).parent / "train").is_dir():
        train_data = Path(data_dir).parent / "train"
    train_images = None
    if train_data is not None and pca_fits(resolution):
        train_cfg = DataConfig(path=str(train_data), resolution=resolution, image_column=image_column)
        train_images = load_images(load_records(train_data, train_cfg), train_cfg, pca_fit_images)
    with torch.inference_mode():
        sets = {Path(data_dir).name: load_images(records, cfg)} | ood_sets(ood, resolution, max_images)
        metrics = autoencoder_report(vae, sets, train_images, batch_size=batch_size)
        if grid:  # per set: grid_images spread over it, over their reconstructions
            rows = []
            for images in sets.values():
                x = images[spread_indices(len(images), grid_images)]
                rows += [x, reconstruct(vae, x)]
            save_grid(rows, grid, scale=3)
    return {"vae": str(vae_dir), "data": str(data_dir), "train_data": None if train_data is None else str(train_data),
            **metrics}  # fmt: skip


def vgg_features(lpips: LPIPS, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> (N, 1472): the channel means of LPIPS-VGG's five taps."""
    out = []
    with torch.inference_mode():
        for chunk in x.split(batch_size):
            out.append(torch.cat([f.float().mean(dim=(2, 3)) for f in lpips.features(chunk)], dim=1))
    return torch.cat(out).double()


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), from (N, F) feature sets."""

    def sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
        w, v = torch.linalg.eigh(m)
        return (v * w.clamp_min(0).sqrt()) @ v.T

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    root_a = sqrtm_psd(cov_a)
    cross = sqrtm_psd(root_a @ cov_b @ root_a)
    return float(((mu_a - mu_b) ** 2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * torch.trace(cross))


def evaluate_pipeline(model_dir: str | Path, data_dir: str | Path, num_prompts: int = 100, steps: int = 25, guidance: float = 3.0,
                      seed: int = 0, data_cfg: DataConfig | None = None, candidates: int = 20, batch_size: int = 50,
                      max_real: int = 5000) -> dict:  # fmt: skip
    """FD-VGG (with real-data floors) and top-1 prompt adherence of a pipeline on a captioned dataset."""
    from ldm.pipeline import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_pretrained(model_dir)
    pipe.set_scheduler("dpm++")
    pipe.set_progress_bar_config(disable=True)
    resolution = pipe.default_resolution
    cfg = replace(data_cfg or DataConfig(), path=str(data_dir), resolution=resolution, random_flip=False)
    records = load_records(data_dir, cfg)
    if len(records) > max_real:
        records = records.select(spread_indices(len(records), max_real))
    real, captions = [], []
    for batch in eval_loader(records, cfg, 256):
        if batch["index"]:
            real.append(batch["pixel_values"])
            captions += batch["text"]
    real = torch.cat(real)  # (N, 3, R, R) in [-1, 1]
    n = min(num_prompts, len(real) // 2)
    if n < 2 or len(real) < candidates:
        raise ValueError(f"{data_dir}: {len(real)} readable images; the evaluation needs at least {max(candidates, 4)}")
    chosen = spread_indices(len(real), n)

    generated = []
    for start in range(0, n, batch_size):
        part = chosen[start:start + batch_size]
        generators = [torch.Generator().manual_seed(seed + start + k) for k in range(len(part))]
        images = pipe([captions[i] for i in part], num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                      output_type="pt").images  # (b, 3, R, R) in [0, 1]  # fmt: skip
        generated.append(images.float().cpu() * 2 - 1)
    generated = torch.cat(generated)

    lpips = LPIPS.pretrained()
    real_f, gen_f = vgg_features(lpips, real), vgg_features(lpips, generated)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(real), generator=g)
    rest = torch.ones(len(real), dtype=torch.bool)
    rest[perm[:n]] = False
    halves = perm[: len(real) // 2], perm[len(real) // 2 :]

    hits = 0
    with torch.inference_mode():
        for k, i in enumerate(chosen):
            others = torch.tensor([j for j in torch.randperm(len(real), generator=g).tolist() if j != i][: candidates - 1])
            pool = torch.cat([torch.tensor([i]), others])  # the true image first
            d = lpips(generated[k : k + 1].expand(len(pool), -1, -1, -1), real[pool])
            hits += int(d.argmin().item() == 0)
    return {
        "model": str(model_dir), "data": str(data_dir), "resolution": resolution, "prompts": n, "steps": steps, "guidance": guidance,
        "fd_vgg": frechet_distance(gen_f, real_f),
        "fd_vgg_floor_real_sample": frechet_distance(real_f[perm[:n]], real_f[rest]),
        "fd_vgg_real_halves": frechet_distance(real_f[halves[0]], real_f[halves[1]]),
        "prompt_top1": hits / n, "prompt_top1_chance": 1 / candidates, "candidates": candidates,
    }  # fmt: skip


def check_autoencoder_fit(vae, records, cfg, vae_dir: str) -> dict:
    """(Stage 2, ``cfg`` an LdmJobConfig.) Reconstruct ``model.check_images`` of the training images through the frozen autoencoder and
    through plain bicubic resizing to as many numbers as its latent holds. A U-Net can only learn
    what the autoencoder can represent: if it is worse than resizing, warn with both figures and
    the command that fine-tunes the autoencoder on these images. Returns the figures (for log.jsonl)."""
    images = load_images(records, replace(cfg.data, random_flip=False), cfg.model.check_images)
    n = latent_values(vae, cfg.data.resolution)
    bicubic_name, bicubic = next(iter(reference_codes(n, None).items()))
    with torch.no_grad():
        figures = compare_codes({"vae": autoencoder_code(vae), bicubic_name: bicubic}, images.split(64), lpips=None)
    ours, ref = figures["vae"], figures[bicubic_name]
    fit = {"images": ours["num_images"], "latent_values": n, "vae_psnr": round(ours["psnr"], 2),
           "vae_colour_error": round(ours["colour_error"], 2), "reference": bicubic_name,
           "reference_psnr": round(ref["psnr"], 2), "reference_colour_error": round(ref["colour_error"], 2)}  # fmt: skip
    fit["worse_than_reference"] = ours["psnr"] < ref["psnr"]
    print(f"autoencoder check on {fit['images']} of your images: {vae_dir} PSNR {fit['vae_psnr']} dB, colour error "
          f"{fit['vae_colour_error']} (0-255 levels); bicubic to the latent's {n} values: {fit['reference_psnr']} dB, "
          f"colour error {fit['reference_colour_error']}")  # fmt: skip
    if fit["worse_than_reference"]:
        name = Path(cfg.output_dir).name
        swap = f"model.replace_vae=runs/{name}-autoencoder/vae" if cfg.model.init_from else f"model.vae=runs/{name}-autoencoder/vae"
        print(f"warning: the autoencoder {vae_dir} reconstructs your images worse than plain resizing to its latent size "
              f"({fit['vae_psnr']} vs {fit['reference_psnr']} dB): it cannot represent them, and no U-Net training fixes that. "
              f"Fine-tune the autoencoder (encoder and decoder) on these images first:\n"
              f"  accelerate launch -m training.train_autoencoder --config configs/autoencoder/finetune.yaml "
              f"model.init_from={vae_dir} data.path={cfg.data.path} data.resolution={cfg.data.resolution} "
              f"output_dir=runs/{name}-autoencoder\n"
              f"then run this job again with {swap}")  # fmt: skip
    return fit


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    ae = sub.add_parser("autoencoder", help="reconstruction PSNR / SSIM / LPIPS of a vae/ folder")
    ae.add_argument("--vae", required=True, type=Path, help="a vae/ folder (AutoencoderKL)")
    ae.add_argument("--data", required=True, type=Path, help="an imagefolder, e.g. data/openmoji-32/test")
    ae.add_argument("--resolution", type=int, default=None, help="default: the autoencoder's sample_size")
    ae.add_argument("--batch-size", type=int, default=64)
    ae.add_argument("--image-column", default="image")
    ae.add_argument("--max-images", type=int, default=None)
    ae.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    ae.add_argument("--grid", type=Path, default=None, help="also save inputs over reconstructions as a PNG (one row pair per image set)")
    ae.add_argument("--train-data", type=Path, default=None,
                    help="images to fit the PCA reference on (default: the train/ folder beside --data)")
    ae.add_argument("--ood", type=Path, nargs="*", default=[],
                    help="out-of-domain imagefolders, each reported under ood.<folder name> (e.g. data/ood-32/photos)")
    pl = sub.add_parser("pipeline", help="FD-VGG and prompt adherence of a pipeline folder on a captioned dataset")
    pl.add_argument("--model", required=True, type=Path, help="a pipeline folder")
    pl.add_argument("--data", required=True, type=Path, help="a captioned imagefolder, e.g. data/openmoji-32/train")
    pl.add_argument("--num-prompts", type=int, default=100)
    pl.add_argument("--steps", type=int, default=25)
    pl.add_argument("--guidance", type=float, default=3.0)
    pl.add_argument("--seed", type=int, default=0)
    pl.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    runtime.configure()
    with one_line_errors(input_exit_code=2):  # and an unreadable or unwritable path
        _evaluate(parser, args)


def _evaluate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    try:
        if args.what == "autoencoder":
            result = evaluate_autoencoder(args.vae, args.data, args.resolution, args.batch_size, args.image_column, args.max_images,
                                          args.grid, train_data=args.train_data, ood=[str(p) for p in args.ood])  # fmt: skip
        else:
            result = evaluate_pipeline(args.model, args.data, args.num_prompts, args.steps, args.guidance, args.seed)
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"error: {err}\n")
    if args.out:
        write_json_atomic(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
