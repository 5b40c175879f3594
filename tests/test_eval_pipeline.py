"""python -m training.evaluate pipeline: the Frechet distance and the prompt-adherence ranking."""

from __future__ import annotations

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


class _Oracle:
    """A 'pipeline' that returns each caption's real image (or, shuffled, someone else's)."""

    def __init__(self, by_caption: dict, shuffle: bool) -> None:
        self.by_caption, self.shuffle, self.default_resolution = by_caption, shuffle, 32
        self.captions = list(by_caption)

    def set_scheduler(self, name):
        pass

    def set_progress_bar_config(self, **kw):
        pass

    def __call__(self, prompts, **kw):
        if self.shuffle:  # a fixed wrong image: each caption gets the image of the caption 7 places on
            prompts = [self.captions[(self.captions.index(p) + 7) % len(self.captions)] for p in prompts]
        images = torch.stack([self.by_caption[p] for p in prompts])
        return type("Out", (), {"images": (images + 1) / 2})


def test_adherence_is_one_for_the_true_images_and_low_for_wrong_ones(openmoji_small, monkeypatch):
    cfg = DataConfig(path=str(openmoji_small), resolution=32)
    by_caption = {}
    for batch in eval_loader(load_records(openmoji_small, cfg), cfg, 64):
        by_caption.update(zip(batch["text"], batch["pixel_values"]))
    for shuffle, check in ((False, lambda r: r["prompt_top1"] == 1.0 and r["fd_vgg"] < r["fd_vgg_floor_real_sample"] * 2),
                           (True, lambda r: r["prompt_top1"] <= 0.3)):  # fmt: skip
        monkeypatch.setattr(ldm.pipeline.LatentDiffusionPipeline, "from_pretrained", classmethod(lambda cls, p, s=shuffle: _Oracle(by_caption, s)))
        result = evaluate_pipeline("oracle", openmoji_small, num_prompts=30, steps=1)
        assert result["prompts"] == 30 and result["prompt_top1_chance"] == 0.05
        assert check(result), result
