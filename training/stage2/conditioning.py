"""Caption conditioning of a stage-2 micro-batch, the three ways it comes: the cached states of a
frozen text encoder; states of a frozen encoder computed each step (``cache.text=false``); or
token ids for an encoder that trains with the U-Net. Captions drawn for dropout (classifier-free
guidance) become the empty caption in every case."""

from __future__ import annotations

import torch

from ldm.text import encode_text, tokenize


class Conditioning:
    def __init__(self, cache, tokenizer, text_encoder, text_trains: bool, masked: bool) -> None:
        self.cache, self.tokenizer, self.text_encoder, self.text_trains, self.masked = (
            cache,
            tokenizer,
            text_encoder,
            text_trains,
            masked,
        )
        self.cached = not text_trains and cache.text_states is not None
        if self.cached:  # the empty caption's states, padded and rounded like the cache's
            length = cache.text_states.shape[1]
            empty = encode_text(tokenizer, text_encoder, [""], pad_to=length)
            self.empty_states = empty.states.to(cache.text_states.dtype).float().cpu()  # (1, L, D)
            self.empty_mask = (empty.mask if masked else torch.ones(1, length)).long().cpu()  # (1, L)

    def __call__(self, idx: torch.Tensor, drop: torch.Tensor, device) -> dict:
        """UNetAndTextEncoder's text keyword arguments for the cached images ``idx`` (B,); ``drop`` (B,)
        marks the captions replaced by ""."""
        if self.cached:
            states = torch.where(drop[:, None, None], self.empty_states, self.cache.text_states[idx].float())  # (B, L, D)
            mask = torch.where(drop[:, None], self.empty_mask, self.cache.text_mask[idx].long())  # (B, L)
            return {"states": states.to(device), "mask": mask.to(device) if self.masked else None}
        captions = ["" if d else self.cache.captions[i] for i, d in zip(idx.tolist(), drop.tolist())]
        if self.text_trains:
            tokens = tokenize(self.tokenizer, self.text_encoder, captions)
            return {
                "input_ids": tokens["input_ids"].to(device),
                "mask": tokens["attention_mask"].to(device) if self.masked else None,
            }
        emb = encode_text(self.tokenizer, self.text_encoder, captions)  # frozen, no gradient: (B, L, D)
        return {"states": emb.states.to(device), "mask": emb.mask.to(device) if self.masked else None}
