"""Stage-1 generality: colour error, bicubic and PCA references (against hand-computed values), the
generic and out-of-domain image sets, and their figures in a run's metrics.json."""

import pytest
import torch

from autoencoder.metrics import colour_error, compare_codes, psnr
from autoencoder.references import PCACode, bicubic_code, bicubic_side


def test_colour_error_is_the_mean_gap_of_8x8_block_means_in_levels():
    a = torch.zeros(1, 3, 16, 16)
    b = torch.zeros(1, 3, 16, 16)
    b[0, 0, :8, :8] = 0.5  # one of 4 blocks of one of 3 channels is 0.5 brighter: 127.5 levels there
    assert colour_error(a, b).item() == pytest.approx(127.5 / 12)
    # a checkerboard of +-d around a's colour keeps every block mean: no colour error, but a low PSNR
    d = 0.2 * (torch.arange(16).view(1, 16) + torch.arange(16).view(16, 1)).remainder(2).float() * 2 - 0.2
    c = (0.5 + d).expand(1, 3, 16, 16)
    assert colour_error(torch.full((1, 3, 16, 16), 0.5), c).item() == pytest.approx(0.0, abs=1e-5)
    assert psnr(torch.full((1, 3, 16, 16), 0.5), c).item() == pytest.approx(10 * torch.log10(torch.tensor(1 / 0.04)).item(), rel=1e-5)
    # a partial block at the edge is left out: 12x12 -> one 8x8 block
    e = torch.zeros(2, 3, 12, 12)
    f = e.clone()
    f[1, :, 8:, :] = 1.0  # only outside the full block
    f[0, 1, :8, :8] = 0.25
    assert colour_error(e, f).tolist() == pytest.approx([0.25 * 255 / 3, 0.0])
    with pytest.raises(ValueError, match="smaller than one 8x8"):
        colour_error(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4))


def test_bicubic_reference_size_and_values():
    assert bicubic_side(256) == 9 and bicubic_side(243) == 9 and bicubic_side(242) == 8 and bicubic_side(1024) == 18
    # 36 x 36 with a 9 x 9 code: each code value is the mean of one 4 x 4 block, so a change that keeps
    # every block's mean changes nothing, and any other change does
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 36, 36, generator=g) - 0.5
    wiggle = torch.randn(2, 3, 9, 9, 4, 4, generator=g)
    wiggle = (wiggle - wiggle.mean(dim=(-1, -2), keepdim=True)).permute(0, 1, 2, 4, 3, 5).reshape(2, 3, 36, 36) * 0.1
    assert torch.allclose(bicubic_code(x + wiggle, 256), bicubic_code(x, 256), atol=1e-6)
    moved = x.clone()
    moved[0, 0, 0, 0] += 0.4  # a block's mean moves by 0.4 / 16
    assert (bicubic_code(moved, 256) - bicubic_code(x, 256)).abs().max() > 0.01
    # block means of a linear ramp lie on the ramp at the block centres, and the cubic kernel brings it
    # back away from the borders, to a sixth of one pixel's step (torch's a = -0.75 is not exact on a line)
    ramp = torch.linspace(-0.9, 0.9, 36).view(1, 1, 1, 36).expand(1, 3, 36, 36)
    step = 1.8 / 35
    assert (bicubic_code(ramp, 256)[..., 6:30] - ramp[..., 6:30]).abs().max() < step / 6
    flat = torch.full((1, 3, 32, 32), 0.3)  # a flat colour survives any resampling exactly
    assert torch.allclose(bicubic_code(flat, 256), flat, atol=1e-6)


def test_pca_code_is_exact_in_its_subspace_and_the_best_linear_code_outside():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(3 * 8 * 8, 5, generator=g))[0].T  # (5, 192) orthonormal
    mean = torch.rand(3 * 8 * 8, generator=g) * 0.2
    codes = torch.randn(200, 5, generator=g) * 0.1
    train = (codes @ basis + mean).view(200, 3, 8, 8)
    pca = PCACode.fit(train, 5)
    fresh = ((torch.randn(10, 5, generator=g) * 0.1) @ basis + mean).view(10, 3, 8, 8)
    assert torch.allclose(pca(fresh), fresh, atol=1e-5)  # data in the fitted 5-d subspace comes back exactly
    assert torch.allclose(pca.components @ pca.components.T, torch.eye(5, dtype=torch.float64), atol=1e-6)
    # fewer components: the residual is exactly the part along the dropped directions
    pca2 = PCACode.fit(train, 2)
    x = fresh.flatten(1).double() - pca2.mean
    expected = x @ pca2.components.T @ pca2.components + pca2.mean
    assert torch.allclose(pca2(fresh).flatten(1).double(), expected, atol=1e-6)
    assert ((pca2(fresh) - fresh) ** 2).sum() > ((pca(fresh) - fresh) ** 2).sum()


