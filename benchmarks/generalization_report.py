"""The generalization study's report: generalization.{json,md,png} from finished job folders.

The JSON keeps every run as a record (arm, lr, steps, seed, in_domain and ood as {"n", "correct"}, the curve,
forgetting, costs), each arm's bracket, its accuracy at its compared lr (the first seed's best until every seed has
run at the arm's top lrs, then the best of those on every seed's val questions) with bootstrap CIs over questions
(seeds pooled), every (arm, lr) pooled over seeds, the paired comparisons between arms and against the base, the
findings as sentences, and a secondary sensitivity family (each arm at its runner-up lr). The markdown states only
what the paired statistics support: a difference is "significant at α=0.05" only when its CI excludes 0 and its
Holm-corrected McNemar p is below 0.05; everything else reads "no difference detected".
"""

from __future__ import annotations

import gzip
import itertools
import json
import statistics
from pathlib import Path
from typing import Any

from benchmarks.paired_stats import ALPHA, accuracy_ci, compare, decide, wording

SCHEMA = "s2ft-generalization/1"
LABELS = {"s2ft_down": "S²FT Down", "s2ft_odown": "S²FT O+Down", "lora": "LoRA", "full": "full FT", "base": "base"}


def _outputs(result: dict, out: Path) -> dict:
    with gzip.open(out / "generalization" / "jobs" / result["name"] / "outputs.json.gz", "rt") as f:
        return json.load(f)


def _runs_at(results: dict[str, dict], arm: str, lr: float) -> dict[int, dict]:
    """The finished runs of ``arm`` at ``lr``, by seed (ascending)."""
    runs = {r["spec"]["seed"]: r for r in results.values() if r["spec"]["arm"] == arm and r["spec"]["lr"] == lr}
    return dict(sorted(runs.items()))


def record(result: dict) -> dict:
    """One finished job as the JSON lists it."""
    spec = result["spec"]
    rec = {k: spec[k] for k in ("arm", "lr", "seed")}
    rec["steps"] = spec["steps"] if spec["method"] != "base" else 0
    rec.update(in_domain=result["in_domain"], ood=result["ood"], val=result["val"], curve=result["curve"])
    rec["mc"] = {t: {k: v[k] for k in ("n", "acc", "acc_norm", "acc_stderr", "acc_norm_stderr")}
                 for t, v in result["mc"].items()}  # fmt: skip
    rec["ppl"] = {t: v["ppl"] for t, v in result["ppl"].items()}
    for k in ("trainable_params", "lora_rank", "train_seconds", "step_seconds", "peak_rss_mib", "final_loss",
              "wall_seconds", "threads"):  # fmt: skip
        if k in result:
            rec[k] = result[k]
    rec["eval_seconds"] = result["eval_seconds"]["total"]
    rec["code"] = result["code"]
    return rec


def measures(outputs: dict) -> dict[str, dict[str, float]]:
    """Per-question scores of one run by measure: in_domain, ood:<set>, ood (pooled), mc_acc, mc_acc_norm, log_ppl."""
    m = {"in_domain": {r[0]: r[2] for r in outputs["in_domain"]}}
    for name, rows in outputs["ood"].items():
        m[f"ood:{name}"] = {r[0]: r[2] for r in rows}
    m["ood"] = {q: v for name in outputs["ood"] for q, v in m[f"ood:{name}"].items()}
    m["mc_acc"] = {f"{t}/{r[0]}": r[3] for t, rows in outputs["mc"].items() for r in rows}
    m["mc_acc_norm"] = {f"{t}/{r[0]}": r[4] for t, rows in outputs["mc"].items() for r in rows}
    m["log_ppl"] = {f"{t}/{i}": w[0] / w[1] for t, ws in outputs["ppl_windows"].items() for i, w in enumerate(ws)}
    return m


