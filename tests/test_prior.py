"""training/stage2/prior.py: DreamBooth's prior preservation: class images drawn once by the base model (seeded, kept
in their folder), batches of instance and class images, the weighted loss, exact resume."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ldm import LatentDiffusionPipeline
from ldm.schedulers import folder_scheduler
from tests.conftest import ROOT, fresh_state, logged, max_difference, run_to_the_end, tiny_pipeline, write_imagefolder
from training.config import ConfigError, load_config
from training.ldm_config import LdmJobConfig
from training.stage2.prior import PRIOR_SEED, PriorPreservation, joined_conditioning
from training.train_ldm import train as train_job

train = fresh_state(train_job)
LORA_CONFIG = ROOT / "configs" / "finetune" / "lora-openmoji.yaml"


@pytest.fixture(scope="module")
def base_and_instances(tmp_path_factory):
    root = tmp_path_factory.mktemp("prior")
    tiny_pipeline("clip", seed=4).save_pretrained(root / "base")
    rng = np.random.default_rng(0)
    images = {f"{i}.png": Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for i in range(4)}
    return root / "base", write_imagefolder(root / "sks", images)


def prior_overrides(base, data, out, classes, *overrides) -> list[str]:
    return [f"model.init_from={base}", f"data.path={data}", f"output_dir={out}", "data.caption=a sks pattern",
            f"prior.class_data={classes}", "prior.class_prompt=a pattern", "prior.num_class_images=4", "prior.steps=2",
            "prior.loss_weight=0.5", "train.batch_size=2", "train.max_steps=4", "train.checkpoint_every=2", "train.sample_every=100",
            "model.check_images=0", "eval.num_prompts=0", *overrides]  # fmt: skip


def prior_cfg(base, data, out, classes, *overrides):
    return load_config(LdmJobConfig, LORA_CONFIG, prior_overrides(base, data, out, classes, *overrides))


def drawn_by_the_base_model(base, indices: list[int]) -> list[np.ndarray]:
    """The class images ``indices`` as the base model draws them for 'a pattern' (run seed 0), computed here."""
    pipe = LatentDiffusionPipeline.from_pretrained(base, dtype=torch.float32)  # fp32 in the default layout, as the job holds it
    pipe.prepare_for_inference(dtype=torch.float32, channels_last=False)
    pipe.scheduler = folder_scheduler(pipe.scheduler.config)
    seeds = [torch.Generator().manual_seed(PRIOR_SEED + i) for i in indices]  # seed 0: 0 * 1_000_003 + PRIOR_SEED + i
    images = pipe(["a pattern"] * len(indices), num_inference_steps=2, guidance_scale=5.0, height=32, width=32, generator=seeds).images
    return [np.asarray(image) for image in images]


def lora(run) -> dict:
    return load_file(str(run / "lora" / "pytorch_lora_weights.safetensors"))


def test_class_images_are_the_base_models_drawn_once_and_a_run_resumes_exactly(base_and_instances, tmp_path):
    base, data = base_and_instances
    classes = tmp_path / "classes"
    train(prior_cfg(base, data, tmp_path / "full", classes, "train.log_every=1"))
    made = sorted(classes.iterdir())
    assert [p.name for p in made] == [f"class-{i:05d}.png" for i in range(4)]
    for path, image in zip(made, drawn_by_the_base_model(base, list(range(4))), strict=True):
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), image)
    stamps = [p.stat().st_mtime_ns for p in made]

    train(prior_cfg(base, data, tmp_path / "resumed", classes), stop_after_steps=2)
    train(prior_cfg(base, data, tmp_path / "resumed", classes))
    assert [p.stat().st_mtime_ns for p in sorted(classes.iterdir())] == stamps  # found there, not drawn again
    assert max_difference(lora(tmp_path / "full"), lora(tmp_path / "resumed")) == 0

    # the first step's loss is the instance images' plus prior.loss_weight (0.5) times the class images', each measured
    # here by a run of its own on the same base model: the instance images alone, the class images alone (captioned
    # prior.class_prompt, drawn by the class stream's seed)
    def alone(out, images, caption, seed):
        return load_config(LdmJobConfig, LORA_CONFIG, [f"model.init_from={base}", f"data.path={images}", f"output_dir={out}",
                           f"data.caption={caption}", f"seed={seed}", "train.batch_size=2", "train.max_steps=4", "train.log_every=1",
                           "train.checkpoint_every=100", "train.sample_every=100", "model.check_images=0", "eval.num_prompts=0"])  # fmt: skip

    train(alone(tmp_path / "instances", data, "a sks pattern", 0), stop_after_steps=1)
    train(alone(tmp_path / "classes-alone", classes, "a pattern", PRIOR_SEED), stop_after_steps=1)
    first = {run: logged(tmp_path / run, "loss")[0] for run in ("full", "instances", "classes-alone")}
    assert {r["step"] for r in first.values()} == {1}
    by_hand = first["instances"]["loss"] + 0.5 * first["classes-alone"]["loss"]
    assert first["full"]["loss"] == pytest.approx(by_hand, rel=1e-4, abs=2e-6), (first, by_hand)


def test_the_loss_is_the_instance_mean_plus_the_weighted_class_mean_and_captions_pad_under_their_mask():
    prior = PriorPreservation(batches=None, loss_weight=0.5)
    prior.instances = 2
    assert prior.loss(torch.tensor([1.0, 3.0, 10.0, 20.0])).item() == 2.0 + 0.5 * 15.0
    a = {"states": torch.ones(2, 5, 3), "mask": torch.ones(2, 5, dtype=torch.long)}
    b = {"states": torch.ones(2, 7, 3), "mask": torch.ones(2, 7, dtype=torch.long)}
    joined = joined_conditioning(a, b)
    assert joined["states"].shape == (4, 7, 3) and joined["mask"][:2, 5:].sum() == 0 and joined["mask"][2:].sum() == 14
    with pytest.raises(RuntimeError, match="unmasked text encoder"):
        joined_conditioning({**a, "mask": None}, {**b, "mask": None})


@pytest.mark.parametrize("overrides,message", [
    (["prior.class_prompt=' '"], "prior.class_data needs prior.class_prompt"),
    (["model.init_from=null", "finetune.method=none"], "it needs model.init_from"),
    (["data.buckets.enabled=true"], "class images are square crops"),
])  # fmt: skip
def test_bad_prior_settings_are_one_line(overrides, message, base_and_instances, tmp_path):
    base, data = base_and_instances
    with pytest.raises(ConfigError, match=message):
        prior_cfg(base, data, tmp_path / "x", tmp_path / "classes", *overrides)


def test_missing_class_images_take_free_names_never_a_users_file_and_two_processes_draw_their_shares(base_and_instances, tmp_path):
    """4 wanted, the folder holds a user's a.png and class-00001.png: two are drawn, as class-00000.png and
    class-00002.png (seeds PRIOR_SEED + 0 and + 2), the user's files untouched, by a job of two processes that draw
    one each (tests/prior_ranks.py counts them). A metadata.jsonl there (which would hide the drawn images) is one line."""
    base, data = base_and_instances
    folder = tmp_path / "classes"
    folder.mkdir()
    Image.new("RGB", (32, 32), (0, 0, 255)).save(folder / "a.png")
    Image.new("RGB", (32, 32), (0, 255, 0)).save(folder / "class-00001.png")
    users = {p.name: p.read_bytes() for p in folder.iterdir()}
    out = tmp_path / "run"
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "tests/prior_ranks.py",
           "--config", str(LORA_CONFIG), *prior_overrides(base, data, out, folder, "train.max_steps=1")]  # fmt: skip
    done = run_to_the_end(cmd, out)
    assert sorted(line for line in done.stdout.splitlines() if line.startswith("rank ")) == ["rank 0 drew 1", "rank 1 drew 1"]
    assert sorted(p.name for p in folder.iterdir()) == ["a.png", "class-00000.png", "class-00001.png", "class-00002.png"]
    assert all((folder / name).read_bytes() == content for name, content in users.items())
    for i in (0, 2):  # each drawn alone, as its process did; its process had fewer CPU threads, which round differently
        made = np.asarray(Image.open(folder / f"class-{i:05d}.png").convert("RGB")).astype(int)
        assert np.abs(made - drawn_by_the_base_model(base, [i])[0]).max() <= 2, i  # another seed's image differs by ~100

    from training.stage2.prior import make_class_images

    (folder / "metadata.jsonl").write_text("")
    with pytest.raises(ValueError, match="holds a metadata.jsonl"):
        make_class_images(prior_cfg(base, data, tmp_path / "x", folder), None, None)
