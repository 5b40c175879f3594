"""python -m training.evaluate pipeline: the Frechet distance and the prompt-adherence ranking."""

from __future__ import annotations

import pytest
import torch

import ldm.pipeline
from training.data.loader import eval_loader
from training.data.records import DataConfig, load_records
from training.eval.frechet import frechet_distance
from training.eval.pipeline import evaluate_pipeline


def test_frechet_distance_closed_forms():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 3, generator=g, dtype=torch.float64)
    b = torch.randn(20000, 3, generator=g, dtype=torch.float64) * 2 + torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    assert abs(frechet_distance(a, a)) < 1e-6
    # N(0, I) vs N(mu, 4I): |mu|^2 + tr(I + 4I - 2 * 2I) = 1 + 3
    assert abs(frechet_distance(a, b) - 4.0) < 0.15


class _Autoencoder(torch.nn.Module):
    """An 'autoencoder' whose latent is the image itself, decoded through ``decode`` (identity by default)."""

    def __init__(self, decode=lambda z: z) -> None:
        super().__init__()
        self.weight, self._decode = torch.nn.Parameter(torch.zeros(1)), decode

    def encode(self, x):
        return type("Out", (), {"latent_dist": type("Posterior", (), {"mode": lambda _: x})()})

    def decode(self, z, return_dict=True):
        return (self._decode(z),)


class _Oracle:
    """A 'pipeline' that returns each caption's real image (or, shuffled, someone else's)."""

    def __init__(self, by_caption: dict, shuffle: bool, vae=None) -> None:
        self.by_caption, self.shuffle, self.default_resolution = by_caption, shuffle, 32
        self.captions, self.vae = list(by_caption), vae or _Autoencoder()

    def set_scheduler(self, name):
        pass

    def set_progress_bar_config(self, **kw):
        pass

    def __call__(self, prompts, **kw):
        if self.shuffle:  # a fixed wrong image: each caption gets the image of the caption 7 places on
            prompts = [self.captions[(self.captions.index(p) + 7) % len(self.captions)] for p in prompts]
        images = torch.stack([self.by_caption[p] for p in prompts])
        return type("Out", (), {"images": (images + 1) / 2})


def _top1_by_hand(generated: torch.Tensor, real: torch.Tensor, chosen: list[int], seed: int, candidates: int = 20) -> float:
    """prompt_top1 by another route: the k-th generated image (in [-1, 1]) against its prompt's real image and
    ``candidates - 1`` others (the documented draw: a generator seeded with ``seed`` makes the floors' permutation, then
    one permutation per prompt), scored by LPIPS's own forward pass; a hit where the true image is the nearest."""
    from autoencoder.perceptual import LPIPS

    lpips, g, hits = LPIPS.pretrained(), torch.Generator().manual_seed(seed), 0
    torch.randperm(len(real), generator=g)
    with torch.no_grad():
        for k, i in enumerate(chosen):
            pool = real[[i, *[j for j in torch.randperm(len(real), generator=g).tolist() if j != i][: candidates - 1]]]
            hits += int(lpips(generated[k : k + 1].expand(len(pool), -1, -1, -1), pool).argmin()) == 0
    return hits / len(chosen)


