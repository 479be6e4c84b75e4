"""Shared pieces of the S²FT datamodules: tokenizer resolution, context-length checks, loaders."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence, Sized
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from s2ft_lightning.data.collate import CausalLMCollator
from s2ft_lightning.models import context_length_from_path, load_tokenizer, prepare_tokenizer

# Tokenizers without a real limit report ~1e30 as model_max_length.
_NO_LIMIT = 10_000_000


class DataError(ValueError):
    """Unusable data (missing/empty file, bad row, too long); the message says what and how to fix."""


class SequenceTooLongError(DataError):
    """A tokenized row is longer than the allowed length and truncation was not requested."""


class ListDataset(Dataset):
    """A map-style dataset over a list of already-tokenized examples."""

    def __init__(self, examples: Sequence[dict[str, Any]]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        return self.examples[idx]


def read_text(path: Path) -> str:
    """The file's text as UTF-8, or a DataError naming the file and where the first bad byte is."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}: not UTF-8 text (byte {e.start}, line {line}: {data[e.start : e.start + 4]!r}); re-save the "
            "file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
        ) from e


def warn_skipped(path: Path, skipped: dict[str, list[int]], total: int) -> None:
    """Warn once per file about rows that were left out, with counts per reason and the first line of each."""
    n = sum(len(v) for v in skipped.values())
    if not n:
        return
    parts = [f"{len(lines)} {why} (first at line {lines[0]})" for why, lines in skipped.items() if lines]
    warnings.warn(f"{path}: skipped {n} of {total} rows: " + "; ".join(parts), UserWarning, stacklevel=3)


def check_file(path: str | os.PathLike, what: str = "data file") -> Path:
    """Return ``path`` as a Path, raising FileNotFoundError that names it when it is missing."""
    p = Path(path).expanduser()
    if not p.is_file():
        where = "a directory, not a file" if p.is_dir() else "missing"
        raise FileNotFoundError(f"{what} {str(p)!r} is {where}; pass the path of a local file")
    return p


