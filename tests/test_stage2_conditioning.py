"""training/stage2/conditioning.py: a micro-batch's caption conditioning, cached or tokenised, with dropout to ""."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from ldm.text import build_clip_text_encoder, clip_tokenizer, encode_text, tokenize
from training.stage2.conditioning import Conditioning


def _encoder():
    torch.manual_seed(0)
    return clip_tokenizer(), build_clip_text_encoder("tiny").eval()


def test_cached_states_are_gathered_and_dropped_captions_become_the_empty_captions_states():
    tokenizer, encoder = _encoder()
    captions = ["red apple", "sun", "rocket"]
    with torch.no_grad():
        cached = encode_text(tokenizer, encoder, captions)
        cache = SimpleNamespace(captions=captions, text_states=cached.states.bfloat16(), text_mask=torch.ones(3, cached.states.shape[1], dtype=torch.int8),
                                text_pooled=None)
        cond = Conditioning(cache, tokenizer, encoder, text_trains=False, masked=False)
        out = cond(torch.tensor([2, 0]), torch.tensor([False, True]), "cpu")
        empty = encode_text(tokenizer, encoder, [""], pad_to=cached.states.shape[1]).states
    assert out["mask"] is None  # CLIP: unmasked, as Stable Diffusion
    assert out["states"].dtype == torch.float32  # the cache's bf16, widened for the U-Net
    assert torch.equal(out["states"][0], cache.text_states[2].float())
    assert torch.equal(out["states"][1], empty[0].bfloat16().float())  # rounded like the cached captions


def test_without_cached_states_a_frozen_encoder_encodes_each_batch_as_the_cache_would_have():
    """cache.text=false: the states the cache would hold, before its bf16 rounding, and no graph."""
    tokenizer, encoder = _encoder()
    cache = SimpleNamespace(captions=["red apple", "sun", "rocket"], text_states=None)
    out = Conditioning(cache, tokenizer, encoder, text_trains=False, masked=False)(torch.tensor([0, 2]), torch.tensor([False, True]), "cpu")
    expected = encode_text(tokenizer, encoder, ["red apple", ""])
    assert torch.equal(out["states"], expected.states) and not out["states"].requires_grad
    assert out["mask"] is None


def test_a_trained_encoder_gets_token_ids_with_empty_captions_where_dropped():
    tokenizer, encoder = _encoder()
    cache = SimpleNamespace(captions=["red apple", "sun", "rocket"])
    out = Conditioning(cache, tokenizer, encoder, text_trains=True, masked=False)(torch.tensor([1, 2]), torch.tensor([True, False]), "cpu")
    expected = tokenize(tokenizer, encoder, ["", "rocket"])["input_ids"]
    assert torch.equal(out["input_ids"], expected) and out["mask"] is None