def test_adherence_is_one_for_the_true_images_low_for_wrong_ones_and_what_lpips_ranks_for_blurred_ones(openmoji_small, monkeypatch):
    import torch.nn.functional as F

    from training.data.loader import spread_indices

    cfg = DataConfig(path=str(openmoji_small), resolution=32, random_flip=False)
    by_caption, real = {}, []
    for batch in eval_loader(load_records(openmoji_small, cfg), cfg, 64):
        by_caption.update(zip(batch["text"], batch["pixel_values"]))
        real.append(batch["pixel_values"])
    real, chosen = torch.cat(real), spread_indices(len(by_caption), 30)
    blurred = {c: F.interpolate(F.avg_pool2d(x[None], 8), scale_factor=8.0)[0] for c, x in by_caption.items()}  # 4x4 blocks
    checks = {
        "true": (by_caption, False, lambda r: r["prompt_top1"] == 1.0 and r["fd_vgg"] < r["fd_vgg_floor_real_sample"] * 2),
        "wrong": (by_caption, True, lambda r: r["prompt_top1"] < 0.2),  # each prompt gets the image of another caption
        "blurred": (blurred, False, lambda r: 0.2 < r["prompt_top1"] < 0.8),  # about half: which ones, LPIPS decides
    }
    for name, (images, shuffle, check) in checks.items():
        monkeypatch.setattr(ldm.pipeline.LatentDiffusionPipeline, "from_pretrained", classmethod(lambda cls, p, o=_Oracle(images, shuffle): o))
        result = evaluate_pipeline("oracle", openmoji_small, num_prompts=30, steps=1)
        assert result["prompts"] == 30 and result["prompt_top1_chance"] == 0.05
        assert check(result), (name, result)
        if name == "blurred":  # the case where which prompts hit is LPIPS's to decide: recomputed by another route
            generated = _Oracle(images, shuffle)([list(by_caption)[i] for i in chosen]).images * 2 - 1
            assert result["prompt_top1"] == _top1_by_hand(generated, real, chosen, seed=0), result
        # a lossless autoencoder's floor is the real images' own; its images are the oracle's, whatever it generates
        assert result["fd_vgg_floor_autoencoder"] == pytest.approx(result["fd_vgg_floor_real_sample"], rel=1e-5)


def test_the_autoencoder_floor_is_the_distance_of_its_reconstructions(openmoji_small, monkeypatch):
    """An autoencoder that loses detail (here: decodes a 4x4-pooled image) raises its floor above the real one, by the
    Frechet distance of exactly those reconstructions of the n sampled images to the rest."""
    import torch.nn.functional as F

    from autoencoder.perceptual import LPIPS
    from training.eval.frechet import vgg_features

    cfg = DataConfig(path=str(openmoji_small), resolution=32, random_flip=False)
    real, by_caption = [], {}
    for batch in eval_loader(load_records(openmoji_small, cfg), cfg, 64):
        real.append(batch["pixel_values"])
        by_caption.update(zip(batch["text"], batch["pixel_values"]))
    real = torch.cat(real)
    blur = _Autoencoder(lambda z: F.interpolate(F.avg_pool2d(z, 4), scale_factor=4.0))
    monkeypatch.setattr(ldm.pipeline.LatentDiffusionPipeline, "from_pretrained", classmethod(lambda cls, p: _Oracle(by_caption, False, blur)))
    result = evaluate_pipeline("oracle", openmoji_small, num_prompts=30, steps=1, seed=3)
    perm = torch.randperm(len(real), generator=torch.Generator().manual_seed(3))
    lpips = LPIPS.pretrained()
    fd = _frechet_by_eigenvalues(vgg_features(lpips, blur.decode(real[perm[:30]])[0]), vgg_features(lpips, real[perm[30:]]))
    assert result["fd_vgg_floor_autoencoder"] == pytest.approx(fd, rel=1e-3)
    assert result["fd_vgg_floor_autoencoder"] > 1.5 * result["fd_vgg_floor_real_sample"]


def _frechet_by_eigenvalues(a: torch.Tensor, b: torch.Tensor) -> float:
    """The same distance by another route: Tr((S_a S_b)^1/2) is the sum of the square roots of S_a S_b's
    eigenvalues (real and >= 0 for two covariance matrices), with numpy's general eigensolver."""
    import numpy as np

    a, b = a.numpy(), b.numpy()
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_trace = np.sqrt(np.clip(np.linalg.eigvals(cov_a @ cov_b).real, 0, None)).sum()
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * root_trace)


