"""training/data/captions.py: several captions per image, tag shuffling with keep_tokens and tag dropout, drawn per
sample from a seed; read from metadata.jsonl lists, .txt lines and list columns; cached per variant."""

from __future__ import annotations

from collections import Counter

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from ldm.text import build_clip_text_encoder, clip_tokenizer, encode_text
from tests.conftest import ldm_cfg, max_difference, unet_weights, write_imagefolder
from training.config import ConfigError
from training.data.cache import build_latent_cache, load_latent_cache
from training.data.captions import CaptionConfig, caption_variants, draw_caption, first_caption, variant_index
from training.data.records import DataConfig, load_records
from training.stage2.conditioning import Conditioning

TAGS = "sks dog, red collar, grass, sunny, looking left, photo"


def _images(n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {f"{i:02d}.png": Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for i in range(n)}


@pytest.fixture(scope="module")
def variants_data(tmp_path_factory):
    """16 images: the even ones with three captions (a list in metadata.jsonl), the odd ones with one."""
    images = _images(16)
    captions = {
        name: [f"a red pattern {i}", f"pattern, red, {i}", "noise"] if i % 2 == 0 else f"a blue pattern {i}"
        for i, name in enumerate(images)
    }
    return write_imagefolder(tmp_path_factory.mktemp("variants") / "data", images, captions)


def test_several_captions_come_from_metadata_lists_txt_lines_and_list_columns(variants_data, tmp_path):
    records = load_records(variants_data, DataConfig(), captions=True)
    assert records[0]["text"] == "a red pattern 0\npattern, red, 0\nnoise" and records[1]["text"] == "a blue pattern 1"
    assert caption_variants(records[0]["text"]) == ["a red pattern 0", "pattern, red, 0", "noise"]
    assert first_caption(records[0]["text"]) == "a red pattern 0" and caption_variants("one") == ["one"]

    folder = write_imagefolder(tmp_path / "txt", _images(2))  # no metadata.jsonl: a .txt beside each image
    (folder / "00.txt").write_text("a cat on a sofa\n\n  cat, sofa, indoors  \n")
    (folder / "01.txt").write_text("a dog")
    texts = load_records(folder, DataConfig(), captions=True)["text"]
    assert [caption_variants(t) for t in texts] == [["a cat on a sofa", "cat, sofa, indoors"], ["a dog"]]

    saved = tmp_path / "saved"  # a saved dataset whose caption column is a list of strings (parquet's too)
    datasets.Dataset.from_dict(
        {"image": [str(folder / "00.png"), str(folder / "01.png")], "text": [["a cat", "cat,\nsofa"], ["a dog"]]}
    ).save_to_disk(str(saved))
    assert load_records(saved, DataConfig(), captions=True)["text"] == ["a cat\ncat, sofa", "a dog"]


def test_tags_are_shuffled_after_the_kept_ones_dropped_per_seed_and_each_variant_is_drawn():
    shuffled = CaptionConfig(shuffle_tags=True, keep_tokens=2)
    tags = [t.strip() for t in TAGS.split(",")]
    outs = [draw_caption(TAGS, seed, shuffled)[1] for seed in range(200)]
    for out in outs:
        got = out.split(", ")
        assert got[:2] == tags[:2] and sorted(got[2:]) == sorted(tags[2:])  # the first two stay; the rest permuted
    assert len(set(outs)) > 12 and outs == [draw_caption(TAGS, seed, shuffled)[1] for seed in range(200)]

    dropped = [draw_caption(TAGS, seed, CaptionConfig(tag_dropout=0.5, keep_tokens=1))[1].split(", ") for seed in range(400)]
    assert all(d[0] == "sks dog" and d[1:] == [t for t in tags[1:] if t in d[1:]] for d in dropped)  # order kept, no shuffle
    kept = Counter(t for d in dropped for t in d[1:])
    assert all(abs(kept[t] / 400 - 0.5) < 0.1 for t in tags[1:])  # each other tag left out about half the time

    assert draw_caption(TAGS, 3, CaptionConfig()) == (0, TAGS)  # off: the caption as written
    text = "first\nsecond\nthird"
    drawn = Counter(draw_caption(text, seed, CaptionConfig()) for seed in range(300))
    assert set(drawn) == {(0, "first"), (1, "second"), (2, "third")} and min(drawn.values()) > 70
    assert all(variant_index(text, s) == draw_caption(text, s, shuffled)[0] for s in range(50))  # cached = per step


@pytest.mark.parametrize("overrides,message", [
    (["captions.keep_tokens=2"], "captions.keep_tokens=2 would be ignored"),
    (["captions.tag_dropout=1.0"], "captions.tag_dropout=1.0 must be in [0, 1)"),
    (["captions.keep_tokens=-1", "captions.shuffle_tags=true"], "captions.keep_tokens=-1 must be >= 0"),
])  # fmt: skip
def test_bad_caption_settings_are_one_line(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
        ldm_cfg(tmp_path, tmp_path, tmp_path / "run", *overrides)


def test_the_cache_holds_every_variants_states_and_a_step_picks_each_samples_drawn_one(variants_data, tiny_vae, tmp_path):
    from autoencoder.model import load_autoencoder

    torch.manual_seed(0)
    tokenizer, encoder = clip_tokenizer(), build_clip_text_encoder("tiny").eval()
    records = load_records(variants_data, DataConfig(), captions=True)
    folder = build_latent_cache(
        tmp_path, {"test": 1}, load_autoencoder(tiny_vae), records, DataConfig(), (tokenizer, encoder), show_progress=False
    )
    cache = load_latent_cache(folder, records)
    assert cache.text_states.shape[:2] == (16, 3) and cache.text_mask.shape[:2] == (16, 3)
    with torch.no_grad():
        want = encode_text(tokenizer, encoder, caption_variants(records[4]["text"]), pad_to=cache.text_states.shape[-2])
    rows = cache.text_states[torch.arange(16)]  # (16, 3, L, D): row 4 is image 4, its three captions' states
    assert max_difference({"s": rows[4].float()}, {"s": want.states.bfloat16().float()}) == 0
    seeds = torch.arange(100, 108)
    idx = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])
    with torch.no_grad():
        out = Conditioning(cache, tokenizer, encoder, text_trains=False, masked=False)(idx, torch.zeros(8, dtype=torch.bool), "cpu", seeds)
    picks = [variant_index(records[int(i)]["text"], int(s)) for i, s in zip(idx, seeds)]
    assert set(picks[:4]) != {0} and picks[4:] == [0] * 4  # the drawn ones, not always the first
    for b, (i, k) in enumerate(zip(idx.tolist(), picks)):
        assert torch.equal(out["states"][b], rows[i, k].float())