WHAT = {"in_domain": "in-domain accuracy", "ood": "out-of-domain accuracy (all sets pooled)",
        "mc_acc": "BIG-bench MC accuracy (acc)", "mc_acc_norm": "BIG-bench MC accuracy (acc_norm)",
        "log_ppl": "held-out log-perplexity"}  # fmt: skip


def _what(measure: str) -> str:
    return WHAT.get(measure, f"accuracy on {measure.split(':', 1)[-1]}")


def _fmt_args(measure: str) -> dict:
    return {"unit": "nats/token", "scale": 1.0, "digits": 3} if measure == "log_ppl" else {}


def build(out: Path, design: dict, results: dict[str, dict], states: dict[str, dict], complete: bool) -> dict:
    """generalization.json's content from the finished results (by job name) and each arm's bracket state."""
    from benchmarks.sysinfo import describe

    base = results.get("base")
    runs = [record(r) for n, r in sorted(results.items()) if n != "base"]
    data: dict[str, Any] = {
        "schema": SCHEMA,
        "complete": complete,
        "settings": {
            k: design[k]
            for k in (
                "model",
                "dtype",
                "task",
                "task_kwargs",
                "prompt_template",
                "steps",
                "batch_size",
                "warmup_ratio",
                "seeds",
                "top_lrs",
                "bracket",
                "eval",
            )
        }
        | {
            "arms": {
                a: {k: v for k, v in c.items() if k != "lrs"} | {"initial_lrs": c["lrs"]}
                for a, c in design["arms"].items()
            }
        },  # fmt: skip
        "system": describe(),
        "code": sorted({(r["code"]["commit"] or "?") + ("+dirty" if r["code"]["dirty"] else "") for r in runs}),
        "base": None if base is None else {k: v for k, v in record(base).items() if k not in ("lr", "seed")},
        "runs": runs,
        "bracket": {},
        "chosen": {},
        "comparisons": {},
        "vs_base": {},
        "findings": [],
    }
    if base is not None:
        data["texts"] = {t: {k: v[k] for k in ("source", "sha256", "chars", "tokens")} for t, v in base["ppl"].items()}
    scores: dict[str, dict[int, dict]] = {}  # arm -> seed -> measure -> question -> score
    curves: dict[str, dict[int, dict]] = {}  # arm -> seed -> step -> per val question 0/1
    for arm, st in states.items():
        if not st["runs"]:
            continue
        data["bracket"][arm] = {
            "grid": st["grid"], "best": st["best"], "top": st.get("ranking", [])[: design["top_lrs"]],
            "bracketed": st["bracketed"], "extensions": len(st["grid"]) - len(design["arms"][arm]["lrs"]),
            "provisional": st.get("provisional", False),
            "points": [{"lr": lr, "val_acc": r["val"]["correct"] / r["val"]["n"], "val_loss": r["val"]["loss"],
                        "in_domain_acc": r["in_domain"]["correct"] / r["in_domain"]["n"]}
                       for lr, r in st["runs"].items()],
        }  # fmt: skip
        lr, data["bracket"][arm]["seed_pooled"], by = choose_lr(st, results, arm, design)
        data["bracket"][arm].update(chosen=lr, chosen_by=by)
        at_best = _runs_at(results, arm, lr)
        outs = {s: _outputs(r, out) for s, r in at_best.items()}
        scores[arm] = {s: measures(o) for s, o in outs.items()}
        data["chosen"][arm] = _chosen(arm, lr, at_best, scores[arm], base)
        curves[arm] = {s: o.get("curve", {}) for s, o in outs.items()}
    if base is not None:
        base_scores = {0: measures(_outputs(base, out))}
    arms = list(scores)
    for m in _measure_names(scores):
        pairs = [(a, b) for a, b in itertools.combinations(arms, 2)]
        decided = decide([compare(_by(scores[a], m), _by(scores[b], m)) for a, b in pairs])
        data["comparisons"][m] = [
            {"a": a, "b": b, **c, "sentence": wording(LABELS.get(a, a), LABELS.get(b, b), c, what=_what(m),
                                                       **_fmt_args(m))}
            for (a, b), c in zip(pairs, decided)
        ]  # fmt: skip
        if base is not None and (m.startswith("mc") or m == "log_ppl"):
            decided = decide([compare(_by(scores[a], m), _by(base_scores, m)) for a in arms])
            data["vs_base"][m] = [
                {"arm": a, **c, "sentence": wording(LABELS.get(a, a), "base", c, what=_what(m), **_fmt_args(m))}
                for a, c in zip(arms, decided)
            ]
    for group in (*data["comparisons"].values(), *data["vs_base"].values()):
        data["findings"] += [c["sentence"] for c in group if c["verdict"] == "significant"]
    data["budget"] = _budget(curves)
    data["sensitivity"] = _sensitivity(out, results, data, scores)
    return data