def test_a_runs_evaluation_and_the_command_give_the_distance_of_the_exported_pipelines_images(openmoji_small, tiny_vae, tmp_path):
    """No oracle: a tiny stage-2 run with ``eval.num_prompts`` evaluates its export at the end; ``python -m
    training.evaluate pipeline`` on that export with the run's settings gives the same figures; and FD-VGG is the
    distance between the real images and what the pipeline generates for the chosen captions with the documented
    seeds (DPM-Solver++, seed + k for the k-th prompt), computed here by another route."""
    import json

    from autoencoder.perceptual import LPIPS
    from tests.conftest import fresh_state, ldm_cfg
    from training.data.loader import spread_indices
    from training.eval.frechet import vgg_features
    from training.evaluate import main
    from training.train_ldm import train

    out = tmp_path / "run"
    fresh_state(train)(ldm_cfg(openmoji_small, tiny_vae, out, "train.max_steps=2", "train.checkpoint_every=100",
                               "train.sample_every=100", "eval.num_prompts=4", "eval.steps=2", "eval.guidance=2.0", "seed=5"))  # fmt: skip
    in_run = json.loads((out / "metrics.json").read_text())["eval"]
    main(["pipeline", "--model", str(out / "pipeline"), "--data", str(openmoji_small), "--num-prompts", "4", "--steps", "2",
          "--guidance", "2", "--seed", "5", "--out", str(tmp_path / "result.json")])  # fmt: skip
    result = json.loads((tmp_path / "result.json").read_text())
    assert {k: v for k, v in in_run.items() if k != "model"} == pytest.approx({k: v for k, v in result.items() if k != "model"})

    cfg = DataConfig(path=str(openmoji_small), resolution=32, random_flip=False)
    real, captions = [], []
    for batch in eval_loader(load_records(openmoji_small, cfg), cfg, 64):
        real.append(batch["pixel_values"])
        captions += batch["text"]
    real = torch.cat(real)
    chosen = spread_indices(len(real), 4)
    pipe = ldm.pipeline.LatentDiffusionPipeline.from_pretrained(out / "pipeline")
    pipe.set_scheduler("dpm++")
    generators = [torch.Generator().manual_seed(5 + k) for k in range(4)]
    images = pipe([captions[i] for i in chosen], num_inference_steps=2, guidance_scale=2.0, generator=generators, output_type="pt").images
    lpips = LPIPS.pretrained()
    fd = _frechet_by_eigenvalues(vgg_features(lpips, images.float() * 2 - 1), vgg_features(lpips, real))
    assert result["prompts"] == 4 and result["steps"] == 2 and result["guidance"] == 2.0
    assert result["fd_vgg"] == pytest.approx(fd, rel=1e-4) and result["fd_vgg"] > result["fd_vgg_floor_real_sample"]
    assert result["prompt_top1"] == _top1_by_hand(images.float() * 2 - 1, real, chosen, seed=5)


def test_unseen_captions_reword_each_caption_in_a_sentence_no_caption_has(openmoji_small, monkeypatch):
    """``captions_style="unseen"``: the pipeline is asked for the reworded captions (the four sentences in turn), and an
    oracle that reads them back scores 1.0; unknown styles are refused."""
    from training.eval.pipeline import UNSEEN_STYLES, restyled

    assert restyled(["red apple", "sun"] * 3, "unseen")[:5] == [
        "a drawing of red apple", "sun, as a flat icon", "an emoji that shows red apple", "a small picture of sun on white",
        "a drawing of red apple"]  # fmt: skip
    assert restyled(["sun"], "train") == ["sun"]
    with pytest.raises(ValueError, match="caption style 'poems' is unknown; valid: train, unseen"):
        restyled(["sun"], "poems")
    cfg = DataConfig(path=str(openmoji_small), resolution=32)
    by_caption = {}
    for batch in eval_loader(load_records(openmoji_small, cfg), cfg, 64):
        by_caption.update(zip(batch["text"], batch["pixel_values"]))
    asked = []

    class Reader(_Oracle):
        def set_scheduler(self, name):
            asked.append(f"sampler {name}")

        def __call__(self, prompts, **kw):
            asked.extend(prompts)
            styles = [next(c for c in self.captions for s in UNSEEN_STYLES if s.format(c) == p) for p in prompts]
            return super().__call__(styles, **kw)

    monkeypatch.setattr(ldm.pipeline.LatentDiffusionPipeline, "from_pretrained", classmethod(lambda cls, p: Reader(by_caption, False)))
    result = evaluate_pipeline("oracle", openmoji_small, num_prompts=30, steps=1, captions_style="unseen", sampler="unipc")
    assert result["captions"] == "unseen" and result["prompt_top1"] == 1.0 and result["sampler"] == "unipc"
    assert asked[0] == "sampler unipc"  # the sampler is set before any image is made
    assert len(asked) == 31 and not set(asked[1:]) & set(by_caption)
