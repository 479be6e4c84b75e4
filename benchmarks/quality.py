"""Pieces of the S²FT vs LoRA vs full fine-tuning quality study (tools/quality_study.py, tools/quality_sweep.py).

One LightningModule with a ``method`` switch (so all arms share S2FTModule's data path, steps, optimizer and
schedule), LoRA rank matching, and the forgetting metrics: BIG-bench general_knowledge multiple-choice accuracy
by log-likelihood and perplexity on a held-out plain text.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata as md
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from benchmarks.lora_match import LORA_TARGETS, matched_lora_rank
from s2ft_lightning.demo import cache_root
from s2ft_lightning.module import S2FTModule, WarmupLinear
from s2ft_lightning.pipeline import S2Config

BIGBENCH_VERSION = "1.0.0"
GK_MEMBER = "bigbench/benchmark_tasks/general_knowledge/task.json"
# Forgetting probes of the sweep: BIG-bench multiple-choice tasks with short prompts on which SmolLM2-135M scores
# well above chance (its base accuracies are in benchmarks/results/quality/pareto.md).
FORGET_TASKS = ("general_knowledge", "similarities_abstraction", "phrase_relatedness", "movie_recommendation")
BIGBENCH_CACHE = cache_root() / "bigbench"
# Held-out plain text: the Apache-2.0 license text shipped in an installed package's metadata. Nothing in the
# study trains on it; its sha256 is recorded so runs on other machines can check they scored the same text.
PPL_TEXT_SOURCES = (("transformers", "LICENSE"), ("peft", "LICENSE"), ("reasoning_gym", "LICENSE"))
MC_PROMPT = "Q: {input}\nA:"

Method = Literal["s2ft", "lora", "full"]


# ---- trainable-count matching --------------------------------------------------------------------------------


def s2ft_trainable_count(model: nn.Module, s2: S2Config) -> int:
    """Weights S²FT would train on ``model`` with ``s2`` (plans the selection without touching the model)."""
    from surgery.planner import make_plan, slice_weight_count

    plan = make_plan(model, config=s2)
    return slice_weight_count(model, plan.slices)


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class QualityModule(S2FTModule):
    """`S2FTModule` with ``method``: "s2ft" (its own surgery), "lora" (PEFT) or "full" (every weight).

    ``lora_rank=0`` matches the trainable count of S²FT with ``s2`` on the same base (closest uniform rank).
    """

    def __init__(
        self,
        model: str,
        method: Method = "s2ft",
        *,
        lora_rank: int = 0,
        lora_alpha_ratio: float = 2.0,
        lora_targets: Sequence[str] = LORA_TARGETS,
        **kwargs: Any,
    ) -> None:
        if method not in ("s2ft", "lora", "full"):
            raise ValueError(f"method must be 's2ft', 'lora' or 'full', got {method!r}")
        super().__init__(model, **kwargs)
        self.method = method
        self.lora_rank = lora_rank
        self.lora_alpha_ratio = lora_alpha_ratio
        self.lora_targets = list(lora_targets)
        self.info: dict[str, Any] = {}

    def configure_model(self) -> None:
        if self.method == "s2ft":
            super().configure_model()
        elif self.model is None:
            from s2ft_lightning.models import load_model

            model, self.tokenizer = load_model(self.model_name, dtype=self.dtype_name)
            if self.method == "full":
                model.requires_grad_(True)
            else:
                from peft import LoraConfig, get_peft_model

                rank = self.lora_rank
                if rank <= 0:
                    target = s2ft_trainable_count(model, self.s2)
                    rank, _ = matched_lora_rank(model, target, self.lora_targets)
                    self.info["s2ft_count_matched"] = target
                cfg = LoraConfig(
                    r=rank,
                    lora_alpha=self.lora_alpha_ratio * rank,
                    lora_dropout=0.0,
                    target_modules=self.lora_targets,
                    bias="none",
                )
                model = get_peft_model(model, cfg)
                self.info["lora_rank"] = rank
            self.model = model
            self.model.train()
        self.info["trainable_params"] = trainable_count(self.model)
        self.info["total_params"] = sum(p.numel() for p in self.model.parameters())

    @classmethod
    def for_job(cls, spec: dict[str, Any]) -> QualityModule:
        """The module one study job trains: its arm's method, S²FT / LoRA settings, lr, schedule and dtype."""
        arm = spec["arm_config"]
        lora = arm.get("lora", {})
        return cls(
            spec["model"],
            arm["method"],
            s2=S2Config(**{**arm.get("s2", {}), "seed": spec["seed"]}),
            lora_rank=lora.get("rank", 0),
            lora_alpha_ratio=lora.get("alpha_ratio", 2.0),
            lora_targets=lora.get("targets", LORA_TARGETS),
            optimizer=functools.partial(torch.optim.AdamW, lr=spec["lr"], weight_decay=spec["weight_decay"]),
            scheduler=functools.partial(WarmupLinear, warmup_steps=round(spec["warmup_ratio"] * spec["steps"])),
            dtype=spec["dtype"],
        )


