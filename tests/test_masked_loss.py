"""training/data/masks.py and the masked loss: masks from the alpha channel or a folder, cropped and mirrored with their
image, reduced to the latent grid and cached; an all-white mask is the unmasked loss exactly; exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.diffusion import training_scheduler
from ldm.objective import DenoisingObjective, FlowObjective
from tests.conftest import FAST_STEPS, FROZEN_STEPS, fresh_state, ldm_cfg, logged, max_difference, unet_weights, write_imagefolder
from training.config import ConfigError
from training.data.cache import build_latent_cache, load_latent_cache
from training.data.records import DataConfig, load_records
from training.train_ldm import train as train_job

train = fresh_state(train_job)


def _half_masked(n: int, seed: int = 0) -> tuple[dict, dict]:
    """n RGBA noise images 32x32 whose left 14 columns are transparent, and the same masks as L images."""
    rng = np.random.default_rng(seed)
    images, masks = {}, {}
    for i in range(n):
        rgba = rng.integers(0, 255, (32, 32, 4), dtype=np.uint8)
        rgba[..., 3] = 255
        rgba[:, :14, 3] = 0
        images[f"{i:02d}.png"] = Image.fromarray(rgba, "RGBA")
        masks[f"{i:02d}.png"] = Image.fromarray(rgba[..., 3], "L")
    return images, masks


@pytest.fixture(scope="module")
def masked_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("masked")
    images, masks = _half_masked(16)
    data = write_imagefolder(root / "data", images, {name: f"a pattern {i % 2}" for i, name in enumerate(images)})
    write_imagefolder(root / "masks", masks)
    return data, root / "masks"


@pytest.mark.parametrize("source", ["alpha", "folder"])
def test_masks_reach_the_latent_grid_cropped_and_mirrored(source, masked_data, tiny_vae, tmp_path):
    """The left 14 of 32 columns are masked out: on the 8-wide latent grid (f = 4) columns 0-2 weigh 0, column 3
    (half of its area masked) 128/255, the rest 1, and the mirrored image's mask is the mirror."""
    from autoencoder.model import load_autoencoder

    data, folder = masked_data
    cfg = DataConfig(mask="alpha" if source == "alpha" else str(folder), random_flip=True)
    records = load_records(data, cfg, captions=True)
    cache = load_latent_cache(build_latent_cache(tmp_path, {"t": 1}, load_autoencoder(tiny_vae), records, cfg, show_progress=False), records)
    weights = cache.loss_masks(torch.tensor([0, 5]), torch.tensor([False, True]))  # (2, 1, 8, 8)
    row = torch.tensor([0, 0, 0, 128 / 255, 1, 1, 1, 1])
    assert torch.equal(weights[0, 0], row.expand(8, 8)) and torch.equal(weights[1, 0], row.flip(0).expand(8, 8))


def test_the_masked_loss_weights_each_element_and_ignores_what_is_masked_out():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    mask = torch.ones(2, 1, 8, 8)
    mask[:, :, :, :3] = 0
    for objective, level in ((FlowObjective(), torch.tensor([0.3, 0.7])), (DenoisingObjective(training_scheduler("epsilon", False), None), torch.tensor([100, 700]))):
        loss = objective.per_sample_loss(pred, target, level, mask)
        assert torch.allclose(loss, ((pred - target) ** 2 * mask).mean(dim=(1, 2, 3)))
        other = pred.clone()
        other[:, :, :, :3] += 5  # only where the mask is 0
        assert torch.equal(objective.per_sample_loss(other, target, level, mask), loss)
        assert torch.equal(objective.per_sample_loss(pred, target, level, torch.ones_like(mask)), objective.per_sample_loss(pred, target, level))


def test_an_all_white_mask_is_exactly_the_unmasked_loss(noise_images, tiny_vae, tmp_path):
    """data.mask=alpha on images without an alpha channel: every weight is 255/255 = 1, and the logged losses of the
    frozen tiny run are bit for bit those of the run without a mask."""
    runs = {"plain": [], "masked": ["data.mask=alpha"]}
    for name, extra in runs.items():
        train(ldm_cfg(noise_images, tiny_vae, tmp_path / name, *FROZEN_STEPS, "model.check_images=0", *extra))
    assert logged(tmp_path / "plain", "loss") == logged(tmp_path / "masked", "loss")


def _recorded_losses(monkeypatch) -> tuple[list, list]:
    """Every per-sample loss a run computes, as (squared errors (B, C, h, w), mask or None, per-sample loss (B,)), and
    which of the images of each micro-batch were mirrored (the latents read from the cache)."""
    from training.data.cache.read import LatentCache

    calls, flips, posteriors = [], [], LatentCache.posteriors

    def read(self, idx, flip):
        flips.append(flip.clone())
        return posteriors(self, idx, flip)

    monkeypatch.setattr(LatentCache, "posteriors", read)
    for objective in (DenoisingObjective, FlowObjective):

        def spy(self, prediction, target, level, mask=None, real=objective.per_sample_loss):
            loss = real(self, prediction, target, level, mask)
            squared = (prediction.detach().float() - target.float()) ** 2
            calls.append((squared, None if mask is None else mask.detach().clone(), loss.detach().clone()))
            return loss

        monkeypatch.setattr(objective, "per_sample_loss", spy)
    return calls, flips


