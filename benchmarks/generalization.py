"""Pieces of the generalization study (tools/generalization_study.py): evaluation sets scored per question,
BIG-bench multiple-choice forgetting scored by lm-evaluation-harness, and perplexity on several held-out texts.

Every score is kept per question (id, prediction, correct) so arms can be compared paired
(benchmarks/paired_stats.py). Evaluation sets are deterministic functions of their settings: the in-domain
splits come from the training datamodule (held-out seed, de-duplicated against training), each out-of-domain set
from its own reasoning-gym seed, far from the training and held-out seeds, with any question that also occurs in
training dropped.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from s2ft_lightning.data.reasoning import generate_answers, make_task

WORDS = {
    "+": ["What is {a} plus {b}?", "Add {a} and {b}.", "What is the sum of {a} and {b}?", "How much is {a} plus {b}?"],
    "-": [
        "What is {a} minus {b}?",
        "Subtract {b} from {a}.",
        "What is {a} take away {b}?",
        "How much is {a} minus {b}?",
    ],
}
# lm-eval prompt of the forgetting probes: deliberately not the training format ("Q: ...\nA:").
MC_PROMPT = "Question: {{question}}\nAnswer:"


# ---- generated evaluation sets ---------------------------------------------------------------------------------


def in_words(entry: dict[str, Any], seed: int) -> str:
    """A two-term add/subtract expression phrased in English (one of four phrasings, drawn with ``seed``)."""
    parts = entry["metadata"]["expression"].split()
    if len(parts) != 3 or parts[1] not in WORDS:
        raise ValueError(f"the words phrasing needs 'a + b' or 'a - b' expressions, got {parts!r}")
    a, op, b = parts
    return random.Random(seed).choice(WORDS[op]).format(a=a, b=b)


def render(template: str, entry: dict[str, Any], seed: int = 0) -> str:
    """Fill ``{question}``, ``{metadata[...]}`` and ``{words}`` (the expression in English) into a prompt."""
    words = in_words(entry, seed) if "{words}" in template else ""
    return template.format(question=entry["question"], metadata=entry.get("metadata", {}), words=words)


def _longest_operand(entry: dict[str, Any]) -> int:
    return max(len(t.lstrip("-")) for t in entry["metadata"]["expression"].split() if t.lstrip("-").isdigit())


def build_set(name: str, spec: Mapping[str, Any], exclude: set[str]) -> tuple[Any, list[dict]]:
    """(reasoning-gym dataset, items) of one out-of-domain set: ``spec["size"]`` new questions of its task.

    ``spec``: task, task_kwargs, prompt (a template; ``{words}`` phrases the expression in English), size, seed,
    and optionally longest_operand_digits (keep only items whose longest operand has that many digits). Questions
    in ``exclude`` (the training questions and expressions) are dropped. Items: id, prompt, entry.
    """
    size, seed = int(spec["size"]), int(spec["seed"])
    cap = 50 * size
    gym = make_task(spec["task"], seed=seed, size=cap, task_kwargs=spec.get("task_kwargs"))
    want_digits = spec.get("longest_operand_digits")
    items, seen = [], set(exclude)
    for i in range(cap):
        e = gym[i]
        key = e.get("metadata", {}).get("expression", e["question"])
        if key in seen or e["question"] in seen or (want_digits and _longest_operand(e) != want_digits):
            continue
        seen.add(key)
        items.append({"id": f"{name}/{len(items)}", "prompt": render(spec["prompt"], e, seed + i), "entry": e})
        if len(items) == size:
            return gym, items
    raise ValueError(f"out-of-domain set {name!r}: only {len(items)} of {size} usable questions in {cap} draws")


def score_items(
    model: Any, tokenizer: Any, gym: Any, items: Sequence[dict], *, max_new_tokens: int, batch_size: int
) -> list[list]:
    """Greedy answers scored by the task's own scorer: ``[id, prediction, correct (0/1)]`` per item."""
    answers = generate_answers(
        model, tokenizer, [it["prompt"] for it in items], max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    return [[it["id"], a, int(gym.score_answer(a, it["entry"]) >= 1.0)] for it, a in zip(items, answers)]


def items_digest(items: Sequence[dict]) -> str:
    """sha256 of a set's prompts and reference answers: runs scored the same questions iff their digests match."""
    rows = [[it["id"], it["prompt"], str(it["entry"]["answer"])] for it in items]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


# ---- forgetting: BIG-bench multiple choice through lm-evaluation-harness ------------------------------------------


def mc_rows(items: Sequence[dict], limit: int | None = None) -> list[dict]:
    """BIG-bench MC items (benchmarks.quality.read_mc_items) as lm-eval rows: id, question, choices, gold."""
    rows = []
    for i, it in enumerate(items[:limit] if limit else items):
        gold = max(range(len(it["choices"])), key=lambda j: it["scores"][j])
        rows.append({"id": i, "question": it["input"], "choices": list(it["choices"]), "gold": gold})
    return rows


def write_lm_eval_task(
    name: str, rows: Sequence[dict], dest: Path, prompt: str = MC_PROMPT, data_ref: str | None = None
) -> Path:
    """A local lm-eval multiple-choice task: ``dest/<name>.jsonl`` and ``dest/<name>.yaml`` (acc and acc_norm).

    lm-eval finds it with ``--include_path dest`` (or ``TaskManager(include_path=dest)``). The YAML names the data
    file by ``data_ref`` (a path relative to the folder lm-eval runs in), else by its absolute path.
    """
    dest.mkdir(parents=True, exist_ok=True)
    data = dest / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ref = data_ref or str(data.resolve())
    metrics = "".join(
        f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n" for m in ("acc", "acc_norm")
    )
    task = (  # JSON strings are YAML strings: the prompt's newline stays one readable escape
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(ref)}\n"
        f"test_split: test\noutput_type: multiple_choice\ndoc_to_text: {json.dumps(prompt)}\n"
        f"doc_to_choice: choices\ndoc_to_target: gold\nmetric_list:\n{metrics}metadata:\n  version: 1.0\n"
    )
    out = dest / f"{name}.yaml"
    out.write_text(task)
    return out


