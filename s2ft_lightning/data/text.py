"""Plain-text language modelling data: local .txt / .jsonl files tokenized and packed into fixed blocks."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from s2ft_lightning.data.base import DataError, ListDataset, TokenizedDataModule, check_file, read_text, warn_skipped

Paths = list[str] | str | os.PathLike | Sequence[str | os.PathLike]


def _as_paths(files: Paths | None) -> list[Path]:
    if files is None:
        return []
    if isinstance(files, (str, os.PathLike)):
        return [Path(files)]
    return [Path(f) for f in files]


def read_documents(path: str | os.PathLike, text_field: str = "text") -> list[str]:
    """Documents of one file: a .txt file is one; a .jsonl file gives one per row's ``text_field``."""
    p = check_file(path, "text file")
    if p.suffix.lower() == ".jsonl":
        docs, rows = [], 0
        skipped: dict[str, list[int]] = {f"without a non-empty string {text_field!r}": []}
        for lineno, line in enumerate(read_text(p).splitlines(), start=1):
            if not line.strip():
                continue
            rows += 1
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{lineno}: not valid JSON ({e}); expected one JSON object per line") from e
            value = rec.get(text_field) if isinstance(rec, dict) else None
            if isinstance(value, str) and value.strip():
                docs.append(value)
            else:
                skipped[f"without a non-empty string {text_field!r}"].append(lineno)
        if not docs:
            raise DataError(f"{p}: no rows with a non-empty string field {text_field!r}")
        warn_skipped(p, skipped, rows)
        return docs
    if p.suffix.lower() not in (".txt", ".text", ".md"):
        raise DataError(f"{p}: unsupported extension {p.suffix!r}; use .txt or .jsonl (with a {text_field!r} field)")
    text = read_text(p)
    if not text.strip():
        raise DataError(f"{p}: file is empty (no text to train on)")
    return [text]


def pack_blocks(token_streams: Sequence[list[int]], block_size: int, *, sep_id: int | None) -> list[list[int]]:
    """Concatenate documents (each followed by ``sep_id``) and cut into full blocks of ``block_size`` tokens.

    The final partial block is dropped, so every block has the same length and no padding is needed.
    """
    flat: list[int] = []
    for ids in token_streams:
        flat.extend(ids)
        if sep_id is not None:
            flat.append(sep_id)
    n_blocks = len(flat) // block_size
    return [flat[i * block_size : (i + 1) * block_size] for i in range(n_blocks)]


class PlainTextDataModule(TokenizedDataModule):
    """Causal-LM training on local text: documents tokenized, joined with eos and packed into blocks.

    ``max_length`` is the block size (default: 1024 capped at the model's context). Files too small to fill a
    single block raise a :class:`DataError` that names them.

    Args:
        train_files: One or more .txt files (one document each) or .jsonl files (one document per row).
        val_files: Validation files in the same formats.
        test_files: Test files in the same formats.
        text_field: The field holding the text in .jsonl rows.
    """

    def __init__(
        self,
        tokenizer: Any,
        train_files: Paths,
        val_files: Paths | None = None,
        test_files: Paths | None = None,
        *,
        text_field: str = "text",
        batch_size: int = 8,
        max_length: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        pad_to_multiple_of: int | None = None,
        context_length: int | None = None,
    ) -> None:
        super().__init__(
            tokenizer,
            batch_size=batch_size,
            max_length=max_length,
            num_workers=num_workers,
            seed=seed,
            truncation=False,
            pad_to_multiple_of=pad_to_multiple_of,
            context_length=context_length,
        )
        self.train_files = _as_paths(train_files)
        if not self.train_files:
            raise ValueError("train_files is empty; pass at least one .txt or .jsonl file")
        self.val_files = _as_paths(val_files)
        self.test_files = _as_paths(test_files)
        self.text_field = text_field
        ctx = self.context_length
        self.block_size = max_length if max_length is not None else (min(1024, ctx) if ctx else 1024)

    def build(self, files: list[Path]) -> ListDataset:
        """Tokenize and pack the documents of ``files`` into a dataset of equal-length blocks."""
        streams = []
        for f in files:
            for doc in read_documents(f, self.text_field):
                streams.append(self.tokenizer(doc, add_special_tokens=False)["input_ids"])
        blocks = pack_blocks(streams, self.block_size, sep_id=self.tokenizer.eos_token_id)
        if not blocks:
            total = sum(len(s) + 1 for s in streams)
            names = ", ".join(str(f) for f in files)
            raise DataError(
                f"{names}: {total} tokens, not enough for one block of {self.block_size}; add text or lower max_length"
            )
        return ListDataset([{"input_ids": b, "labels": list(b)} for b in blocks])

    def setup(self, stage: str | None = None) -> None:
        """Tokenize and pack the configured files once (idempotent across stages)."""
        if stage in (None, "fit", "validate") and self.train_dataset is None:
            self.train_dataset = self.build(self.train_files)
            if self.val_files:
                self.val_dataset = self.build(self.val_files)
        if stage in (None, "test", "predict") and self.test_files and self.test_dataset is None:
            self.test_dataset = self.build(self.test_files)
