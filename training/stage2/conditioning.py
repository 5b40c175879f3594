"""Caption conditioning of a stage-2 micro-batch, the three ways it comes: the cached states of a
frozen text encoder; states of a frozen encoder computed each step (``cache.text=false``, or captions
whose tags change every step); or token ids for an encoder that trains with the U-Net. Each sample's
caption is drawn from its image's variants, its tags processed, by the sample's seed
(``training/data/captions.py``); captions drawn for dropout (classifier-free guidance) become the empty
caption in every case."""

from __future__ import annotations

import torch

from ldm.text import encode_text, tokenize
from training.data.captions import CaptionConfig, draw_caption, first_caption, variant_index


class Conditioning:
    def __init__(
        self, cache, tokenizer, text_encoder, text_trains: bool, masked: bool, captions: CaptionConfig | None = None
    ) -> None:
        self.cache, self.tokenizer, self.text_encoder, self.text_trains, self.masked = (
            cache,
            tokenizer,
            text_encoder,
            text_trains,
            masked,
        )
        self.captions = captions or CaptionConfig()
        self.cached = not text_trains and cache.text_states is not None
        if self.cached:  # the empty caption's states, padded and rounded like the cache's
            length = cache.text_states.shape[-2]
            empty = encode_text(tokenizer, text_encoder, [""], pad_to=length)
            self.empty_states = empty.states.to(cache.text_states.dtype).float().cpu()  # (1, L, D)
            self.empty_mask = (empty.mask if masked else torch.ones(1, length)).long().cpu()  # (1, L)
            if empty.pooled is not None:  # Stable Diffusion XL's pooled embedding (1, P)
                self.empty_pooled = empty.pooled.to(cache.text_states.dtype).float().cpu()

    def __call__(self, idx: torch.Tensor, drop: torch.Tensor, device, seeds: torch.Tensor | None = None) -> dict:
        """UNetAndTextEncoder's text keyword arguments for the cached images ``idx`` (B,); ``drop`` (B,)
        marks the captions replaced by ""; ``seeds`` (B,) draw each sample's caption (None: the first caption)."""
        seeds = seeds.tolist() if seeds is not None else [None] * len(idx)
        if self.cached:
            states, mask = self.cache.text_states[idx].float(), self.cache.text_mask[idx].long()  # (B, [V,] L, D), (B, [V,] L)
            pooled = self.cache.text_pooled[idx].float() if self.cache.text_pooled is not None else None  # (B, [V,] P)
            if states.dim() == 4:  # several captions an image: each sample's drawn one
                pick = torch.tensor(
                    [0 if s is None else variant_index(self.cache.captions[i], s) for i, s in zip(idx.tolist(), seeds)]
                )
                rows = torch.arange(len(idx))
                states, mask = states[rows, pick], mask[rows, pick]
                pooled = pooled[rows, pick] if pooled is not None else None
            states = torch.where(drop[:, None, None], self.empty_states, states)  # (B, L, D)
            mask = torch.where(drop[:, None], self.empty_mask, mask)  # (B, L)
            cond = {"states": states.to(device), "mask": mask.to(device) if self.masked else None}
            if pooled is not None:
                cond["pooled"] = torch.where(drop[:, None], self.empty_pooled, pooled).to(device)  # (B, P)
            return cond
        captions = ["" if d else self._caption(self.cache.captions[i], s) for i, d, s in zip(idx.tolist(), drop.tolist(), seeds)]
        if self.text_trains:
            tokens = tokenize(self.tokenizer, self.text_encoder, captions)
            return {
                "input_ids": tokens["input_ids"].to(device),
                "mask": tokens["attention_mask"].to(device) if self.masked else None,
            }
        emb = encode_text(self.tokenizer, self.text_encoder, captions)  # frozen, no gradient: (B, L, D)
        cond = {"states": emb.states.to(device), "mask": emb.mask.to(device) if self.masked else None}
        return cond | ({"pooled": emb.pooled.to(device)} if emb.pooled is not None else {})

    def _caption(self, text: str, seed: int | None) -> str:
        return first_caption(text) if seed is None else draw_caption(text, seed, self.captions)[1]
