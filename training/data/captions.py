"""Captions as taggers and captioners write them: several captions per image, and comma-separated tags that are
shuffled and dropped per step (kohya's ``shuffle_caption``, ``keep_tokens``, ``caption_tag_dropout_rate``).

An image's caption text holds its variants one per line: a ``.txt`` file beside the image with one caption a line, a
list in ``metadata.jsonl`` (``"text": ["a red apple", "apple, red, fruit"]``) or a list column of a saved dataset or
parquet file (both joined by newlines when the records are read). Each step draws one variant per image, and the
tags of that variant are processed, from one seed per sample that the step's randomness gives
(``training.stage2.randomness``): a resumed run and any number of processes draw the same captions.

    variant  = rng.randrange(number of variants)         rng = random.Random(seed)
    tags     = variant.split(separator), stripped
    kept     = tags[:keep_tokens]                        stay first, in place, never dropped
    rest     = [t for t in tags[keep_tokens:] if rng.random() >= tag_dropout]
    shuffled = rng.shuffle(rest) if shuffle_tags
    caption  = (separator + " ").join(kept + rest)

The first variant is the image's caption wherever one caption is needed (the evaluation's prompts).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from training.config import ConfigError


@dataclass(frozen=True)
class CaptionConfig:
    shuffle_tags: bool = False  # shuffle the separated tags of the drawn caption every step (kohya: shuffle_caption)
    keep_tokens: int = 0  # the first N tags stay in place and are never dropped (kohya: keep_tokens)
    tag_dropout: float = 0.0  # each other tag is left out with this probability every step (kohya: caption_tag_dropout_rate)
    separator: str = ","  # between tags (kohya: caption_separator)

    def __post_init__(self) -> None:
        if self.keep_tokens < 0:
            raise ConfigError(f"captions.keep_tokens={self.keep_tokens} must be >= 0")
        if not 0.0 <= self.tag_dropout < 1.0:
            raise ConfigError(f"captions.tag_dropout={self.tag_dropout} must be in [0, 1)")
        if not self.separator.strip():
            raise ConfigError(f"captions.separator={self.separator!r} must hold a character other than whitespace")
        if self.keep_tokens and not self.per_step:
            raise ConfigError(
                f"captions.keep_tokens={self.keep_tokens} would be ignored: it keeps tags in place against "
                "captions.shuffle_tags=true or captions.tag_dropout > 0, and neither is set"
            )

    @property
    def per_step(self) -> bool:
        """Whether a caption's text changes from step to step beyond its variants: such captions are encoded every
        step, not cached (a caption of n shuffled tags has n! orders)."""
        return self.shuffle_tags or self.tag_dropout > 0


def caption_variants(text: str) -> list[str]:
    """The captions of one image: the non-empty lines of its caption text (one line: one caption)."""
    variants = [line.strip() for line in text.split("\n") if line.strip()]
    return variants or [text.strip()]


def first_caption(text: str) -> str:
    """The caption an image stands for where one is needed (evaluation prompts)."""
    return caption_variants(text)[0]


def draw_caption(text: str, seed: int, cfg: CaptionConfig) -> tuple[int, str]:
    """(the variant drawn, the caption after tag processing) for one sample with ``seed``; the formula is the
    module's docstring. The variant index is the same whether or not the tags are processed, so cached states of
    each variant and captions encoded per step agree on it."""
    rng = random.Random(seed)
    variants = caption_variants(text)
    k = rng.randrange(len(variants))
    if not cfg.per_step:
        return k, variants[k]
    tags = [tag.strip() for tag in variants[k].split(cfg.separator) if tag.strip()]
    kept, rest = tags[: cfg.keep_tokens], tags[cfg.keep_tokens :]
    rest = [tag for tag in rest if rng.random() >= cfg.tag_dropout]
    if cfg.shuffle_tags:
        rng.shuffle(rest)
    return k, f"{cfg.separator} ".join(kept + rest)


def variant_index(text: str, seed: int) -> int:
    """Which of ``text``'s variants :func:`draw_caption` draws for ``seed`` (what the cached states are picked by)."""
    return random.Random(seed).randrange(len(caption_variants(text)))