# ---- BIG-bench general_knowledge ------------------------------------------------------------------------------


def fetch_bigbench_sdist(dest: Path = BIGBENCH_CACHE) -> Path:
    """Fetch the bigbench 1.0.0 sdist (358 MB; nothing installed) with ``pip download --no-deps`` into ``dest``.

    pip 23+ fails on this sdist while preparing its metadata (a direct-URL dependency), after it has downloaded
    it; ``--no-clean`` in a private TMPDIR keeps what it fetched. Returns the sdist (cached after the first call).
    """
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(dest.glob(f"bigbench-{BIGBENCH_VERSION}.tar.gz"))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-clean", "-d", str(dest)]
    cmd.append(f"bigbench=={BIGBENCH_VERSION}")
    with tempfile.TemporaryDirectory(prefix="bigbench-") as tmp:
        proc = subprocess.run(cmd, env={**os.environ, "TMPDIR": tmp}, capture_output=True, text=True)
        found = sorted(dest.glob(f"bigbench-{BIGBENCH_VERSION}.tar.gz"))
        if found:
            return found[0]
        sdists = sorted(Path(tmp).rglob(f"bigbench-{BIGBENCH_VERSION}.tar.gz"))
        if sdists:
            return Path(shutil.copyfile(sdists[0], dest / sdists[0].name))
    raise FileNotFoundError(
        f"`{' '.join(cmd)}` exited with {proc.returncode} and left no bigbench-{BIGBENCH_VERSION}.tar.gz; download it "
        f"by hand and pass --bigbench <path>. pip said: {proc.stderr.strip()[-300:]}"
    )


def task_member(task: str) -> str:
    """Path of a BIG-bench task's JSON inside the sdist."""
    return f"bigbench/benchmark_tasks/{task}/task.json"


def extract_task(sdist: Path, task: str, dest: Path | None = None) -> Path:
    """Extract one task's task.json from a bigbench sdist once (cached as ``dest/<task>_task.json``)."""
    dest = BIGBENCH_CACHE if dest is None else dest
    out = dest / f"{task}_task.json"
    if out.is_file():
        return out
    member = task_member(task)
    with tarfile.open(sdist, "r:*") as tar:
        for m in tar:
            if m.isfile() and m.name.endswith(member):
                data = tar.extractfile(m).read()
                break
        else:
            raise FileNotFoundError(f"{sdist} has no member ending in {member}; is it the bigbench sdist?")
    dest.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    return out


def extract_general_knowledge(sdist: Path, dest: Path = BIGBENCH_CACHE) -> Path:
    """Extract general_knowledge/task.json from a bigbench sdist once (cached next to ``dest``)."""
    return extract_task(sdist, "general_knowledge", dest)


def read_mc_items(path: Path) -> tuple[list[dict], str]:
    """Multiple-choice items (input, choices, scores) of a BIG-bench task.json, and the file's sha256."""
    raw = path.read_bytes()
    task = json.loads(raw)
    items = [
        {"input": e["input"], "choices": list(e["target_scores"]), "scores": list(e["target_scores"].values())}
        for e in task.get("examples", [])
        if e.get("target_scores")
    ]
    if not items:
        raise ValueError(f"{path} has no multiple-choice examples (examples[].target_scores); wrong file?")
    return items, hashlib.sha256(raw).hexdigest()


def load_general_knowledge(source: str | Path | None, cache: Path = BIGBENCH_CACHE) -> tuple[list[dict], dict]:
    """(items, info) for general_knowledge from a task.json, a bigbench sdist, or the cache.

    When nothing is found, items is empty and ``info["skip_reason"]`` says why and how to provide it: the
    study records that in its results instead of silently dropping the metric.
    """
    path = Path(source).expanduser() if source else cache / "general_knowledge_task.json"
    if not path.is_file():
        reason = (
            f"BIG-bench general_knowledge not available ({path} does not exist); pass --bigbench "
            f"<bigbench-{BIGBENCH_VERSION}.tar.gz or task.json> or --fetch-bigbench (downloads 358 MB)"
        )
        return [], {"path": str(path), "skip_reason": reason, "n": 0}
    if path.name.endswith((".tar.gz", ".tgz", ".tar")):
        path = extract_general_knowledge(path, cache)
    items, sha = read_mc_items(path)
    return items, {"path": str(path), "sha256": sha, "n": len(items), "skip_reason": None}


@torch.no_grad()
def choice_logprobs(model: Any, tokenizer: Any, prompt: str, choices: Sequence[str]) -> list[float]:
    """Sum of log p(choice tokens | prompt) for each choice (one right-padded batch)."""
    p_ids = tokenizer(prompt)["input_ids"]
    rows = [p_ids + tokenizer(" " + c, add_special_tokens=False)["input_ids"] for c in choices]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id or 0
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    device = next(model.parameters()).device
    logp = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().log_softmax(-1).cpu()
    out = []
    for i, r in enumerate(rows):
        pos = torch.arange(len(p_ids), len(r))
        out.append(float(logp[i, pos - 1, ids[i, pos]].sum()))
    return out