SENSITIVITY_MEASURES = ("in_domain", "ood", "mc_acc_norm", "log_ppl")


def _sensitivity(out: Path, results: dict[str, dict], data: dict, scores: dict[str, dict]) -> dict[str, list[dict]]:
    """Each arm at its runner-up lr (once every seed ran there) against its own compared lr and every other arm's:
    does a finding hinge on which of an arm's two best lrs the val split picked? A secondary family, Holm-corrected
    within each measure; the primary comparisons above stay as they are."""
    seeds = sorted(data["settings"]["seeds"])
    alts = []
    for arm, b in data["bracket"].items():
        for p in b["seed_pooled"]:
            if p["lr"] != b["chosen"] and p["seeds"] == seeds:
                runs = _runs_at(results, arm, p["lr"])
                alts.append((arm, p["lr"], {s: measures(_outputs(r, out)) for s, r in runs.items()}))
    pairs = [(arm, lr, alt, other) for arm, lr, alt in alts for other in scores]
    if not pairs:
        return {}
    table: dict[str, list[dict]] = {}
    for m in SENSITIVITY_MEASURES:
        decided = decide([compare(_by(alt, m), _by(scores[other], m)) for _, _, alt, other in pairs])
        table[m] = [{"arm": arm, "lr": lr, "vs": other, "vs_lr": data["chosen"][other]["lr"], **c}
                    for (arm, lr, _, other), c in zip(pairs, decided)]  # fmt: skip
    return table


def choose_lr(st: dict, results: dict[str, dict], arm: str, design: dict) -> tuple[float, list[dict], str]:
    """(the lr the report compares the arm at, the top lrs' val scores pooled over seeds, how it was chosen).

    The bracket ranks lrs on the first seed's 200 val questions; once every seed has run at each of the arm's top
    lrs, the choice among them is remade on all seeds' val questions (3x the evidence), ties by lower val loss. The
    test sets never enter the choice."""
    top = st.get("ranking", [])[: design["top_lrs"]]
    pooled = []
    for lr in top:
        runs = _runs_at(results, arm, lr)
        pooled.append({"lr": lr, "seeds": list(runs),
                       "val_acc": sum(r["val"]["correct"] for r in runs.values())
                                  / sum(r["val"]["n"] for r in runs.values()),
                       "val_loss": statistics.fmean(r["val"]["loss"] for r in runs.values())})  # fmt: skip
    if pooled and all(p["seeds"] == sorted(design["seeds"]) for p in pooled):
        best = max(pooled, key=lambda p: (p["val_acc"], -p["val_loss"]))
        return best["lr"], pooled, f"val accuracy over seeds {sorted(design['seeds'])} among the top {len(top)}"
    return st["best"], pooled, f"val accuracy on seed {design['seeds'][0]} (the seed phase has not finished)"


def _measure_names(scores: dict) -> list[str]:
    names = []
    for seeds in scores.values():
        for m in next(iter(seeds.values())):
            if m not in names:
                names.append(m)
    return names


def _by(arm_scores: dict[int, dict], measure: str) -> dict[int, dict]:
    return {s: m[measure] for s, m in arm_scores.items()}


