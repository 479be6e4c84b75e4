"""Datamodules for S²FT: instruction JSONL, plain text (packed), reasoning-gym tasks; shared collation."""

from s2ft_lightning.data.base import DataError, ListDataset, SequenceTooLongError, TokenizedDataModule
from s2ft_lightning.data.collate import IGNORE_INDEX, CausalLMCollator
from s2ft_lightning.data.instruction import InstructionDataModule, encode_instruction, read_instruction_rows
from s2ft_lightning.data.reasoning import (
    ReasoningGymDataModule,
    evaluate_accuracy,
    exact_match,
    format_prompt,
    generate_answers,
)
from s2ft_lightning.data.text import PlainTextDataModule, pack_blocks, read_documents

__all__ = [
    "IGNORE_INDEX",
    "CausalLMCollator",
    "DataError",
    "InstructionDataModule",
    "ListDataset",
    "PlainTextDataModule",
    "ReasoningGymDataModule",
    "SequenceTooLongError",
    "TokenizedDataModule",
    "encode_instruction",
    "evaluate_accuracy",
    "exact_match",
    "format_prompt",
    "generate_answers",
    "pack_blocks",
    "read_documents",
    "read_instruction_rows",
]
