"""Stable Diffusion XL folders: generation as diffusers' SDXL pipeline, the size/crop conditioning of bucketed images,
full and LoRA fine-tuning, exact resume, and exports diffusers loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, fresh_state, max_difference, same_weights, tiny_sdxl_folder, unet_weights
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file

from ldm import LatentDiffusionPipeline
from ldm.sdxl import LatentDiffusionXLPipeline
from training.config import load_config
from training.ldm_config import LdmJobConfig
from training.train_ldm import train as train_job

train = fresh_state(train_job)
PROMPTS = ["a red apple", "sun"]
SDXL_CONFIG = ROOT / "configs" / "finetune" / "lora-sdxl.yaml"  # the shipped SDXL LoRA config, at the tiny SDXL's 32 pixels
TINY = ["data.resolution=32", "train.sample_every=100", "model.check_images=0", "train.mixed_precision=fp32", "train.log_every=2"]


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """A tiny random SDXL folder, as diffusers writes one."""
    return tiny_sdxl_folder(tmp_path_factory.mktemp("sdxl"))


def images(pipe, negative=None, **kw) -> np.ndarray:
    return pipe(PROMPTS, negative_prompt=negative, num_inference_steps=4, guidance_scale=5.0,
                generator=torch.Generator().manual_seed(0), output_type="np", **kw).images  # fmt: skip


def test_an_sdxl_folder_opens_as_the_xl_pipeline_and_draws_what_diffusers_draws(sdxl):
    ours = LatentDiffusionPipeline.from_pretrained(sdxl, dtype="fp32")
    theirs = StableDiffusionXLPipeline.from_pretrained(sdxl, add_watermarker=False)
    assert isinstance(ours, LatentDiffusionXLPipeline)
    for negative in (None, "", "blurry"):  # None: zeros (force_zeros_for_empty_prompt), "": the empty prompt encoded
        a, b = images(ours, negative), images(theirs, negative)
        assert a.shape == (2, 32, 32, 3) and np.abs(a - b).max() < 1e-4, negative
    assert np.abs(images(ours, None) - images(ours, "")).max() > 1e-3  # the zeros are not the encoded empty prompt
    wide = dict(height=32, width=48)  # the time ids follow the size asked for
    assert np.abs(images(ours, **wide) - images(theirs, **wide)).max() < 1e-4


# ---- the size and crop conditioning of bucketed images -------------------------------------------------------------


def test_time_ids_of_bucketed_crops_and_their_mirrors_are_the_hand_computed_ones(mixed_shapes, tiny_vae, tmp_path):
    """Each image covers its bucket and is centre-cropped (training/data/buckets.py): SDXL's time ids are its original
    (height, width), the crop's (top, left) in the resized image, and the bucket (height, width); the mirror's crop
    starts where the crop's right edge is, counted from the resized image's right."""
    from autoencoder import load_autoencoder
    from training.data.cache import build_latent_cache, load_latent_cache
    from training.data.records import DataConfig, load_records

    data = DataConfig(path=str(mixed_shapes), resolution=32, random_flip=True)
    records = load_records(mixed_shapes, data, captions=True).select(range(3))  # tall 24x72, square 40x40, wide 80x28 (w x h)
    buckets = [(56, 24), (32, 32), (24, 40)]  # (height, width): each image takes the one nearest its aspect ratio
    folder = build_latent_cache(tmp_path / "cache", {"k": 1}, load_autoencoder(tiny_vae), records, data, show_progress=False,
                                buckets=buckets, time_ids=True)  # fmt: skip
    cache = load_latent_cache(folder, records)
    by_image = {int(i): row for row, i in enumerate(cache.source_index)}
    want = {
        # tall 24x72 -> (56, 24): scale max(56/72, 24/24) = 1, so 24x72; top (72 - 56) // 2 = 8; left 0, mirrored 24 - 0 - 24 = 0
        0: ([72, 24, 8, 0, 56, 24], [72, 24, 8, 0, 56, 24]),
        # square 40x40 -> (32, 32): scale 0.8, 32x32, no crop
        1: ([40, 40, 0, 0, 32, 32], [40, 40, 0, 0, 32, 32]),
        # wide 80x28 -> (24, 40): scale max(24/28, 40/80) = 6/7, 69x24; left (69 - 40) // 2 = 14, mirrored 69 - 14 - 40 = 15
        2: ([28, 80, 0, 14, 24, 40], [28, 80, 0, 15, 24, 40]),
    }
    for image, (plain, mirrored) in want.items():
        row = torch.tensor([by_image[image]] * 2)
        got = cache.size_conditions(row, torch.tensor([False, True]))
        assert got.tolist() == [plain, mirrored], image


# ---- fine-tuning ---------------------------------------------------------------------------------------------------


def finetune_cfg(sdxl, data, out, *overrides):
    """configs/finetune/lora-sdxl.yaml (buckets, gradient checkpointing) on the tiny SDXL folder at 32 pixels: no grids,
    no autoencoder check."""
    return load_config(LdmJobConfig, SDXL_CONFIG, [f"model.init_from={sdxl}", f"data.path={data}", f"output_dir={out}", *TINY,
                                                   *overrides])  # fmt: skip


@pytest.fixture(scope="module")
def finetuned(sdxl, mixed_shapes, tmp_path_factory):
    """``finetuned(method)``: the run folder of 3 steps of ``full`` or ``lora`` fine-tuning of the U-Net and both text
    encoders (made once a module)."""
    runs = {}

    def run(method: str):
        if method not in runs:
            out = runs[method] = tmp_path_factory.mktemp(method) / "run"
            train(finetune_cfg(sdxl, mixed_shapes, out, f"finetune.method={method}", "train.max_steps=3", "train.lr=1e-2",
                               "finetune.train_text_encoder=true", "train.text_lr=1e-2", "train.sample_every=3",
                               "sample.images_per_prompt=1", "sample.steps=2"))  # fmt: skip  (a grid from the SDXL pipeline too)
        return runs[method]

    return run


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_fine_tuned_sdxl_folder_loads_in_diffusers_sdxl_pipeline_and_draws_what_ours_draws(method, sdxl, finetuned):
    """The U-Net and both text encoders train: fully, or LoRA adapters on each, exported as the file diffusers' SDXL
    ``load_lora_weights`` reads and fused into the pipeline. The first encoder's last layer, which SDXL's penultimate
    states never pass through, stays as it was."""
    out = finetuned(method)
    assert (out / "samples" / "step-00000003.png").is_file()  # the run's grid, drawn by the SDXL pipeline of its parts
    weights = [load_file(str(folder / "text_encoder" / "model.safetensors")) for folder in (sdxl, out / "pipeline")]
    last = [k for k in weights[0] if "layers.2." in k or "final_layer_norm" in k]  # the tiny encoders have 3 layers
    assert last and all(torch.equal(weights[0][k], weights[1][k]) for k in last)
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0] if "layers.1." in k)
    ours = LatentDiffusionPipeline.from_pretrained(out / "pipeline", dtype="fp32")
    theirs = StableDiffusionXLPipeline.from_pretrained(out / "pipeline", add_watermarker=False)
    assert isinstance(ours, LatentDiffusionXLPipeline)
    trained = images(ours)
    assert np.abs(trained - images(theirs)).max() < 1e-4
    assert np.abs(trained - images(StableDiffusionXLPipeline.from_pretrained(sdxl, add_watermarker=False))).max() > 1e-3  # it trained
    if method == "lora":
        keys = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors")).keys()
        assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}
        assert not (out / "lora" / "lora_kohya.safetensors").exists()  # kohya's SDXL layout names original blocks: not written
        same_sampler = lambda pipe: setattr(pipe, "scheduler", type(ours.scheduler).from_config(ours.scheduler.config)) or pipe  # noqa: E731
        base = same_sampler(StableDiffusionXLPipeline.from_pretrained(sdxl, add_watermarker=False))  # the export's DPM++
        base.load_lora_weights(str(out / "lora"))
        assert base.get_list_adapters() == {"unet": ["default_0"], "text_encoder": ["default_0"], "text_encoder_2": ["default_0"]}
        assert np.abs(images(base) - trained).max() < 1e-4  # diffusers' base + our file = our fused export
        mine = same_sampler(LatentDiffusionPipeline.from_pretrained(sdxl, dtype="fp32"))
        mine.load_lora_weights(str(out / "lora"))
        assert np.abs(images(mine) - trained).max() < 1e-4
        off = images(mine, cross_attention_kwargs={"scale": 0.0})  # scale 0 switches every adapter off, both encoders' too
        assert np.abs(off - images(same_sampler(LatentDiffusionPipeline.from_pretrained(sdxl, dtype="fp32")))).max() < 1e-5


def test_an_sdxl_fine_tune_on_buckets_resumes_exactly_and_feeds_each_image_its_time_ids(sdxl, mixed_shapes, tmp_path, monkeypatch):
    """Full fine-tune on buckets with flips, the caption states and pooled embeddings cached, the validation loss on:
    killed after step 2 and relaunched it ends with the U-Net and the losses of a run that never stopped; every batch
    hands the U-Net time ids of its bucket, the cache's (mirrored where flipped); the cached pooled embeddings are the
    second encoder's."""
    import training.train_ldm as job
    from ldm.text import XLTextEncoders, XLTokenizers, encode_text
    from training.data.cache import load_latent_cache
    from training.data.captions import caption_variants
    from training.data.records import DataConfig, load_records

    seen = []
    real = job.added_cond
    monkeypatch.setattr(job, "added_cond", lambda pooled, time_ids: seen.append(time_ids.clone()) or real(pooled, time_ids))
    common = ["finetune.method=full", "train.max_steps=4", "train.checkpoint_every=2", "data.random_flip=true",
              "data.eval_split=test", "eval.every=2", f"cache.dir={tmp_path / 'cache'}"]  # fmt: skip
    train(finetune_cfg(sdxl, mixed_shapes, tmp_path / "full", *common))
    train(finetune_cfg(sdxl, mixed_shapes, tmp_path / "resumed", *common), stop_after_steps=2)
    train(finetune_cfg(sdxl, mixed_shapes, tmp_path / "resumed", *common))
    assert same_weights(unet_weights(tmp_path / "full"), unet_weights(tmp_path / "resumed"))
    logs = [[r for r in map(json.loads, (tmp_path / n / "log.jsonl").read_text().splitlines()) if "loss" in r or "val_loss" in r]
            for n in ("full", "resumed")]  # fmt: skip
    assert logs[0] and [{k: v for k, v in r.items() if k != "time" and k != "images_per_s"} for r in logs[0]] == [
        {k: v for k, v in r.items() if k != "time" and k != "images_per_s"} for r in logs[1]]  # fmt: skip

    (folder,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    records = load_records(mixed_shapes, DataConfig(path=str(mixed_shapes), resolution=32), captions=True)
    cache = load_latent_cache(folder, records)
    rows = torch.cat([cache.time_ids.read_all(), cache.time_ids_flipped.read_all()])
    batches = [ids for ids in seen if len(ids) == 4]  # the training steps' (validation batches are square, of the held-out images)
    assert len(batches) == 4 + 2 + 2  # 4 steps, then 2 before the stop and 2 after
    for ids in batches:
        assert len({tuple(r[4:].tolist()) for r in ids}) == 1  # one bucket a batch
        assert all((rows.float() == r).all(dim=1).any() for r in ids)  # each row one image's (or its mirror's) time ids
    assert any(ids[:, 3].max() > 0 for ids in batches)  # wide images, cropped away from their left edge

    pipe = LatentDiffusionPipeline.from_pretrained(sdxl, dtype="fp32")
    first = [caption_variants(records[int(i)]["text"]) for i in cache.source_index[:4]]
    emb = encode_text(XLTokenizers(pipe.tokenizer, pipe.tokenizer_2), XLTextEncoders(pipe.text_encoder, pipe.text_encoder_2),
                      [v[0] for v in first])  # fmt: skip
    cached = cache.text_pooled[torch.arange(4)][:, 0].float()  # (4, P) each image's first caption's
    assert cached.shape == emb.pooled.shape and max_difference({"p": cached}, {"p": emb.pooled}) < 2e-2  # bf16


def test_two_ranks_fine_tune_sdxl_as_one_does(sdxl, mixed_shapes, tmp_path):
    """LoRA on the U-Net and both text encoders (token ids each step, not cached states), on buckets with flips: two
    ranks with batch 4 end with the adapters and losses of one rank with batch 8."""
    import sys

    from tests.conftest import run_to_the_end

    accelerate = Path(sys.executable).parent / "accelerate"
    common = ["finetune.train_text_encoder=true", "data.random_flip=true", "train.max_steps=4", "train.checkpoint_every=4",
              f"cache.dir={tmp_path / 'cache'}"]  # fmt: skip
    runs = ("one", "two")  # one rank in this process (the same job), two launched
    train(finetune_cfg(sdxl, mixed_shapes, tmp_path / "one", *common, "train.batch_size=8"))
    run_to_the_end([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "-m", "training.train_ldm", "--config",
                    str(SDXL_CONFIG), f"model.init_from={sdxl}", f"data.path={mixed_shapes}", *TINY, *common,
                    f"output_dir={tmp_path / 'two'}", "train.batch_size=4"], tmp_path / "two")  # fmt: skip
    one, two = (load_file(str(tmp_path / n / "lora" / "pytorch_lora_weights.safetensors")) for n in runs)
    assert {k.split(".")[0] for k in one} == {"unet", "text_encoder", "text_encoder_2"} and max_difference(one, two) < 1e-5
    loss = [[r["loss"] for r in map(json.loads, (tmp_path / n / "log.jsonl").read_text().splitlines()) if "loss" in r] for n in runs]
    assert len(loss[0]) == 2 and np.allclose(loss[0], loss[1], atol=1e-5)


def test_the_generate_command_and_the_page_draw_an_sdxl_folder_with_a_lora_as_diffusers_does(sdxl, finetuned, tmp_path):
    """``python -m ldm.generate`` (and the page, which samples through the same function) on the SDXL folder with the
    run's LoRA: the pixels diffusers' SDXL pipeline draws with that file, sampler and seed."""
    from PIL import Image

    from ldm.app import build_app
    from ldm.generate import load_pipeline, main

    lora = finetuned("lora") / "lora"
    (path,) = main(["--model", str(sdxl), "--lora", str(lora), "--prompt", "a red apple", "--steps", "3", "--guidance", "5",
                    "--seed", "7", "--scheduler", "euler", "--dtype", "fp32", "--out", str(tmp_path / "out")])  # fmt: skip
    ours = np.asarray(Image.open(path).convert("RGB")).astype(int)
    pipe = load_pipeline(sdxl, lora, "fp32")
    pipe.set_scheduler("euler")
    theirs = StableDiffusionXLPipeline.from_pretrained(sdxl, add_watermarker=False)
    theirs.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    theirs.load_lora_weights(str(lora))
    want = theirs("a red apple", num_inference_steps=3, guidance_scale=5.0, generator=torch.Generator().manual_seed(7)).images[0]
    assert np.abs(ours - np.asarray(want).astype(int)).max() <= 1  # uint8 rounding
    page = build_app(pipe, has_lora=True)
    (generate,) = [f.fn for f in page.fns.values() if f.fn is not None and f.fn.__name__ == "generate"]
    files, seed = generate("a red apple", "", 3, 5.0, 7, False, "euler", 1, 32, 32, 1.0, None, 0.8, progress=lambda *a, **k: None)
    assert seed == 7 and np.abs(np.asarray(Image.open(files[0][0]).convert("RGB")).astype(int) - ours).max() == 0


def test_prior_preservation_on_sdxl_draws_class_images_with_the_base_model_and_trains_on_both(sdxl, mixed_shapes, tmp_path,
                                                                                                monkeypatch):  # fmt: skip
    """DreamBooth's class images come from the SDXL base pipeline, and each micro-batch is the instance images followed
    by as many class images, their pooled embeddings and time ids joined to the instance ones (the class images' are
    their own: 32x32, uncropped)."""
    import training.train_ldm as job

    seen = []
    real = job.added_cond
    monkeypatch.setattr(job, "added_cond", lambda pooled, time_ids: seen.append((len(pooled), time_ids.clone())) or real(pooled, time_ids))
    prior = [f"prior.class_data={tmp_path / 'class'}", "prior.class_prompt=a pattern", "prior.num_class_images=4", "prior.steps=2"]
    train(finetune_cfg(sdxl, mixed_shapes, tmp_path / "prior", "train.max_steps=2", "train.checkpoint_every=2",
                       "data.buckets.enabled=false", *prior))  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "class").glob("*.png")) == [f"class-{i:05d}.png" for i in range(4)]
    assert len(seen) == 2 and all(n == 8 for n, _ in seen)  # 4 instance + 4 class images a step
    for _, ids in seen:
        assert ids[4:].tolist() == [[32, 32, 0, 0, 32, 32]] * 4  # the class images: drawn at 32x32, not cropped


