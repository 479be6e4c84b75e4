"""Batch collation for causal-LM examples: dynamic padding, attention mask, labels padded with -100."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100


@dataclass
class CausalLMCollator:
    """Pad ``{"input_ids", "labels"}`` examples to the longest in the batch (optionally to a multiple of N).

    Padding side is ``right`` for training and ``left`` for generation; labels use ``IGNORE_INDEX`` on padding
    so padded positions never contribute to the loss. Examples without ``labels`` get none in the batch.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    padding_side: str = "right"
    label_pad_id: int = IGNORE_INDEX

    def __post_init__(self) -> None:
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be a positive int or None, got {self.pad_to_multiple_of}")
        if self.pad_token_id is None:
            raise ValueError("pad_token_id is None; set tokenizer.pad_token (e.g. to eos) before collating")

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        lengths = [len(ex["input_ids"]) for ex in examples]
        width = max(lengths)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            width = (width + m - 1) // m * m
        has_labels = "labels" in examples[0]
        ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        labels = torch.full((len(examples), width), self.label_pad_id, dtype=torch.long) if has_labels else None
        for i, (ex, n) in enumerate(zip(examples, lengths)):
            sl = slice(width - n, width) if self.padding_side == "left" else slice(0, n)
            ids[i, sl] = torch.as_tensor(ex["input_ids"], dtype=torch.long)
            mask[i, sl] = 1
            if labels is not None:
                if len(ex["labels"]) != n:
                    raise ValueError(f"example {i}: labels length {len(ex['labels'])} != input_ids length {n}")
                labels[i, sl] = torch.as_tensor(ex["labels"], dtype=torch.long)
        batch = {"input_ids": ids, "attention_mask": mask}
        if labels is not None:
            batch["labels"] = labels
        return batch
