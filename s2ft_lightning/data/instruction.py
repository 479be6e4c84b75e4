"""Instruction tuning data: alpaca-style JSONL (instruction/input/output) with loss on the response only."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

from s2ft_lightning.data.base import DataError, ListDataset, TokenizedDataModule, check_file, read_text, warn_skipped
from s2ft_lightning.data.collate import IGNORE_INDEX

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def read_instruction_rows(path: str | os.PathLike) -> list[dict[str, str]]:
    """Read alpaca rows from a .jsonl file (one object per line) or a .json list; keep usable rows only.

    A usable row has non-empty string ``instruction`` and ``output``; ``input`` is optional. Each row keeps
    its ``line`` (JSONL line / JSON list position, from 1) for error messages. Rows left out are counted in a
    warning; a file with no usable row (or not UTF-8) raises :class:`DataError` naming the file.
    """
    p = check_file(path, "instruction file")
    text = read_text(p)
    if text.lstrip().startswith("["):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}: not valid JSON ({e})") from e
        records = list(enumerate(raw, start=1))
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{lineno}: not valid JSON ({e}); expected one JSON object per line") from e
    rows = []
    skipped: dict[str, list[int]] = {"not JSON objects": [], "without non-empty string 'instruction'/'output'": []}
    for line, rec in records:
        if not isinstance(rec, dict):
            skipped["not JSON objects"].append(line)
            continue
        instruction, output = rec.get("instruction"), rec.get("output")
        inp = rec.get("input") or ""
        ok = isinstance(instruction, str) and instruction.strip() and isinstance(output, str) and output.strip()
        if not ok or not isinstance(inp, str):
            skipped["without non-empty string 'instruction'/'output'"].append(line)
            continue
        rows.append({"instruction": instruction, "input": inp, "output": output, "line": line})
    if rows:
        warn_skipped(p, skipped, len(records))
    if not rows:
        raise DataError(
            f"{p}: no usable rows ({len(records)} records read). Each row needs non-empty string fields "
            "'instruction' and 'output' (and optionally 'input')."
        )
    return rows


def user_message(row: dict[str, str]) -> str:
    """The user's turn for chat templates: instruction, then the input (if any) after a blank line."""
    return row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")


def build_prompt_and_response(
    tokenizer: Any, row: dict[str, str], *, use_chat_template: bool = True, system_prompt: str | None = None
) -> tuple[str, str, bool]:
    """Render (prompt text, response text, response_has_special_eos) for one row.

    With a chat template the response is what the template appends after the generation prompt (so it
    carries the template's end-of-turn token); otherwise the alpaca prompt and the raw output are used.
    """
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": user_message(row)})
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": row["output"]}], tokenize=False
        )
        if full.startswith(prompt) and row["output"] in full[len(prompt) :]:
            return prompt, full[len(prompt) :].rstrip(), True
        return prompt, row["output"], False
    template = ALPACA_PROMPT if row.get("input") else ALPACA_PROMPT_NO_INPUT
    prompt = template.format(instruction=row["instruction"], input=row.get("input", ""))
    if system_prompt:
        prompt = f"{system_prompt}\n\n{prompt}"
    return prompt, row["output"], False


def encode_instruction(
    tokenizer: Any, row: dict[str, str], *, use_chat_template: bool = True, system_prompt: str | None = None
) -> tuple[list[int], list[int]]:
    """Tokenize one row into (input_ids, labels) with labels = -100 on every prompt token.

    The response tokens (plus eos, appended when the response does not already end with it) are the
    only ones with a loss.
    """
    prompt, response, _ = build_prompt_and_response(
        tokenizer, row, use_chat_template=use_chat_template, system_prompt=system_prompt
    )
    # Chat templates write their own bos; the plain prompt gets the tokenizer's special tokens.
    add_special = not use_chat_template_active(tokenizer, use_chat_template)
    prompt_ids = tokenizer(prompt, add_special_tokens=add_special)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is not None and (not response_ids or response_ids[-1] != eos):
        response_ids = response_ids + [eos]
    return prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids


