"""training/conditioning.py: a micro-batch's caption conditioning, cached or tokenised, with dropout to ""."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from ldm.text import build_clip_text_encoder, clip_tokenizer, encode_text, tokenize
from training.conditioning import Conditioning


def _encoder():
    torch.manual_seed(0)
    return clip_tokenizer(), build_clip_text_encoder("tiny").eval()


def test_cached_states_are_gathered_and_dropped_captions_become_the_empty_captions_states():
    tokenizer, encoder = _encoder()
    captions = ["red apple", "sun", "rocket"]
    with torch.no_grad():
        cached = encode_text(tokenizer, encoder, captions)
        cache = SimpleNamespace(captions=captions, text_states=cached.states.float(), text_mask=torch.ones(3, cached.states.shape[1]))
        cond = Conditioning(cache, tokenizer, encoder, trains=False, masked=False)
        out = cond(torch.tensor([2, 0]), torch.tensor([False, True]), "cpu")
        empty = encode_text(tokenizer, encoder, [""], pad_to=cached.states.shape[1]).states.float()
    assert out["mask"] is None  # CLIP: unmasked, as Stable Diffusion
    assert torch.equal(out["states"][0], cache.text_states[2])
    assert torch.allclose(out["states"][1], empty[0])


def test_a_trained_encoder_gets_token_ids_with_empty_captions_where_dropped():
    tokenizer, encoder = _encoder()
    cache = SimpleNamespace(captions=["red apple", "sun", "rocket"])
    out = Conditioning(cache, tokenizer, encoder, trains=True, masked=False)(torch.tensor([1, 2]), torch.tensor([True, False]), "cpu")
    expected = tokenize(tokenizer, encoder, ["", "rocket"])["input_ids"]
    assert torch.equal(out["input_ids"], expected) and out["mask"] is None