def _pooled_mc(mc: dict[str, dict], key: str = "acc") -> float:
    """Multiple-choice accuracy over all tasks' items pooled (each task weighted by its item count)."""
    return sum(v[key] * v["n"] for v in mc.values()) / sum(v["n"] for v in mc.values())


def _chosen(arm: str, lr: float, runs: dict[int, dict], scores: dict[int, dict], base: dict | None) -> dict:
    """The arm at its best lr, seeds pooled: accuracies with CIs, forgetting, curve, costs."""
    first = next(iter(scores.values()))
    acc = {m: accuracy_ci(_by(scores, m)) for m in first if m != "log_ppl" and not m.startswith("mc")}
    mc = {}
    for key in ("acc", "acc_norm"):
        mc[key] = accuracy_ci(_by(scores, f"mc_{key}"))
        if base is not None:
            mc[key]["delta_vs_base"] = mc[key]["mean"] - _pooled_mc(base["mc"], key)
    tasks = next(iter(runs.values()))["mc"]
    mc["tasks"] = {t: {k: statistics.fmean(r["mc"][t][k] for r in runs.values()) for k in ("acc", "acc_norm")}
                   | {"n": tasks[t]["n"]} for t in tasks}  # fmt: skip
    ppl = {}
    for t in next(iter(runs.values()))["ppl"]:
        xs = [r["ppl"][t]["ppl"] for r in runs.values()]
        ppl[t] = {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else None}
        if base is not None:
            ppl[t]["delta_vs_base"] = ppl[t]["mean"] - base["ppl"][t]["ppl"]
    steps = sorted({c["step"] for r in runs.values() for c in r["curve"]})
    curve = [{"step": s, "acc": statistics.fmean(c["correct"] / c["n"] for r in runs.values() for c in r["curve"]
                                                 if c["step"] == s)} for s in steps]  # fmt: skip
    return {
        "arm": arm, "lr": lr, "seeds": sorted(runs), "accuracy": acc, "mc": mc, "ppl": ppl, "curve": curve,
        "trainable_params": next(iter(runs.values())).get("trainable_params"),
        "train_seconds": statistics.fmean(r["train_seconds"] for r in runs.values()),
        "step_seconds": statistics.fmean(r["step_seconds"] for r in runs.values()),
    }  # fmt: skip


def _budget(curves: dict[str, dict[int, dict]]) -> dict:
    """Whether each arm's best run still gained over the last quarter of training: val accuracy at the last curve
    point minus the point nearest 3/4 of the steps, paired over val questions and seeds (Holm across arms)."""
    rows, tests = [], []
    for arm, by_seed in curves.items():
        steps = sorted({int(k) for c in by_seed.values() for k in c})
        if len(steps) < 2:
            continue
        last = steps[-1]
        ref = min(steps[:-1], key=lambda s: abs(s - 0.75 * last))
        seeds = [s for s, c in by_seed.items() if str(last) in c and str(ref) in c]
        at = {k: {s: {f"val/{i}": v for i, v in enumerate(by_seed[s][str(k)])} for s in seeds} for k in (last, ref)}
        rows.append({"arm": arm, "from_step": ref, "to_step": last})
        tests.append(compare(at[last], at[ref]))
    out = {}
    for row, c in zip(rows, decide(tests)):
        rising = c["verdict"] == "significant" and c["diff"] > 0
        out[row["arm"]] = {**row, "gain": c["diff"], "ci": c["ci"], "p_holm": c["p_holm"], "still_rising": rising}
    return out


# ---- markdown ----------------------------------------------------------------------------------------------------


def _pct(ci: dict) -> str:
    return f"{100 * ci['mean']:.1f} [{100 * ci['ci'][0]:.1f}, {100 * ci['ci'][1]:.1f}]"