def use_chat_template_active(tokenizer: Any, use_chat_template: bool) -> bool:
    """True when rows will be rendered with the tokenizer's chat template."""
    return bool(use_chat_template and getattr(tokenizer, "chat_template", None))


class InstructionDataModule(TokenizedDataModule):
    """Alpaca-style instruction data from local JSONL files, chat-template aware, loss on responses only.

    ``val_file`` gives a validation split; without it ``val_fraction`` of the training rows (seeded) are held
    out. Every row must fit ``max_length``/the context or a :class:`SequenceTooLongError` names it, unless
    ``truncation=True`` (rows left with no response token are then dropped).

    Args:
        train_file: Training rows: a .jsonl file (one object per line) or a .json list, each with non-empty
            "instruction" and "output" and optionally "input".
        val_file: Validation rows in the same format.
        test_file: Test rows in the same format.
        val_fraction: Without val_file, hold out this fraction of the training rows (seeded) for validation.
        use_chat_template: Render rows with the tokenizer's chat template when it has one (else Alpaca prompts).
        system_prompt: A system turn for chat templates.
    """

    def __init__(
        self,
        tokenizer: Any,
        train_file: str | os.PathLike,
        val_file: str | os.PathLike | None = None,
        test_file: str | os.PathLike | None = None,
        *,
        val_fraction: float = 0.0,
        use_chat_template: bool = True,
        system_prompt: str | None = None,
        batch_size: int = 8,
        max_length: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        truncation: bool = False,
        pad_to_multiple_of: int | None = None,
        context_length: int | None = None,
    ) -> None:
        super().__init__(
            tokenizer,
            batch_size=batch_size,
            max_length=max_length,
            num_workers=num_workers,
            seed=seed,
            truncation=truncation,
            pad_to_multiple_of=pad_to_multiple_of,
            context_length=context_length,
        )
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.train_file = Path(train_file)
        self.val_file = Path(val_file) if val_file is not None else None
        self.test_file = Path(test_file) if test_file is not None else None
        self.val_fraction = val_fraction
        self.use_chat_template = use_chat_template
        self.system_prompt = system_prompt

    def encode_file(self, path: Path) -> ListDataset:
        """Read, tokenize and length-check every row of one file."""
        examples = []
        for row in read_instruction_rows(path):
            ids, labels = encode_instruction(
                self.tokenizer,
                row,
                use_chat_template=self.use_chat_template,
                system_prompt=self.system_prompt,
            )
            ids, labels = self.fit_length(ids, labels, f"{path} row {row['line']}")
            if all(x == IGNORE_INDEX for x in labels):
                continue  # truncation removed the whole response: nothing to learn from this row
            examples.append({"input_ids": ids, "labels": labels})
        if not examples:
            raise DataError(
                f"{path}: every row lost its whole response to truncation at {self.length_limit} tokens; "
                "raise max_length"
            )
        return ListDataset(examples)

    def setup(self, stage: str | None = None) -> None:
        """Tokenize the configured files once (idempotent across stages)."""
        if stage in (None, "fit", "validate") and self.train_dataset is None:
            train = self.encode_file(self.train_file)
            if self.val_file is not None:
                self.val_dataset = self.encode_file(self.val_file)
            elif self.val_fraction > 0:
                order = list(range(len(train)))
                random.Random(self.seed).shuffle(order)
                n_val = max(1, round(len(order) * self.val_fraction))
                if n_val >= len(order):
                    raise DataError(f"{self.train_file}: val_fraction={self.val_fraction} leaves no training rows")
                self.val_dataset = ListDataset([train.examples[i] for i in sorted(order[:n_val])])
                train = ListDataset([train.examples[i] for i in sorted(order[n_val:])])
            self.train_dataset = train
        if stage in (None, "test", "predict") and self.test_file is not None and self.test_dataset is None:
            self.test_dataset = self.encode_file(self.test_file)
