"""Caption conditioning of a stage-2 micro-batch, the two ways it comes: the cached states of a
frozen text encoder, or token ids for an encoder that trains with the U-Net. Captions drawn for
dropout (classifier-free guidance) become the empty caption either way."""

from __future__ import annotations

import torch

from ldm.text import encode_text, tokenize


class Conditioning:
    def __init__(self, cache, tokenizer, text_encoder, trains: bool, masked: bool) -> None:
        self.cache, self.tokenizer, self.text_encoder, self.trains, self.masked = cache, tokenizer, text_encoder, trains, masked
        if not trains:  # the empty caption's states, padded like the cache's
            length = cache.text_states.shape[1]
            empty = encode_text(tokenizer, text_encoder, [""], pad_to=length)
            self.empty_states = empty.states.float().cpu()  # (1, L, D)
            self.empty_mask = (empty.mask if masked else torch.ones(1, length)).cpu()  # (1, L)

    def __call__(self, idx: torch.Tensor, drop: torch.Tensor, device) -> dict:
        """The Denoiser's text keyword arguments for the cached images ``idx`` (B,); ``drop`` (B,)
        marks the captions replaced by ""."""
        if self.trains:
            captions = ["" if d else self.cache.captions[i] for i, d in zip(idx.tolist(), drop.tolist())]
            tokens = tokenize(self.tokenizer, self.text_encoder, captions)
            return {"input_ids": tokens["input_ids"].to(device),
                    "mask": tokens["attention_mask"].to(device) if self.masked else None}  # fmt: skip
        states = torch.where(drop[:, None, None], self.empty_states, self.cache.text_states[idx])  # (B, L, D)
        mask = torch.where(drop[:, None], self.empty_mask, self.cache.text_mask[idx])  # (B, L)
        return {"states": states.to(device), "mask": mask.to(device) if self.masked else None}