def test_compare_codes_scores_each_code_on_the_same_images():
    from autoencoder.perceptual import LPIPS

    x = torch.rand(4, 3, 16, 16) * 2 - 1
    shifted = lambda t: (t + 0.2).clamp(-1, 1)  # noqa: E731
    out = compare_codes({"identity": lambda t: t, "shifted": shifted}, x.split(3), LPIPS.pretrained())
    assert out["identity"]["colour_error"] == pytest.approx(0.0, abs=1e-4) and out["identity"]["num_images"] == 4
    assert out["identity"]["lpips"] == pytest.approx(0.0, abs=1e-4) and out["identity"]["psnr"] > 90
    a, b = (x + 1) / 2, (shifted(x) + 1) / 2
    assert out["shifted"]["psnr"] == pytest.approx(psnr(a, b).mean().item(), rel=1e-5)
    assert out["shifted"]["colour_error"] == pytest.approx(colour_error(a, b).mean().item(), rel=1e-5)


def test_generic_and_ood_sets_are_deterministic_sized_and_disjoint(tmp_path):
    import hashlib

    from PIL import Image

    from training.data.builtin import prepare_generic, prepare_ood

    assert prepare_generic(tmp_path / "g", 16, count=10) == {"train": 10}
    prepare_generic(tmp_path / "g2", 16, count=10)
    assert prepare_ood(tmp_path / "o", 16, count=6) == {"photos": 6, "glyphs": 6}

    def digests(folder):
        return {hashlib.sha256(Image.open(p).tobytes()).hexdigest() for p in sorted(folder.glob("*.png"))}

    generic = digests(tmp_path / "g" / "train")
    assert generic == digests(tmp_path / "g2" / "train") and len(generic) == 10  # same seed, same images; all distinct
    for kind in ("photos", "glyphs"):
        images = [Image.open(p) for p in sorted((tmp_path / "o" / kind).glob("*.png"))]
        assert len(images) == 6 and all(im.size == (16, 16) and im.mode == "RGB" for im in images)
        assert not digests(tmp_path / "o" / kind) & generic
        lines = (tmp_path / "o" / kind / "metadata.jsonl").read_text().splitlines()
        assert len(lines) == 6 and all('"text"' in line for line in lines)
    # photographs and drawings are colourful, not blank: every image has more than one colour
    assert all(len(Image.open(p).getcolors(10_000) or range(2)) > 1 for p in (tmp_path / "o" / "photos").glob("*.png"))


def test_a_run_with_extra_data_reports_in_and_out_of_domain_figures_beside_references(openmoji_small, tmp_path):
    import json

    from tests.conftest import autoencoder_cfg, fresh_state
    from training.data.builtin import prepare_generic, prepare_ood
    from training.eval.autoencoder import evaluate_autoencoder
    from training.train_autoencoder import train

    prepare_generic(tmp_path / "generic", 32, count=24)
    prepare_ood(tmp_path / "ood", 32, count=8)
    ood = [str(tmp_path / "ood" / "photos"), str(tmp_path / "ood" / "glyphs")]
    cfg = autoencoder_cfg(openmoji_small, tmp_path / "run", f"extra_data=[{tmp_path / 'generic'}]", f"eval.ood=[{','.join(ood)}]",
                          "train.max_steps=2", "train.checkpoint_every=2", "train.ema_decay=0.9")
    fresh_state(train)(cfg)
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    start = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    train_split = len((openmoji_small / "train" / "metadata.jsonl").read_text().splitlines())
    assert start["train_images"] == train_split + 24  # OpenMoji's train split and the generic images
    assert m["latent_values"] == 4 * 8 * 8 and set(m["references"]) == {"bicubic_9x9", "pca_256"}
    assert set(m["ood"]) == {"photos", "glyphs"} and m["ood"]["photos"]["num_images"] == 8
    for entry in (m, m["ood"]["photos"], m["ood"]["glyphs"]):
        assert {"psnr", "ssim", "lpips", "colour_error"} <= set(entry) and entry["colour_error"] >= 0
        assert {"psnr", "colour_error"} <= set(entry["references"]["pca_256"])
    # the evaluate command gives the same figures from the exported autoencoder (PCA fitted on --train-data,
    # here OpenMoji's train split alone, so its reference differs from the run's, fitted on the mix)
    ev = evaluate_autoencoder(tmp_path / "run" / "vae", openmoji_small / "test", ood=ood)
    assert ev["psnr"] == pytest.approx(m["psnr"], rel=1e-4) and ev["ood"]["glyphs"]["colour_error"] == pytest.approx(
        m["ood"]["glyphs"]["colour_error"], rel=1e-4)
    assert ev["references"]["bicubic_9x9"]["psnr"] == pytest.approx(m["references"]["bicubic_9x9"]["psnr"], rel=1e-6)
    # a missing eval.ood folder is named before any training
    bad = autoencoder_cfg(openmoji_small, "runs/autoencoder-tiny", "eval.ood=[nowhere/ood]")
    with pytest.raises(ValueError, match="eval.ood: 'nowhere/ood' is not a folder"):
        fresh_state(train)(bad)
