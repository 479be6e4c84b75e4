"""reasoning-gym tasks as a datamodule (seeded train split, de-duplicated held-out splits) and an evaluator.

reasoning-gym generates item ``i`` of seed ``s`` from ``Random(s + i)``, so nearby seeds overlap; the
held-out stream therefore uses a distant seed and drops every question that also occurs in training.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from s2ft_lightning.data.base import DataError, ListDataset, TokenizedDataModule
from s2ft_lightning.data.collate import IGNORE_INDEX, CausalLMCollator

DEFAULT_PROMPT = "Q: {question}\nA:"
DEFAULT_ANSWER = " {answer}"
HELDOUT_SEED_OFFSET = 1_000_003
Scorer = Callable[[str | None, dict[str, Any]], float]


def make_task(name: str, *, seed: int, size: int, task_kwargs: dict[str, Any] | None = None) -> Any:
    """Create a reasoning-gym dataset with a clear error for unknown task names or bad options."""
    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    kwargs = dict(task_kwargs or {})
    for reserved in ("seed", "size"):
        if reserved in kwargs:
            raise ValueError(f"task_kwargs must not contain {reserved!r}; it is set by the datamodule")
    if name not in DATASETS:
        close = sorted(n for n in DATASETS if name.split("_")[0] in n)[:10]
        raise ValueError(f"unknown reasoning-gym task {name!r}; similar names: {close or sorted(DATASETS)[:10]}")
    try:
        return reasoning_gym.create_dataset(name, seed=seed, size=size, **kwargs)
    except (TypeError, AssertionError) as e:
        raise ValueError(f"invalid task_kwargs for reasoning-gym task {name!r}: {e}") from e


def format_prompt(template: str, entry: dict[str, Any]) -> str:
    """Render a prompt from ``{question}`` and ``{metadata[...]}`` (e.g. ``{metadata[expression]}``)."""
    try:
        return template.format(question=entry["question"], metadata=entry.get("metadata", {}))
    except (KeyError, IndexError) as e:
        raise ValueError(f"prompt template {template!r} refers to a missing field: {e}") from e


def exact_match(answer: str | None, entry: dict[str, Any]) -> float:
    """1.0 when the stripped prediction equals the stripped reference answer, else 0.0."""
    return float(answer is not None and answer.strip() == str(entry["answer"]).strip())


def extract_answer(text: str, stop: str | None = "\n") -> str:
    """Cut generated text at the first ``stop`` string and strip surrounding whitespace."""
    if stop:
        text = text.split(stop, 1)[0]
    return text.strip()


def _device_of(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


@torch.no_grad()
def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 16,
    batch_size: int = 16,
    stop: str | None = "\n",
) -> list[str]:
    """Greedy-generate a continuation per prompt (left-padded batches) and return the extracted answers."""
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad token; set tokenizer.pad_token (e.g. to eos) before generating")
    collate = CausalLMCollator(pad_token_id=tokenizer.pad_token_id, padding_side="left")
    device = _device_of(model)
    was_training = bool(getattr(model, "training", False))
    if hasattr(model, "eval"):
        model.eval()
    answers: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            batch = collate([{"input_ids": tokenizer(p)["input_ids"]} for p in chunk])
            ids = batch["input_ids"].to(device)
            out = model.generate(
                input_ids=ids,
                attention_mask=batch["attention_mask"].to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            texts = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
            answers.extend(extract_answer(t, stop) for t in texts)
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    return answers


def evaluate_accuracy(
    model: Any,
    tokenizer: Any,
    dataset_or_items: Any,
    *,
    max_new_tokens: int = 16,
    batch_size: int = 16,
    prompt_template: str = DEFAULT_PROMPT,
    scorer: Scorer | None = None,
    stop: str | None = "\n",
) -> float:
    """Fraction of items whose greedy answer gets full credit (score >= 1) from the task's scorer.

    ``dataset_or_items``: a reasoning-gym dataset (its ``score_answer`` is used), a
    :class:`ReasoningGymDataModule` (its test split, prompt format and scorer), or a list of
    ``{"question", "answer"}`` dicts (``scorer`` or exact match).
    """
    if isinstance(dataset_or_items, ReasoningGymDataModule):
        dm = dataset_or_items
        dm.setup("test")
        items: list[dict[str, Any]] = dm.test_entries or dm.val_entries
        prompt_template, scorer = dm.prompt_template, scorer or dm.score_answer
    else:
        if scorer is None and callable(getattr(dataset_or_items, "score_answer", None)):
            scorer = dataset_or_items.score_answer
        items = list(dataset_or_items) if isinstance(dataset_or_items, Iterable) else []
    if not items:
        raise DataError("evaluate_accuracy got no items to evaluate")
    scorer = scorer or exact_match
    prompts = [format_prompt(prompt_template, e) for e in items]
    answers = generate_answers(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, stop=stop
    )
    return sum(1.0 for a, e in zip(answers, items) if scorer(a, e) >= 1.0) / len(items)


class ReasoningGymDataModule(TokenizedDataModule):
    """A reasoning-gym task as training data (loss on the answer only) plus held-out val/test splits.

    The train split is items ``0..train_size-1`` of ``seed``; val and test come from ``heldout_seed``
    (default ``seed + 1_000_003``), skipping any question already in train or an earlier held-out item,
    so no question is in two splits. Prompts use ``prompt_template`` and the target ``answer_template``.

    Args:
        task: A reasoning-gym task name, e.g. basic_arithmetic, chain_sum, gsm_symbolic.
        task_kwargs: Options of the task's generator (e.g. min_digits, max_digits, operators).
        train_size: Training questions (generated with seed).
        val_size: Held-out validation questions.
        test_size: Held-out test questions.
        heldout_seed: Seed of the held-out splits (default: seed + 1000003).
        prompt_template: Prompt format; {question} and {metadata[...]} fields are filled in.
        answer_template: Target format after the prompt; {answer} is filled in. The loss covers it only.
        append_eos: End every target with the tokenizer's eos token (so generation learns to stop).
    """

    def __init__(
        self,
        tokenizer: Any,
        task: str = "basic_arithmetic",
        task_kwargs: dict[str, Any] | None = None,
        *,
        train_size: int = 1000,
        val_size: int = 100,
        test_size: int = 0,
        heldout_seed: int | None = None,
        prompt_template: str = DEFAULT_PROMPT,
        answer_template: str = DEFAULT_ANSWER,
        append_eos: bool = True,
        batch_size: int = 16,
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
        if train_size < 1 or val_size < 0 or test_size < 0:
            raise ValueError(f"need train_size >= 1 and val/test sizes >= 0, got {train_size}/{val_size}/{test_size}")
        if "{question}" not in prompt_template and "{metadata[" not in prompt_template:
            raise ValueError(f"prompt_template {prompt_template!r} must contain {{question}} or {{metadata[...]}}")
        if "{answer}" not in answer_template:
            raise ValueError(f"answer_template {answer_template!r} must contain {{answer}}")
        self.task = task
        self.task_kwargs = dict(task_kwargs or {})
        self.train_size, self.val_size, self.test_size = train_size, val_size, test_size
        self.heldout_seed = seed + HELDOUT_SEED_OFFSET if heldout_seed is None else heldout_seed
        if self.heldout_seed == seed:
            raise ValueError("heldout_seed must differ from seed")
        self.prompt_template = prompt_template
        self.answer_template = answer_template
        self.append_eos = append_eos
        self.gym: Any = make_task(task, seed=seed, size=train_size, task_kwargs=self.task_kwargs)
        self.train_entries: list[dict[str, Any]] = []
        self.val_entries: list[dict[str, Any]] = []
        self.test_entries: list[dict[str, Any]] = []

    def score_answer(self, answer: str | None, entry: dict[str, Any]) -> float:
        """The task's built-in scorer (1.0 = fully correct)."""
        return float(self.gym.score_answer(answer, entry))

    def generate_splits(self) -> None:
        """Generate the train entries and the de-duplicated held-out val/test entries (deterministic)."""
        self.train_entries = [self.gym[i] for i in range(self.train_size)]
        need = self.val_size + self.test_size
        seen = {e["question"] for e in self.train_entries}
        cap = max(20 * need, 1000)
        heldout_gym = make_task(self.task, seed=self.heldout_seed, size=cap, task_kwargs=self.task_kwargs)
        heldout: list[dict[str, Any]] = []
        idx = 0
        while len(heldout) < need and idx < cap:
            entry = heldout_gym[idx]
            idx += 1
            if entry["question"] not in seen:
                seen.add(entry["question"])
                heldout.append(entry)
        if len(heldout) < need:
            raise DataError(
                f"reasoning-gym task {self.task!r}: only {len(heldout)} of {need} held-out questions are new "
                f"after {cap} draws (the task's question space is too small); lower "
                "train_size/val_size/test_size or widen task_kwargs"
            )
        self.val_entries = heldout[: self.val_size]
        self.test_entries = heldout[self.val_size :]

    def encode_entry(self, entry: dict[str, Any], where: str) -> dict[str, list[int]]:
        """Tokenize one entry: prompt tokens get label -100, answer tokens (+ eos) carry the loss."""
        tok = self.tokenizer
        prompt_ids = tok(format_prompt(self.prompt_template, entry))["input_ids"]
        answer_ids = tok(self.answer_template.format(answer=entry["answer"]), add_special_tokens=False)["input_ids"]
        if self.append_eos and tok.eos_token_id is not None:
            answer_ids = answer_ids + [tok.eos_token_id]
        ids, labels = self.fit_length(prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids, where)
        if all(x == IGNORE_INDEX for x in labels):
            raise DataError(f"{where}: truncation at {self.length_limit} tokens removed the whole answer")
        return {"input_ids": ids, "labels": labels}

    def _encode(self, entries: list[dict[str, Any]], split: str) -> ListDataset | None:
        if not entries:
            return None
        return ListDataset([self.encode_entry(e, f"{self.task} {split} item {i}") for i, e in enumerate(entries)])

    def setup(self, stage: str | None = None) -> None:
        """Generate and tokenize all splits once (idempotent)."""
        if self.train_dataset is not None:
            return
        self.generate_splits()
        self.train_dataset = self._encode(self.train_entries, "train")
        self.val_dataset = self._encode(self.val_entries, "val")
        self.test_dataset = self._encode(self.test_entries, "test")

    def evaluate(self, model: Any, split: str = "val", *, max_new_tokens: int = 16, batch_size: int = 16) -> float:
        """Held-out accuracy of ``model`` on ``split`` ('val' or 'test') with the task's scorer."""
        if split not in ("val", "test", "train"):
            raise ValueError(f"split must be 'val', 'test' or 'train', got {split!r}")
        self.setup()
        items = getattr(self, f"{split}_entries")
        if not items:
            raise DataError(f"the {split} split is empty; set {split}_size > 0")
        return evaluate_accuracy(
            model,
            self.tokenizer,
            items,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            prompt_template=self.prompt_template,
            scorer=self.score_answer,
        )
