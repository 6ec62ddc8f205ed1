"""ECLIP models: ``create(name, **overrides)`` builds a preset offline (no weights are downloaded).

    python -m eclip.models            # parameter counts of every preset against the paper's
"""

from __future__ import annotations

import torch

from .config import PRESETS, ECLIPConfig, preset_config
from .decoder import InstanceDecoder
from .eclip import BATCH_KEYS, ECLIP
from .tokenizer import TextTokenizer

# Parameter counts the paper reports (millions), without the momentum copy.
PAPER_PARAMS_M = {"eclip-vit-b16": 220, "eclip-vit-l16": 450}


def create(name: str, **overrides) -> ECLIP:
    """Build a preset ("eclip-vit-b16", "eclip-vit-l16", "eclip-tiny", "eclip-small") with ECLIPConfig fields
    overridden.

    Weights are initialized from scratch: nothing is downloaded. Under ``with torch.device("meta"):`` it
    builds without memory (for counting parameters).
    """
    return ECLIP(preset_config(name, **overrides))


def count_parameters(model: ECLIP) -> int:
    """Parameters of the model without the momentum copy (what the paper counts)."""
    return sum(p.numel() for p in model.trainable_parameters())


def tokenizer_for(model_or_config, vocab_file: str | None = None) -> TextTokenizer:
    """The WordPiece tokenizer of a model: ``vocab_file`` (a BERT vocab.txt or folder), or the vocabulary
    the preset ships (eclip-tiny and eclip-small)."""
    cfg = model_or_config.config if isinstance(model_or_config, ECLIP) else model_or_config
    path = vocab_file or cfg.vocab_file
    if path is None:
        raise ValueError("this preset ships no vocabulary: pass vocab_file= (a local BERT vocab.txt or folder)")
    tokenizer = TextTokenizer(path, cfg.max_text_len)
    if tokenizer.vocab_size != cfg.vocab_size:
        raise ValueError(f"{path} has {tokenizer.vocab_size} tokens, the model's vocab_size is {cfg.vocab_size}")
    return tokenizer


def main() -> None:
    print("| preset | parameters (M, without the momentum copy) | paper (M) | difference |")
    print("|---|---:|---:|---:|")
    for name in PRESETS:
        with torch.device("meta"):
            model = create(name)
        count = count_parameters(model) / 1e6
        paper = PAPER_PARAMS_M.get(name)
        diff = f"{(count - paper) / paper * 100:+.1f}%" if paper else "-"
        print(f"| {name} | {count:.1f} | {paper or '-'} | {diff} |")


__all__ = ["BATCH_KEYS", "ECLIP", "ECLIPConfig", "InstanceDecoder", "PRESETS", "TextTokenizer", "count_parameters",
           "create", "preset_config", "tokenizer_for"]