def markdown(data: dict) -> str:
    """The report: design, bracket, budget curve, accuracy table, forgetting, paired findings, lrs to use."""
    if data.get("schema") != SCHEMA:
        raise ValueError(f"report schema is {data.get('schema')!r}, expected {SCHEMA!r}")
    s, ev = data["settings"], data["settings"]["eval"]
    lab = lambda a: LABELS.get(a, a)  # noqa: E731
    n_runs = len(data["runs"])
    status = "Complete." if data["complete"] else f"UNFINISHED STUDY: {n_runs} run(s) so far; numbers may still move."
    ood_sets = list(ev["ood"])
    lines = [
        f"# Generalization study: {s['model']}, {s['task']} {s['task_kwargs']}",
        "",
        f"{status} {s['steps']} steps x batch {s['batch_size']} per run (each question seen once); bracket on seed "
        f"{s['seeds'][0]}, then seeds {s['seeds'][1:]} at each arm's {s['top_lrs']} best lrs. In-domain: "
        f"{ev['test_size']} held-out questions; out-of-domain (never trained on): "
        + ", ".join(f"{k} ({v['size']})" for k, v in ev["ood"].items())
        + f". Code: {', '.join(c[:12] for c in data['code'])}.",
        "",
        "## Learning-rate bracket (first seed; best by val accuracy, ties by val loss)",
        "",
        "| arm | lr | val acc % | val loss | in-domain % | best |",
        "|---|---|---|---|---|---|",
    ]
    for arm, b in data["bracket"].items():
        for p in b["points"]:
            mark = "**best**" if p["lr"] == b["best"] else ("top" if p["lr"] in b["top"] else "")
            lines.append(f"| {lab(arm)} | {p['lr']:g} | {100 * p['val_acc']:.1f} | {p['val_loss']:.3f} | "
                         f"{100 * p['in_domain_acc']:.1f} | {mark} |")  # fmt: skip
    lines.append("")
    for arm, b in data["bracket"].items():
        if b.get("provisional"):
            where = f"best so far: its initial grid {s['arms'][arm]['initial_lrs']} has not finished (provisional)"
        elif b["bracketed"]:
            where = "strictly inside its grid"
        else:
            where = "AT AN EDGE of its grid (not bracketed)"
        lines.append(f"- {lab(arm)}: best lr {b['best']:g}, {where}; {b['extensions']} extension(s).")
    lines += ["", "Compared at (the lr each arm is reported at):", ""]
    for arm, b in data["bracket"].items():
        top = "; ".join(f"{p['lr']:g}: {100 * p['val_acc']:.1f}% val over {len(p['seeds'])} seed(s)"
                        for p in b["seed_pooled"])  # fmt: skip
        lines.append(f"- {lab(arm)}: {b['chosen']:g}, by {b['chosen_by']}" + (f"; {top}" if top else "") + ".")
    lines += ["", "## Every arm and lr (seeds pooled; descriptive, no test)", ""] + sweep_table(data)
    lines += ["", "## Budget: in-domain curve at each arm's compared lr (val split, mean over seeds)", ""]
    steps = sorted({p["step"] for ch in data["chosen"].values() for p in ch["curve"]})
    lines += ["| arm | " + " | ".join(str(x) for x in steps) + " |", "|---|" + "---|" * len(steps)]
    for arm, ch in data["chosen"].items():
        by_step = {p["step"]: p["acc"] for p in ch["curve"]}
        lines.append(f"| {lab(arm)} | " + " | ".join(f"{100 * by_step[x]:.0f}" if x in by_step else "" for x in steps)
                     + " |")  # fmt: skip
    lines.append("")
    for arm, b in data["budget"].items():
        lo, hi = (100 * x for x in b["ci"])
        verdict = "still rising (significant at α=0.05)" if b["still_rising"] else "no further gain detected"
        lines.append(f"- {lab(arm)}: {100 * b['gain']:+.1f} pp from step {b['from_step']} to {b['to_step']} (95% CI "
                     f"[{lo:+.1f}, {hi:+.1f}], paired over val questions and seeds): {verdict}.")  # fmt: skip
    lines += [
        "",
        "## Accuracy at each arm's compared lr (%, seeds pooled; 95% bootstrap CI over questions)",
        "",
        "| arm | lr | seeds | in-domain | " + " | ".join(ood_sets) + " | OOD pooled |",
        "|---|---|---|---|" + "---|" * (len(ood_sets) + 1),
    ]
    if data["base"]:
        b = data["base"]
        cells = [f"{100 * b['ood'][k]['correct'] / b['ood'][k]['n']:.1f}" for k in ood_sets]
        n_ood = sum(b["ood"][k]["n"] for k in ood_sets)
        pooled = 100 * sum(b["ood"][k]["correct"] for k in ood_sets) / n_ood
        lines.append(f"| base | - | - | {100 * b['in_domain']['correct'] / b['in_domain']['n']:.1f} | "
                     + " | ".join(cells) + f" | {pooled:.1f} |")  # fmt: skip
    for arm, ch in data["chosen"].items():
        a = ch["accuracy"]
        lines.append(f"| {lab(arm)} | {ch['lr']:g} | {len(ch['seeds'])} | {_pct(a['in_domain'])} | "
                     + " | ".join(_pct(a[f"ood:{k}"]) for k in ood_sets) + f" | {_pct(a['ood'])} |")  # fmt: skip
    lines += ["", "## Forgetting at each arm's compared lr", ""]
    texts = list(data.get("texts", {}))
    lines += ["| arm | MC acc % (Δ pp) | MC acc_norm % (Δ pp) | " + " | ".join(f"ppl {t} (Δ)" for t in texts) + " |",
              "|---|---|---|" + "---|" * len(texts)]  # fmt: skip
    if data["base"]:
        b = data["base"]
        pooled = {k: _pooled_mc(b["mc"], k) for k in ("acc", "acc_norm")}
        lines.append(f"| base | {100 * pooled['acc']:.1f} | {100 * pooled['acc_norm']:.1f} | "
                     + " | ".join(f"{b['ppl'][t]:.2f}" for t in texts) + " |")  # fmt: skip
    for arm, ch in data["chosen"].items():
        mc = ch["mc"]
        nan = float("nan")
        cells = [f"{_pct(mc[k])} ({100 * mc[k].get('delta_vs_base', nan):+.1f})" for k in ("acc", "acc_norm")]
        cells += [f"{ch['ppl'][t]['mean']:.2f} ({ch['ppl'][t].get('delta_vs_base', nan):+.2f})" for t in texts]
        lines.append(f"| {lab(arm)} | " + " | ".join(cells) + " |")
    if texts:
        about = [
            f"{t}: {v['source']}, {v['tokens']} tokens, sha256 {v['sha256'][:12]}" for t, v in data["texts"].items()
        ]
        lines += ["", "Held-out texts: " + "; ".join(about) + "."]
    lines += [
        "",
        f"## Paired comparisons at each arm's compared lr (α={ALPHA:g})",
        "",
        "Seeds pooled. 95% CI: bootstrap over questions (windows for perplexity). p: McNemar exact over (question, "
        "seed) pairs (bootstrap for log-perplexity), Holm-corrected within each measure. Significant = the CI "
        "excludes 0 and p < α.",
    ]
    for title, family in (("between arms", data["comparisons"]), ("against the base model", data["vs_base"])):
        for m, group in family.items():
            if group:
                lines += ["", f"### {_what(m)}, {title}", ""] + [f"- {c['sentence']}" for c in group]
    lines += ["", "## What the statistics support", ""]
    lines += [f"- {f}" for f in data["findings"]] or ["- No difference between arms or against the base was detected."]
    none = [m for m, g in data["comparisons"].items() if g and all(c["verdict"] != "significant" for c in g)]
    if none:
        lines.append(f"- No difference between any two arms detected on: {', '.join(_what(m) for m in none)}.")
    lines += sensitivity_table(data)
    lines += ["", "## Learning rates to use (this model, task and budget: each arm's compared lr)", ""]
    for arm, b in data["bracket"].items():
        note = (
            " (provisional: grid unfinished)"
            if b.get("provisional")
            else ("" if b["bracketed"] else " (at the grid's edge)")
        )
        lines.append(f"- {lab(arm)}: {b['chosen']:g}{note}")
    return "\n".join(lines) + "\n"


