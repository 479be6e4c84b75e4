"""Paired statistics for the generalization study: arms scored on the same questions, seeds pooled.

Every measure is a 0/1 (or real-valued) score per (question, seed). Two arms are compared on the questions both
answered: the McNemar exact test over the (question, seed) pairs both ran (the same seed gives both arms the same
data order; real-valued scores such as per-window log-perplexity get a bootstrap p-value instead), and a
percentile bootstrap CI of the difference that resamples whole questions (a question keeps all its seeds, so
question difficulty shared across seeds does not shrink the interval). A difference is called significant only
when both agree: the CI excludes 0 and the p-value, Holm-corrected within one family of comparisons, is below
alpha; everything else is reported as "no difference detected".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

ALPHA = 0.05
BOOTSTRAP_ITERS = 10_000
BOOTSTRAP_SEED = 20241202


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` pairs won by A only and ``c`` won by B only.

    Under the null each discordant pair is a fair coin: p = min(1, 2 · P[Binomial(b + c, 1/2) <= min(b, c)]).
    No discordant pair gives p = 1.
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (same order as given): controls the family-wise error rate."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted = [0.0] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def bootstrap_means(
    per_question: Sequence[float] | np.ndarray, *, iters: int = BOOTSTRAP_ITERS, seed: int = BOOTSTRAP_SEED
) -> np.ndarray:
    """Means of ``iters`` resamples (questions drawn with replacement) of ``per_question``."""
    x = np.asarray(per_question, dtype=float)
    if x.size == 0:
        raise ValueError("the bootstrap needs at least one question")
    rng = np.random.default_rng(seed)
    means = np.empty(iters)
    for start in range(0, iters, 1000):  # chunks keep memory at 1000 x n floats
        stop = min(iters, start + 1000)
        means[start:stop] = x[rng.integers(0, x.size, size=(stop - start, x.size))].mean(axis=1)
    return means


def bootstrap_ci(
    per_question: Sequence[float] | np.ndarray,
    *,
    iters: int = BOOTSTRAP_ITERS,
    level: float = 1 - ALPHA,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``per_question`` values (questions resampled with replacement)."""
    means = bootstrap_means(per_question, iters=iters, seed=seed)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def bootstrap_p(means: np.ndarray) -> float:
    """Two-sided bootstrap p-value of "mean difference = 0": twice the smaller tail beyond 0 (at least 1/iters)."""
    tail = min(float(np.mean(means <= 0)), float(np.mean(means >= 0)))
    return min(1.0, max(2 * tail, 1 / means.size))


Scores = Mapping[int, Mapping[str, float]]  # seed -> question id -> score (1/0 for correctness)


def _common(a: Scores, b: Scores) -> list[str]:
    """Question ids every seed of both arms scored, in a stable order."""
    sets = [set(v) for v in (*a.values(), *b.values())]
    if not sets:
        return []
    return sorted(set.intersection(*sets))


def per_question_means(scores: Scores, questions: Sequence[str]) -> np.ndarray:
    """Mean score over an arm's seeds for each question (seeds pooled)."""
    return np.array([np.mean([s[q] for s in scores.values()]) for q in questions], dtype=float)


def accuracy_ci(scores: Scores, *, iters: int = BOOTSTRAP_ITERS, seed: int = BOOTSTRAP_SEED) -> dict:
    """Accuracy (seeds pooled) with a bootstrap CI over questions; ``n`` questions x ``seeds`` runs."""
    questions = _common(scores, {})
    per_q = per_question_means(scores, questions)
    lo, hi = bootstrap_ci(per_q, iters=iters, seed=seed)
    return {"mean": float(per_q.mean()), "ci": [lo, hi], "n": len(questions), "seeds": sorted(scores)}


def compare(a: Scores, b: Scores, *, iters: int = BOOTSTRAP_ITERS, seed: int = BOOTSTRAP_SEED) -> dict:
    """A minus B on their shared questions: difference of seed-pooled means, its bootstrap CI and a p-value.

    0/1 scores get McNemar's exact test over (question, seed) pairs of the seeds both arms ran (an arm with one run,
    such as the base model, is paired with every seed of the other); real-valued scores get the bootstrap's
    two-sided p-value. ``test`` names which.
    """
    questions = _common(a, b)
    if not questions:
        raise ValueError("the two arms share no scored question; were they evaluated on the same sets?")
    diff = per_question_means(a, questions) - per_question_means(b, questions)
    means = bootstrap_means(diff, iters=iters, seed=seed)
    lo, hi = np.quantile(means, [ALPHA / 2, 1 - ALPHA / 2])
    out = {"diff": float(diff.mean()), "ci": [float(lo), float(hi)], "n": len(questions)}
    pairs = [(sa, sb) for sa in a for sb in b] if len(a) == 1 or len(b) == 1 else [(s, s) for s in set(a) & set(b)]
    binary = all(s[q] in (0, 1) for s in (*a.values(), *b.values()) for q in questions)
    if binary and pairs:
        wins = sum(a[sa][q] > b[sb][q] for sa, sb in pairs for q in questions)
        losses = sum(a[sa][q] < b[sb][q] for sa, sb in pairs for q in questions)
        out.update(test="mcnemar", a_only=int(wins), b_only=int(losses), pairs=len(pairs) * len(questions))
        out["p"] = mcnemar_exact(int(wins), int(losses))
    else:
        out.update(test="bootstrap", p=bootstrap_p(means))
    return out


def decide(comparisons: list[dict], alpha: float = ALPHA) -> list[dict]:
    """Add the Holm-adjusted p (within this family) and the verdict to each comparison (returns new dicts).

    Verdict: "significant" when the CI excludes 0 and the Holm-adjusted p < alpha; else "no difference detected".
    """
    adjusted = holm([c["p"] for c in comparisons])
    out = []
    for c, p_holm in zip(comparisons, adjusted):
        significant = (c["ci"][0] > 0 or c["ci"][1] < 0) and p_holm < alpha
        out.append({**c, "p_holm": p_holm, "verdict": "significant" if significant else "no difference detected"})
    return out


def wording(
    a: str, b: str, comparison: dict, *, what: str = "accuracy", unit: str = "pp", scale: float = 100.0,
    digits: int = 1, alpha: float = ALPHA,
) -> str:  # fmt: skip
    """One sentence stating what a decided comparison (A minus B) supports: the report's mechanical wording."""
    d, (lo, hi) = comparison["diff"] * scale, (x * scale for x in comparison["ci"])
    interval = f"{d:+.{digits}f} {unit}, 95% CI [{lo:+.{digits}f}, {hi:+.{digits}f}]"
    test = "McNemar" if comparison.get("test") == "mcnemar" else "bootstrap"
    p = f", {test} p = {comparison['p_holm']:.2g} (Holm)" if "p_holm" in comparison else ""
    if comparison["verdict"] == "significant":
        winner, loser = (a, b) if d > 0 else (b, a)
        return f"{winner} has higher {what} than {loser} ({a} − {b}: {interval}{p}): significant at α={alpha:g}."
    return f"{a} vs {b}, {what}: no difference detected ({a} − {b}: {interval}{p})."