@torch.no_grad()
def multiple_choice_accuracy(model: Any, tokenizer: Any, items: Sequence[dict], batch_rows: int = 48) -> float:
    """Fraction of items whose highest-likelihood choice has the top target score (evaluation only).

    The (item, choice) rows of several items share one right-padded forward (up to ``batch_rows`` rows): with
    right padding and a causal mask every row scores exactly as alone (tested).
    """
    rows = []
    for item in items:
        p_ids = tokenizer(MC_PROMPT.format(input=item["input"]))["input_ids"]
        for c in item["choices"]:
            rows.append((p_ids, p_ids + tokenizer(" " + c, add_special_tokens=False)["input_ids"]))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id or 0
    scores: list[float] = []
    try:
        for start in range(0, len(rows), batch_rows):
            chunk = rows[start : start + batch_rows]
            width = max(len(r) for _, r in chunk)
            ids = torch.tensor([r + [pad] * (width - len(r)) for _, r in chunk])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for _, r in chunk])
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            logp = logits.log_softmax(-1).cpu()
            for j, (p, r) in enumerate(chunk):
                pos = torch.arange(len(p), len(r))
                scores.append(float(logp[j, pos - 1, ids[j, pos]].sum()))
    finally:
        model.train(was_training)
    correct, k = 0, 0
    for item in items:
        n = len(item["choices"])
        lp = scores[k : k + n]
        k += n
        best = max(range(n), key=lp.__getitem__)
        correct += item["scores"][best] == max(item["scores"])
    return correct / len(items)


# ---- held-out plain-text perplexity ---------------------------------------------------------------------------


def heldout_text(sources: Sequence[tuple[str, str]] = PPL_TEXT_SOURCES) -> tuple[str, dict]:
    """The first license file found among ``sources`` (package, file name) and its provenance."""
    for package, name in sources:
        try:
            dist = md.distribution(package)
        except md.PackageNotFoundError:
            continue
        for f in dist.files or []:
            if f.name == name:
                text = Path(dist.locate_file(f)).read_text(encoding="utf-8")
                sha = hashlib.sha256(text.encode()).hexdigest()
                return text, {"source": f"{package} {dist.version}: {f}", "sha256": sha, "chars": len(text)}
    raise FileNotFoundError(f"none of {list(sources)} ships a license file; pass another held-out text source")


@torch.no_grad()
def window_nll(model: Any, tokenizer: Any, text: str, *, window: int = 256, max_tokens: int = 4096) -> list[list]:
    """Next-token NLL over the text's first ``max_tokens`` tokens in independent windows: ``[nll sum, tokens]`` each.

    Perplexity is exp(sum of NLL / sum of tokens); per-window values allow a paired bootstrap between runs.
    """
    prefix = 6 * (max_tokens + 1)  # about 1.5x the characters max_tokens cover in English: no need to tokenize all
    ids = tokenizer(text[:prefix], add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens + 16 and len(text) > prefix:  # the cut can only change the last few tokens
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError("held-out text has fewer than 2 tokens")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    try:
        for start in range(0, len(ids) - 1, window):
            chunk = torch.tensor([ids[start : start + window + 1]], device=device)
            if chunk.shape[1] < 2:
                break
            logits = model(input_ids=chunk[:, :-1]).logits.float()
            nll = nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum")
            out.append([float(nll), chunk.shape[1] - 1])
    finally:
        model.train(was_training)
    return out


def perplexity_of(windows: Sequence[Sequence[float]]) -> float:
    """exp(sum of NLL / sum of tokens) over `window_nll`'s windows."""
    return math.exp(sum(w[0] for w in windows) / sum(w[1] for w in windows))


def perplexity(model: Any, tokenizer: Any, text: str, *, window: int = 256, max_tokens: int = 4096) -> float:
    """exp(mean next-token NLL) over the text's first ``max_tokens`` tokens, in independent windows."""
    return perplexity_of(window_nll(model, tokenizer, text, window=window, max_tokens=max_tokens))


@torch.no_grad()
def answer_loss(model: Any, loader: Any) -> float:
    """Mean answer-token loss over a loader of labelled batches (the lr-selection tie-breaker)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, n = 0.0, 0
    try:
        for batch in loader:
            tokens = int((batch["labels"][:, 1:] != -100).sum())
            out = model(**{k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")})
            total += float(out.loss) * tokens
            n += tokens
    finally:
        model.train(was_training)
    return total / max(n, 1)


# ---- statistics -------------------------------------------------------------------------------------------------


def mean_std(values: Sequence[float | None]) -> dict[str, float | int | None]:
    """Mean and sample standard deviation (n−1) of the non-missing values; std is None for fewer than 2."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else None, "n": len(xs)}