def _diff_cell(r: dict, scale: float, digits: int) -> str:
    lo, hi = (scale * x for x in r["ci"])
    star = "*" if r["verdict"] == "significant" else ""
    return f"{scale * r['diff']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]{star}"


def sensitivity_table(data: dict) -> list[str]:
    """Markdown: each arm's runner-up lr minus every arm's compared lr, per measure (``*``: significant)."""
    sens = data.get("sensitivity") or {}
    if not sens:
        return []
    chosen = {a: ch["lr"] for a, ch in data["chosen"].items()}
    lines = ["", "## Sensitivity: each arm at its runner-up lr (secondary family)", "",
             "Runner-up minus each arm at its compared lr, seeds pooled; 95% bootstrap CI; `*`: significant "
             "(CI excludes 0, Holm-corrected p < α within each measure of this family). pp; nats/token for "
             "log-perplexity."]  # fmt: skip
    for m, rows in sens.items():
        scale, digits = (1.0, 3) if m == "log_ppl" else (100.0, 1)
        header = " | ".join(f"vs {LABELS.get(a, a)} {lr:g}" for a, lr in chosen.items())
        lines += ["", f"{_what(m)}:", "", f"| runner-up | {header} |", "|---|" + "---|" * len(chosen)]
        for arm, lr in dict.fromkeys((r["arm"], r["lr"]) for r in rows):
            cells = {r["vs"]: r for r in rows if (r["arm"], r["lr"]) == (arm, lr)}
            row = " | ".join(_diff_cell(cells[a], scale, digits) if a in cells else "" for a in chosen)
            lines.append(f"| {LABELS.get(arm, arm)} {lr:g} | {row} |")
    return lines