def test_a_masked_run_resumes_exactly_and_its_masked_out_latents_weigh_exactly_nothing(masked_data, tiny_vae, tmp_path, monkeypatch):
    data, folder = masked_data
    common = [f"data.mask={folder}", "data.random_flip=true", "train.max_steps=6", "train.checkpoint_every=3",
              "train.sample_every=100", "model.check_images=0", f"cache.dir={tmp_path / 'cache'}"]  # fmt: skip
    train(ldm_cfg(data, tiny_vae, tmp_path / "full", *common))
    train(ldm_cfg(data, tiny_vae, tmp_path / "resumed", *common), stop_after_steps=3)
    train(ldm_cfg(data, tiny_vae, tmp_path / "resumed", *common))
    assert max_difference(unet_weights(tmp_path / "full"), unet_weights(tmp_path / "resumed")) == 0

    # The first step of a masked and of an unmasked run: the same images, mirrored or not, the same predictions; the
    # masked run's loss of each sample is the unmasked one's with its squared errors weighted here by hand: latent
    # columns 0-2 (pixels 0-11, transparent) by exactly 0, column 3 (half covered) by 128/255, mirrored with the image.
    calls, flips = _recorded_losses(monkeypatch)
    first = {}
    for name, mask in (("masked", [f"data.mask={folder}"]), ("plain", [])):
        train(ldm_cfg(data, tiny_vae, tmp_path / name, *mask, "data.random_flip=true", "train.max_steps=6", *FAST_STEPS), stop_after_steps=1)
        first[name] = (*calls[0], flips[0])
        calls.clear(), flips.clear()
    (squared, none, plain, flip), (_, _, masked, same_flip) = first["plain"], first["masked"]
    row = torch.tensor([0, 0, 0, 128 / 255, 1, 1, 1, 1])
    weights = torch.stack([row.flip(0) if f else row for f in flip.tolist()])[:, None, None, :]  # (B, 1, 1, w)
    assert none is None and squared.shape[-2:] == (8, 8) and torch.equal(flip, same_flip) and 0 < flip.sum() < len(flip)
    by_hand = plain * (squared * weights).mean(dim=(1, 2, 3)) / squared.mean(dim=(1, 2, 3))  # any per-sample weighting kept
    assert torch.allclose(masked, by_hand, rtol=1e-5, atol=0), (masked, by_hand)


def test_a_missing_mask_or_a_mask_where_it_is_ignored_is_one_line(masked_data, tiny_vae, tmp_path):
    from training.autoencoder_config import AutoencoderJobConfig
    from training.config import load_config
    from tests.conftest import TINY_AE_CONFIG

    data, folder = masked_data
    partial = tmp_path / "partial"
    partial.mkdir()
    for path in sorted(folder.iterdir())[:-1]:  # all but the last image's mask
        (partial / path.name).write_bytes(path.read_bytes())
    with pytest.raises(ValueError, match=r"no mask for '.*15\.png' in data\.mask="):
        train(ldm_cfg(data, tiny_vae, tmp_path / "x", f"data.mask={partial}"))
    with pytest.raises(ValueError, match="is neither 'alpha' nor a folder of mask images"):
        train(ldm_cfg(data, tiny_vae, tmp_path / "x", f"data.mask={tmp_path / 'nowhere'}"))
    assert not (tmp_path / "x" / "latent-cache").exists()
    with pytest.raises(ConfigError, match="weights the latent model's loss"):
        load_config(AutoencoderJobConfig, TINY_AE_CONFIG, ["data.mask=alpha"])


def test_masks_found_by_name_refuse_two_images_of_one_name_and_name_an_unreadable_mask(tmp_path):
    from training.data.masks import MaskSource, check_masks

    images, masks = _half_masked(2)
    data = tmp_path / "data"
    for sub in ("cats", "dogs"):  # cats/00.png and dogs/00.png: one mask 00.png would serve both
        write_imagefolder(data / sub, {"00.png": images["00.png"]})
    write_imagefolder(tmp_path / "masks", {"00.png": masks["00.png"]})
    records = load_records(data, DataConfig())
    with pytest.raises(ValueError, match="share the name 00: data.mask finds masks by name"):
        check_masks(records, str(tmp_path / "masks"))
    (tmp_path / "masks" / "00.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"cannot read mask '.*00\.png'"):
        MaskSource(str(tmp_path / "masks")).open(str(data / "cats" / "00.png"), images["00.png"])