class EpochSeededSampler(Sampler[int]):
    """Shuffles with a generator seeded by ``seed + epoch``, so a run resumed at epoch N sees the same
    order as an uninterrupted one (Lightning calls ``set_epoch``; DDP swaps in its DistributedSampler).
    ``skip`` leaves out the first indices of the next pass only (a run resumed mid-epoch)."""

    def __init__(self, data: Sized, seed: int = 0) -> None:
        self.data = data
        self.seed = seed
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        skip, self.skip = self.skip, 0
        return iter(torch.randperm(len(self.data), generator=g).tolist()[skip:])


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position in the epoch is saved in Lightning checkpoints (``state_dict``), so a run
    resumed mid-epoch (after Ctrl-C, or from a periodic checkpoint) goes on with the next batch of the same
    order instead of restarting the epoch. Lightning saves checkpoints between batches and, with a known
    length, fetches no batch ahead: the batches handed out so far are the ones trained on."""

    _handed_out = 0
    _resume: tuple[int, int] | None = None  # (epoch, batches) to skip in the next pass of that epoch

    def __iter__(self) -> Iterator[Any]:
        sampler, skip = self.sampler, 0
        if self._resume is not None and isinstance(sampler, EpochSeededSampler) and sampler.epoch == self._resume[0]:
            skip = self._resume[1]
            sampler.skip = skip * (self.batch_size or 1)
        self._resume, self._handed_out = None, skip
        for batch in super().__iter__():
            self._handed_out += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(getattr(self.sampler, "epoch", 0)), "batches": self._handed_out}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if not isinstance(self.sampler, EpochSeededSampler):
            warnings.warn(
                f"the data order under {type(self.sampler).__name__} cannot be resumed mid-epoch: this epoch "
                "restarts from its first batch",
                UserWarning,
                stacklevel=2,
            )
            return
        self._resume = (int(state["epoch"]), int(state["batches"]))


class TokenizedDataModule(L.LightningDataModule):
    """Base for datamodules that tokenize local data once in ``setup`` and pad batches dynamically.

    ``max_length`` caps every row; it may not exceed the model's context (``context_length``, read from the
    tokenizer folder's config.json when the tokenizer is given as a path). Longer rows raise
    :class:`SequenceTooLongError` unless ``truncation=True``.

    Args:
        tokenizer: A tokenizer, or the model path it is loaded from (the s2ft CLI links it to --model.model).
        batch_size: Rows per batch (per device).
        max_length: Longest row in tokens (default: the model's context length).
        num_workers: DataLoader worker processes.
        seed: Seed of the data order (each epoch reshuffles with seed + epoch) and of any split.
        truncation: Cut rows longer than max_length instead of refusing them.
        pad_to_multiple_of: Pad batch lengths up to a multiple of this (tensor-core friendly on GPUs).
        context_length: The model's context length, when it cannot be read from the tokenizer's folder.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        batch_size: int = 8,
        max_length: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        truncation: bool = False,
        pad_to_multiple_of: int | None = None,
        context_length: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise DataError(f"batch_size={batch_size}: a batch needs at least 1 row; pass batch_size >= 1")
        if max_length is not None and max_length < 2:
            raise DataError(f"max_length={max_length}: rows need at least 2 tokens; pass max_length >= 2")
        self.tokenizer_source = tokenizer if isinstance(tokenizer, (str, os.PathLike)) else None
        if self.tokenizer_source is not None:
            self.tokenizer = load_tokenizer(tokenizer)
            context_length = context_length or context_length_from_path(tokenizer)
        else:
            self.tokenizer = prepare_tokenizer(tokenizer)
        if context_length is None:
            mml = getattr(self.tokenizer, "model_max_length", None)
            context_length = mml if isinstance(mml, int) and 0 < mml < _NO_LIMIT else None
        if max_length is not None and context_length is not None and max_length > context_length:
            raise DataError(
                f"max_length={max_length} exceeds the model's context length of {context_length} tokens "
                f"(max_position_embeddings); set max_length to {context_length} or less (on the s2ft command line: "
                f"--data.max_length {context_length})"
            )
        self.context_length = context_length
        self.max_length = max_length
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.truncation = truncation
        self.pad_to_multiple_of = pad_to_multiple_of
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None

    @property
    def length_limit(self) -> int | None:
        """The effective per-row token limit: ``max_length``, else the model context, else none."""
        return self.max_length if self.max_length is not None else self.context_length

    def fit_length(self, input_ids: list[int], labels: list[int], where: str) -> tuple[list[int], list[int]]:
        """Enforce the length limit on one row: error naming ``where`` or cut (when ``truncation``)."""
        limit = self.length_limit
        if limit is None or len(input_ids) <= limit:
            return input_ids, labels
        if not self.truncation:
            if self.max_length is None:
                kind, fix = "the model's context length", "Shorten the row"
            else:
                ctx = f" (up to the context length {self.context_length})" if self.context_length else ""
                kind, fix = "max_length", f"Shorten the row, raise max_length{ctx}"
            raise SequenceTooLongError(
                f"{where}: {len(input_ids)} tokens exceed {kind} ({limit}). {fix}, or pass truncation=True "
                "to cut long rows."
            )
        return input_ids[:limit], labels[:limit]

    def collator(self, padding_side: str = "right") -> CausalLMCollator:
        """The batch collator for this tokenizer (right padding for training, left for generation)."""
        return CausalLMCollator(
            pad_token_id=self.tokenizer.pad_token_id,
            pad_to_multiple_of=self.pad_to_multiple_of,
            padding_side=padding_side,
        )

    def _loader(self, dataset: Dataset | None, name: str, shuffle: bool) -> DataLoader | list:
        if dataset is None:
            self.setup("fit" if name in ("train", "val") else "test")
            dataset = getattr(self, f"{name}_dataset")
        if dataset is None:
            if name == "val":
                return []  # Lightning skips validation for an empty loader list
            raise DataError(f"{type(self).__name__} has no {name} split configured")
        return (ResumableDataLoader if shuffle else DataLoader)(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochSeededSampler(dataset, self.seed) if shuffle else None,
            num_workers=self.num_workers,
            collate_fn=self.collator(),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, "train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_dataset, "val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, "test", shuffle=False)
