"""ldm/text.py: the real CLIP tokenizer built offline, which encoders are masked, and how prompts are padded
and encoded."""

from __future__ import annotations

from ldm.text import clip_tokenizer


def test_clip_tokenizer_gives_openai_clip_ids():
    tok = clip_tokenizer()
    assert len(tok) == 49408
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_clip_pads_to_77_unmasked_and_a_bert_encoder_to_the_longest_prompt_with_its_mask():
    from ldm.text import build_clip_text_encoder, encode_text, load_minilm, tokenize, uses_attention_mask

    clip = build_clip_text_encoder("tiny")
    assert not uses_attention_mask(clip)  # as Stable Diffusion: the padding positions' states condition the U-Net
    tokens = tokenize(clip_tokenizer(), clip, ["a cat", "a photo of a red apple"])
    assert tokens["input_ids"].shape == (2, 77)
    assert encode_text(clip_tokenizer(), clip, ["a cat"]).mask is None
    tokenizer, minilm = load_minilm()
    assert uses_attention_mask(minilm)
    emb = encode_text(tokenizer, minilm, ["a cat", "a photo of a red apple"])
    n_long = len(tokenizer("a photo of a red apple").input_ids)
    assert emb.states.shape == (2, n_long, 384) and emb.mask.shape == (2, n_long)
    assert emb.mask[1].all() and emb.mask[0].sum() == len(tokenizer("a cat").input_ids)  # padding masked out
    assert encode_text(tokenizer, minilm, ["a cat"], pad_to=12).states.shape == (1, 12, 384)  # the cache's fixed length
