"""BERT WordPiece tokenization from a local vocabulary file (no download)."""

from __future__ import annotations

import os

import torch


class TextTokenizer:
    """Lower-casing BERT WordPiece tokenizer (Hugging Face ``tokenizers``), fixed length.

    Args:
        vocab_file: a BERT ``vocab.txt`` (or a folder holding one): the package's small vocabulary for
            eclip-tiny, or a real BERT vocabulary for the large presets.
        max_length: tokens per text, [CLS] and [SEP] included (55 in the paper); longer texts are truncated,
            shorter ones padded with [PAD].
    """

    def __init__(self, vocab_file: str, max_length: int = 55):
        from tokenizers import BertWordPieceTokenizer

        if os.path.isdir(vocab_file):
            vocab_file = os.path.join(vocab_file, "vocab.txt")
        if not os.path.isfile(vocab_file):
            raise FileNotFoundError(f"no BERT vocabulary at {vocab_file!r}")
        self.vocab_file = vocab_file
        self.max_length = max_length
        self._tokenizer = BertWordPieceTokenizer(vocab_file, lowercase=True)
        self._tokenizer.enable_truncation(max_length=max_length)
        self._tokenizer.enable_padding(length=max_length, pad_id=self.token_id("[PAD]"), pad_token="[PAD]")

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    def token_id(self, token: str) -> int:
        index = self._tokenizer.token_to_id(token)
        if index is None:
            raise KeyError(f"{token!r} is not in {self.vocab_file}")
        return index

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), each (len(texts), max_length) int64."""
        if isinstance(texts, str):
            raise TypeError("pass a list of texts, not a single string")
        encodings = self._tokenizer.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
        return ids, mask