def arithmetic_mc_rows(n: int = 40, seed: int = 0) -> list[dict]:
    """Multiple-choice 3-digit add/subtract questions (the README's example lm-eval task): the sum and three
    near misses (off by ten, by a hundred, the last two digits swapped)."""
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        a, b, op = rng.randint(100, 999), rng.randint(100, 999), rng.choice("+-")
        right = a + b if op == "+" else a - b
        s = str(right)
        swapped = int(s[:-2] + s[-1] + s[-2]) if abs(right) >= 10 else right
        choices = list(dict.fromkeys([right, right + 10, right - 100, swapped]))
        if len(choices) < 4:
            continue
        rng.shuffle(choices)
        rows.append({"id": len(rows), "question": f"What is {a} {op} {b}?", "choices": [str(c) for c in choices],
                     "gold": choices.index(right)})  # fmt: skip
    return rows


def lm_eval_scores(model: Any, tokenizer: Any, task_dir: Path, tasks: Sequence[str], batch_size: int = 32) -> dict:
    """Score ``model`` (in memory) on local lm-eval tasks: per task acc, acc_norm, their stderr, per-item outputs.

    Items: ``[id, predicted choice, predicted choice by length-normalised log-likelihood, acc, acc_norm]``.
    """
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    was_training = model.training
    model.eval()
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(_device(model)))
        manager = TaskManager(include_path=str(task_dir), include_defaults=False)  # only ours: fast to index
        res = simple_evaluate(
            model=lm,
            tasks=list(tasks),
            task_manager=manager,
            log_samples=True,
            bootstrap_iters=100,
            verbosity="WARNING",
        )
    finally:
        model.train(was_training)
    out = {}
    for t in tasks:
        r = res["results"][t]
        items = []
        for s in sorted(res["samples"][t], key=lambda s: s["doc"]["id"]):
            ll = [float(x[0]) for x in s["filtered_resps"]]
            norm = [v / max(len(c), 1) for v, c in zip(ll, s["doc"]["choices"])]  # lm-eval's acc_norm: per char
            pred, pred_norm = ll.index(max(ll)), norm.index(max(norm))
            gold = s["doc"]["gold"]
            if (pred == gold) != bool(s["acc"]) or (pred_norm == gold) != bool(s["acc_norm"]):
                raise RuntimeError(
                    f"lm-eval task {t}, item {s['doc']['id']}: its acc/acc_norm disagree with the predictions read "
                    "from its log-likelihoods; has lm-eval changed how it scores multiple choice?"
                )
            items.append([s["doc"]["id"], pred, pred_norm, int(s["acc"]), int(s["acc_norm"])])
        out[t] = {
            "n": len(items),
            "acc": float(r["acc,none"]),
            "acc_norm": float(r["acc_norm,none"]),
            "acc_stderr": _float(r.get("acc_stderr,none")),
            "acc_norm_stderr": _float(r.get("acc_norm_stderr,none")),
            "items": items,
        }
    return out


def _float(x: Any) -> float | None:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


# ---- perplexity on several held-out texts ------------------------------------------------------------------------


def _package_file(package: str, name: str) -> tuple[str, str]:
    dist = md.distribution(package)
    for f in dist.files or []:
        if f.name == name:
            return Path(dist.locate_file(f)).read_text(encoding="utf-8"), f"{package} {dist.version}: {f}"
    raise FileNotFoundError(f"the installed {package} ships no file named {name}")


def _gutenberg_body(text: str) -> str:
    start = text.find("*** START OF")
    body = text[text.index("\n", start) + 1 :] if start >= 0 else text
    end = body.find("*** END OF")
    return (body[:end] if end >= 0 else body).strip()


def heldout_texts() -> dict[str, tuple[str, dict]]:
    """Three genuinely different held-out texts available offline, by name: (text, provenance with sha256).

    legal prose (the Apache-2.0 license shipped with transformers), fiction (Jules and Michel Verne's "In the Year
    2889", the Project Gutenberg text reasoning-gym ships, without its header and footer) and technical
    documentation (the Python language reference topics of this interpreter's ``pydoc_data``).
    """
    import pydoc_data.topics as topics
    import sys

    out: dict[str, tuple[str, dict]] = {}
    license_text, src = _package_file("transformers", "LICENSE")
    out["apache_license"] = (license_text, {"source": src})
    story, src = _package_file("reasoning_gym", "in_the_year_2889.txt")
    out["verne_2889"] = (_gutenberg_body(story), {"source": src + " (Project Gutenberg body)"})
    docs = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    out["python_reference"] = (docs, {"source": f"python {sys.version.split()[0]}: pydoc_data.topics, sorted keys"})
    for text, info in out.values():
        info.update(sha256=hashlib.sha256(text.encode()).hexdigest(), chars=len(text))
    return out
