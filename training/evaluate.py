"""Evaluate trained models and print the figures as JSON.

    python -m training.evaluate autoencoder --vae DIR --data DIR [--ood DIR ...] [--out FILE]
    python -m training.evaluate pipeline --model DIR --data DIR [--num-prompts N] [--steps S] [--guidance G] [--seed S]
                                         [--captions train|unseen] [--sampler dpm++]

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
from pathlib import Path

import runtime
from runtime.errors import one_line_errors
from runtime.files import write_json_atomic
from training.eval.autoencoder import evaluate_autoencoder
from training.eval.pipeline import evaluate_pipeline


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
    ae.add_argument(
        "--grid", type=Path, default=None, help="also save inputs over reconstructions as a PNG (one row pair per image set)"
    )
    ae.add_argument(
        "--train-data",
        type=Path,
        default=None,
        help="images to fit the PCA reference on (default: the train/ folder beside --data)",
    )
    ae.add_argument(
        "--ood",
        type=Path,
        nargs="*",
        default=[],
        help="out-of-domain imagefolders, each reported under ood.<folder name> (e.g. data/ood-32/photos)",
    )
    pl = sub.add_parser("pipeline", help="FD-VGG and prompt adherence of a pipeline folder on a captioned dataset")
    pl.add_argument("--model", required=True, type=Path, help="a pipeline folder")
    pl.add_argument("--data", required=True, type=Path, help="a captioned imagefolder, e.g. data/openmoji-32/train")
    pl.add_argument("--num-prompts", type=int, default=100)
    pl.add_argument("--steps", type=int, default=25)
    pl.add_argument("--guidance", type=float, default=3.0)
    pl.add_argument("--seed", type=int, default=0)
    pl.add_argument(
        "--sampler", default="dpm++", help="ddpm, ddim, dpm++, euler, euler-a, heun, unipc (flow: euler, heun, dpm++, unipc)"
    )
    pl.add_argument(
        "--captions",
        choices=("train", "unseen"),
        default="train",
        help="unseen: each caption reworded in a sentence no caption has",
    )
    pl.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    runtime.configure()
    with one_line_errors(input_exit_code=2):  # and an unreadable or unwritable path
        _evaluate(parser, args)


def _evaluate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    try:
        if args.what == "autoencoder":
            result = evaluate_autoencoder(
                args.vae,
                args.data,
                args.resolution,
                args.batch_size,
                args.image_column,
                args.max_images,
                args.grid,
                train_data=args.train_data,
                ood=[str(p) for p in args.ood],
            )
        else:
            result = evaluate_pipeline(
                args.model,
                args.data,
                args.num_prompts,
                args.steps,
                args.guidance,
                args.seed,
                captions_style=args.captions,
                sampler=args.sampler,
            )
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"error: {err}\n")
    if args.out:
        write_json_atomic(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