def test_a_run_on_several_captions_resumes_exactly_and_each_sample_is_conditioned_on_its_drawn_caption(variants_data, tiny_vae, tmp_path,
                                                                                                        monkeypatch):  # fmt: skip
    """MiniLM, frozen: every variant's states from the cache. Killed after step 3 and relaunched, the U-Net is the one of
    a run that never stopped; and the states each sample of the run is conditioned on are MiniLM's, computed here, of the
    caption its seed draws (variant_index), of "" where the caption is dropped; the second and third captions are drawn too."""
    from ldm.text import load_minilm
    from tests.conftest import fresh_state
    from training.train_ldm import train as train_job

    train = fresh_state(train_job)
    seen, call = [], Conditioning.__call__

    def recorded(self, idx, drop, device, seeds=None):
        cond = call(self, idx, drop, device, seeds)
        seen.append((idx.tolist(), drop.tolist(), seeds.tolist(), cond["states"].detach().float().cpu()))
        return cond

    common = ["model.text_encoder=minilm", "train.max_steps=6", "train.checkpoint_every=3", "train.sample_every=100",
              "model.check_images=0", "train.mixed_precision=fp32", f"cache.dir={tmp_path / 'cache'}"]  # fmt: skip
    monkeypatch.setattr(Conditioning, "__call__", recorded)
    train(ldm_cfg(variants_data, tiny_vae, tmp_path / "full", *common))
    monkeypatch.undo()
    train(ldm_cfg(variants_data, tiny_vae, tmp_path / "resumed", *common), stop_after_steps=3)
    train(ldm_cfg(variants_data, tiny_vae, tmp_path / "resumed", *common))
    full, resumed = unet_weights(tmp_path / "full"), unet_weights(tmp_path / "resumed")
    assert all(torch.equal(full[k], resumed[k]) for k in full)

    texts = load_records(variants_data, DataConfig(), captions=True)["text"]
    tokenizer, encoder = load_minilm()
    length = seen[0][3].shape[1]
    captions = sorted({c for t in texts for c in caption_variants(t)} | {""})
    with torch.no_grad():
        by_hand = dict(zip(captions, encode_text(tokenizer, encoder.eval(), captions, pad_to=length).states))
    assert len(seen) == 6 and sum(len(idx) for idx, *_ in seen) == 48
    drawn = Counter()
    for idx, drop, seeds, got in seen:
        for b, (i, dropped, seed) in enumerate(zip(idx, drop, seeds)):
            variants = caption_variants(texts[i])
            caption = "" if dropped else variants[variant_index(texts[i], seed)]
            drawn[(len(variants), variants.index(caption) if caption else None)] += 1
            errors = {c: (got[b] - by_hand[c]).abs().max().item() for c in {caption, *variants}}
            assert errors[caption] < 0.1 and all(e > 1 for c, e in errors.items() if c != caption), (i, seed, errors)  # bf16 cache
    assert all(drawn[(3, k)] >= 4 for k in range(3)), drawn  # the second and third captions are trained on too