def sweep_table(data: dict) -> list[str]:
    """Markdown rows: every (arm, lr) that ran, seeds pooled: in-domain and pooled OOD accuracy, MC acc change
    and mean log-perplexity change over the held-out texts against the base (nats/token)."""
    import math

    base = data["base"]
    pooled_base_mc = _pooled_mc(base["mc"]) if base else None
    rows = ["| arm | lr | seeds | in-domain % | OOD pooled % | MC acc Δ pp | log-ppl Δ (nats/token) |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in data["runs"]:
        groups.setdefault((r["arm"], r["lr"]), []).append(r)
    order = list(data["settings"]["arms"])
    for (arm, lr), runs in sorted(groups.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])):
        ind = sum(r["in_domain"]["correct"] for r in runs) / sum(r["in_domain"]["n"] for r in runs)
        ood = sum(v["correct"] for r in runs for v in r["ood"].values()) / sum(
            v["n"] for r in runs for v in r["ood"].values()
        )
        mc = statistics.fmean(_pooled_mc(r["mc"]) for r in runs)
        cells = [f"{100 * ind:.1f}", f"{100 * ood:.1f}", "", ""]
        if base:
            cells[2] = f"{100 * (mc - pooled_base_mc):+.1f}"
            cells[3] = (
                f"{statistics.fmean(math.log(r['ppl'][t] / base['ppl'][t]) for r in runs for t in r['ppl']):+.3f}"
            )
        mark = " **compared**" if data["bracket"].get(arm, {}).get("chosen") == lr else ""
        rows.append(f"| {LABELS.get(arm, arm)} | {lr:g}{mark} | {len(runs)} | " + " | ".join(cells) + " |")
    return rows