def test_sdxl_folders_this_project_cannot_draw_as_diffusers_does_are_refused_in_one_line(sdxl, tmp_path):
    """A refiner (no first text encoder) and an autoencoder whose latents diffusers' SDXL pipeline would scale otherwise
    (a shift_factor, latents_mean / latents_std); the folder's force_zeros_for_empty_prompt is kept in a run's pipelines."""
    import shutil

    from runtime.errors import InputError
    from training.stage2.models import folder_text
    from training.stage2.samples import pipeline_of

    refiner = tmp_path / "refiner"
    shutil.copytree(sdxl, refiner)
    index = json.loads((refiner / "model_index.json").read_text())
    (refiner / "model_index.json").write_text(json.dumps({**index, "text_encoder": [None, None], "force_zeros_for_empty_prompt": False}))
    with pytest.raises(InputError, match="refiner"):
        LatentDiffusionPipeline.from_pretrained(refiner)
    from ldm.single_file import SingleFileError, check_convertible

    with pytest.raises(SingleFileError, match="Stable Diffusion XL folder"):  # the single-file export: SD 1.x only
        check_convertible(sdxl)
    (refiner / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": False}))
    tokenizers, encoders, _ = folder_text(refiner)
    pipe = LatentDiffusionPipeline.from_pretrained(sdxl, dtype="fp32")
    assert pipeline_of(pipe.vae, encoders, tokenizers, pipe.unet, pipe.scheduler).config.force_zeros_for_empty_prompt is False
    for key, value in (("shift_factor", 0.1), ("latents_mean", [0.0] * 4)):
        pipe.vae.register_to_config(**{key: value})
        with pytest.raises(InputError, match="shift_factor" if key == "shift_factor" else "latents_mean"):
            pipeline_of(pipe.vae, encoders, tokenizers, pipe.unet, pipe.scheduler)
        pipe.vae.register_to_config(**{key: None})
