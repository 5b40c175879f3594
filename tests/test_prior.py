"""training/stage2/prior.py: DreamBooth's prior preservation: class images drawn once by the base model (seeded, kept
in their folder), batches of instance and class images, the weighted loss, exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ldm import LatentDiffusionPipeline
from ldm.schedulers import folder_scheduler
from tests.conftest import ROOT, fresh_state, max_difference, tiny_pipeline, write_imagefolder
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


def prior_cfg(base, data, out, classes, *overrides):
    return load_config(LdmJobConfig, LORA_CONFIG, [
        f"model.init_from={base}", f"data.path={data}", f"output_dir={out}", "data.caption=a sks pattern",
        f"prior.class_data={classes}", "prior.class_prompt=a pattern", "prior.num_class_images=4", "prior.steps=2",
        "train.batch_size=2", "train.max_steps=4", "train.checkpoint_every=2", "train.sample_every=100",
        "model.check_images=0", "eval.num_prompts=0", *overrides])  # fmt: skip


def lora(run) -> dict:
    return load_file(str(run / "lora" / "pytorch_lora_weights.safetensors"))


def test_class_images_are_the_base_models_drawn_once_and_a_run_resumes_exactly(base_and_instances, tmp_path):
    base, data = base_and_instances
    classes = tmp_path / "classes"
    train(prior_cfg(base, data, tmp_path / "full", classes))
    made = sorted(classes.iterdir())
    assert [p.name for p in made] == [f"class-{i:05d}.png" for i in range(4)]
    pipe = LatentDiffusionPipeline.from_pretrained(base, dtype=torch.float32)  # fp32 in the default layout, as the job holds it
    pipe.prepare_for_inference(dtype=torch.float32, channels_last=False)
    pipe.scheduler = folder_scheduler(pipe.scheduler.config)
    seeds = [torch.Generator().manual_seed(PRIOR_SEED + i) for i in range(4)]  # seed 0: 0 * 1_000_003 + PRIOR_SEED + i
    expected = pipe(["a pattern"] * 4, num_inference_steps=2, guidance_scale=5.0, height=32, width=32, generator=seeds).images
    for path, image in zip(made, expected):
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(image))
    stamps = [p.stat().st_mtime_ns for p in made]

    train(prior_cfg(base, data, tmp_path / "resumed", classes), stop_after_steps=2)
    train(prior_cfg(base, data, tmp_path / "resumed", classes))
    assert [p.stat().st_mtime_ns for p in sorted(classes.iterdir())] == stamps  # found there, not drawn again
    assert max_difference(lora(tmp_path / "full"), lora(tmp_path / "resumed")) == 0

    plain = load_config(LdmJobConfig, LORA_CONFIG, [f"model.init_from={base}", f"data.path={data}", f"output_dir={tmp_path / 'plain'}",
                        "data.caption=a sks pattern", "train.batch_size=2", "train.max_steps=4", "train.checkpoint_every=2",
                        "train.sample_every=100", "model.check_images=0", "eval.num_prompts=0"])  # fmt: skip
    train(plain)
    assert max_difference(lora(tmp_path / "full"), lora(tmp_path / "plain")) > 0  # the class images were trained on


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


class _Pipe:
    """Stands in for the base pipeline: each image a flat colour from its generator's seed."""

    def __init__(self):
        self.unet, self.text_encoder, self.drawn = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1), 0
        self.text_encoders = [self.text_encoder]  # a pipeline's list of them (Stable Diffusion XL's: two)

    def __call__(self, prompts, generator, **kwargs):
        from types import SimpleNamespace

        self.drawn += len(generator)
        return SimpleNamespace(images=[Image.new("RGB", (32, 32), (g.initial_seed() % 251, 0, 0)) for g in generator])


class _Accelerator:
    """Rank ``rank`` of ``world`` processes, as threads meeting at a barrier."""

    def __init__(self, rank=0, world=1, barrier=None):
        import threading

        self.process_index, self.num_processes, self.is_main_process = rank, world, rank == 0
        self.barrier = barrier or threading.Barrier(1)

    def wait_for_everyone(self):
        self.barrier.wait()


def test_missing_class_images_take_free_names_never_a_users_file_and_processes_share_them(base_and_instances, tmp_path):
    """4 wanted, the folder holds a user's a.png and class-00001.png: two are drawn, as class-00000.png and
    class-00002.png (seeds PRIOR_SEED + 0 and + 2), the user's files untouched; two processes drawing their shares make
    the same files. A metadata.jsonl there (which would hide the drawn images) is one line."""
    import threading

    from training.stage2.prior import make_class_images

    base, data = base_and_instances
    made = {}
    for world in (1, 2):
        folder = tmp_path / f"world-{world}"
        folder.mkdir()
        Image.new("RGB", (32, 32), (0, 0, 255)).save(folder / "a.png")
        Image.new("RGB", (32, 32), (0, 255, 0)).save(folder / "class-00001.png")
        cfg = prior_cfg(base, data, tmp_path / "x", folder)
        barrier, pipes = threading.Barrier(world, timeout=30), [_Pipe() for _ in range(world)]
        ranks = [threading.Thread(target=make_class_images, args=(cfg, pipes[r], _Accelerator(r, world, barrier))) for r in range(world)]
        for thread in ranks:
            thread.start()
        for thread in ranks:
            thread.join()
        made[world] = {p.name: np.asarray(Image.open(p)).tolist() for p in sorted(folder.iterdir())}
        assert [pipe.drawn for pipe in pipes] == [2 // world] * world  # each process its share
    assert sorted(made[1]) == ["a.png", "class-00000.png", "class-00001.png", "class-00002.png"]
    assert made[1]["class-00001.png"][0][0] == [0, 255, 0] and made[1]["class-00002.png"][0][0] == [(PRIOR_SEED + 2) % 251, 0, 0]
    assert made[1] == made[2]
    (tmp_path / "world-1" / "metadata.jsonl").write_text("")
    with pytest.raises(ValueError, match="holds a metadata.jsonl"):
        make_class_images(prior_cfg(base, data, tmp_path / "x", tmp_path / "world-1"), _Pipe(), _Accelerator())