# ---- figure ------------------------------------------------------------------------------------------------------


def plot(data: dict, path: Path) -> None:
    """Accuracy in- vs out-of-domain with CIs, the bracket, the in-domain curve and the forgetting per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(data["chosen"])
    colors = {a: f"C{i}" for i, a in enumerate(data["settings"]["arms"])}
    fig, ax = plt.subplots(1, 4, figsize=(19, 4.2))
    ood = list(data["settings"]["eval"]["ood"])
    groups = ["in_domain", *[f"ood:{k}" for k in ood]]
    width = 0.8 / max(1, len(arms))
    for i, arm in enumerate(arms):
        acc = data["chosen"][arm]["accuracy"]
        xs = [g + i * width for g in range(len(groups))]
        ys = [100 * acc[m]["mean"] for m in groups]
        err = [[100 * (acc[m]["mean"] - acc[m]["ci"][0]) for m in groups],
               [100 * (acc[m]["ci"][1] - acc[m]["mean"]) for m in groups]]  # fmt: skip
        ax[0].bar(xs, ys, width, yerr=err, capsize=2, color=colors[arm], label=f"{LABELS.get(arm, arm)} "
                  f"{data['chosen'][arm]['lr']:g}")  # fmt: skip
    ax[0].set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], ["in-domain", *ood], fontsize=8)
    ax[0].set_ylabel("accuracy % (95% CI)")
    ax[0].set_title("at each arm's compared lr, seeds pooled", fontsize=9)
    ax[0].legend(fontsize=7)
    for arm, b in data["bracket"].items():
        pts = b["points"]
        ax[1].plot([p["lr"] for p in pts], [100 * p["val_acc"] for p in pts], "o-", color=colors[arm],
                   label=LABELS.get(arm, arm))  # fmt: skip
    ax[1].set_xscale("log")
    ax[1].set_xlabel("learning rate")
    ax[1].set_ylabel("val accuracy % (first seed)")
    ax[1].set_title("learning-rate bracket", fontsize=9)
    ax[1].legend(fontsize=7)
    for arm in arms:
        c = data["chosen"][arm]["curve"]
        ax[2].plot([p["step"] for p in c], [100 * p["acc"] for p in c], "o-", ms=3, color=colors[arm],
                   label=LABELS.get(arm, arm))  # fmt: skip
    ax[2].set_xlabel("step")
    ax[2].set_ylabel("val accuracy % (mean over seeds)")
    ax[2].set_title("in-domain curve at the compared lr", fontsize=9)
    ax[2].legend(fontsize=7)
    for i, arm in enumerate(arms):
        mc = data["chosen"][arm]["mc"]
        for j, key in enumerate(("acc", "acc_norm")):
            if "delta_vs_base" in mc[key]:
                ax[3].bar(j + i * width, 100 * mc[key]["delta_vs_base"], width, color=colors[arm])
    ax[3].set_xticks([j + 0.4 - width / 2 for j in range(2)], ["MC acc Δ", "MC acc_norm Δ"], fontsize=8)
    ax[3].axhline(0, color="k", lw=0.5)
    ax[3].set_ylabel("pp vs base")
    ax[3].set_title("forgetting (BIG-bench via lm-eval)", fontsize=9)
    unfinished = "" if data["complete"] else " — UNFINISHED"
    fig.suptitle(f"{data['settings']['model']}: S²FT vs LoRA vs full FT, {data['settings']['steps']} steps{unfinished}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(out: Path, design: dict, results: dict[str, dict], states: dict[str, dict], complete: bool) -> str:
    """Write out/generalization.{json,md,png}; return the markdown."""
    data = build(out, design, results, states, complete)
    out.mkdir(parents=True, exist_ok=True)
    (out / "generalization.json").write_text(json.dumps(data, indent=1))
    md = markdown(data)
    (out / "generalization.md").write_text(md)
    if data["chosen"]:
        plot(data, out / "generalization.png")
    return md
