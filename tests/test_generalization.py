"""The generalization study: paired statistics against hand-computed values, the bracket planner, the report's
mechanical wording, and the pipeline end to end on a tiny model with resumption."""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import math
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from benchmarks import paired_stats as ps
from benchmarks.generalization import arithmetic_mc_rows, build_set, heldout_texts, in_words, write_lm_eval_task

sys.path.insert(0, str(Path(__file__).parent))
from tiny_tokenizer import save_tiny_llama  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "quality" / "generalization.yaml"


def _tool():
    spec = importlib.util.spec_from_file_location("generalization_study", ROOT / "tools" / "generalization_study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gs = _tool()


# ---- statistics -------------------------------------------------------------------------------------------------


def test_mcnemar_exact_matches_hand_computed_binomial_tails():
    assert ps.mcnemar_exact(1, 6) == pytest.approx(2 * (1 + 7) / 2**7)  # 0.125
    assert ps.mcnemar_exact(0, 5) == pytest.approx(2 / 2**5)  # 0.0625
    assert ps.mcnemar_exact(10, 2) == pytest.approx(2 * (1 + 12 + 66) / 2**12)  # 0.0386, symmetric in b, c
    assert ps.mcnemar_exact(3, 3) == 1.0 and ps.mcnemar_exact(0, 0) == 1.0
    with pytest.raises(ValueError, match="discordant"):
        ps.mcnemar_exact(-1, 2)


def test_holm_adjusts_in_rank_order_and_stays_monotone():
    # sorted 0.01, 0.03, 0.04 -> 3 x 0.01 = 0.03, 2 x 0.03 = 0.06, max(0.06, 1 x 0.04) = 0.06
    assert ps.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert ps.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_bootstrap_ci_on_known_cases():
    assert ps.bootstrap_ci([0.25] * 50) == (0.25, 0.25)  # no spread, no interval
    x = np.array([1.0, 0.0] * 200)  # mean 0.5, n 400: normal approximation 0.5 ± 1.96 · 0.025
    lo, hi = ps.bootstrap_ci(x)
    assert lo == pytest.approx(0.5 - 1.96 * 0.025, abs=0.006) and hi == pytest.approx(0.5 + 1.96 * 0.025, abs=0.006)
    assert ps.bootstrap_ci(x) == (lo, hi)  # seeded: the same interval every time
    assert ps.bootstrap_p(np.array([0.1, 0.2, 0.3, 0.4])) == 0.25  # 1 / iters: no resample at or below 0
    assert ps.bootstrap_p(np.array([-1.0, 1.0, 2.0, 3.0])) == 0.5


def test_compare_pairs_questions_and_seeds_and_pools_seeds():
    qs_ = [f"q{i}" for i in range(40)]
    # seed 0: A right on 0-29, B right on 0-9; seed 1: A right on 0-19, B right on 0-19 and 30-34
    a = {0: {q: int(i < 30) for i, q in enumerate(qs_)}, 1: {q: int(i < 20) for i, q in enumerate(qs_)}}
    b = {0: {q: int(i < 10) for i, q in enumerate(qs_)}, 1: {q: int(i < 20 or 30 <= i < 35) for i, q in enumerate(qs_)}}
    c = ps.compare(a, b)
    assert c["test"] == "mcnemar" and c["a_only"] == 20 and c["b_only"] == 5 and c["pairs"] == 80
    assert c["p"] == pytest.approx(ps.mcnemar_exact(20, 5))
    assert c["diff"] == pytest.approx((50 - 35) / 80)  # seed-pooled accuracies 50/80 vs 35/80
    base = {0: {q: int(i < 15) for i, q in enumerate(qs_)}}  # one run: paired with every seed of A
    vb = ps.compare(a, base)
    assert vb["pairs"] == 80 and vb["a_only"] == 15 + 5 and vb["b_only"] == 0
    real = ps.compare({0: {"w": 1.5, "v": 2.5}}, {0: {"w": 1.0, "v": 2.0}})
    assert real["test"] == "bootstrap" and real["diff"] == pytest.approx(0.5) and real["ci"] == [0.5, 0.5]
    with pytest.raises(ValueError, match="share no scored question"):
        ps.compare({0: {"x": 1}}, {0: {"y": 1}})


def test_decide_and_wording_state_only_what_the_statistics_support():
    strong = {"diff": 0.2, "ci": [0.1, 0.3], "p": 0.001, "test": "mcnemar"}
    ci_only = {"diff": 0.05, "ci": [0.01, 0.09], "p": 0.04, "test": "mcnemar"}  # Holm: 2 x 0.04 = 0.08
    null = {"diff": -0.01, "ci": [-0.05, 0.03], "p": 0.7, "test": "mcnemar"}
    s, c, n = ps.decide([strong, ci_only, null])
    assert (s["verdict"], c["verdict"], n["verdict"]) == (
        "significant",
        "no difference detected",
        "no difference detected",
    )
    assert c["p_holm"] == pytest.approx(0.08)
    assert ps.wording("A", "B", s) == (
        "A has higher accuracy than B (A − B: +20.0 pp, 95% CI [+10.0, +30.0], McNemar p = 0.003 (Holm)): "
        "significant at α=0.05."
    )
    assert ps.wording("A", "B", {**s, "diff": -0.2, "ci": [-0.3, -0.1]}).startswith("B has higher accuracy than A")
    assert ps.wording("A", "B", n, what="accuracy on words") == (
        "A vs B, accuracy on words: no difference detected (A − B: -1.0 pp, 95% CI [-5.0, +3.0], "
        "McNemar p = 0.7 (Holm))."
    )


# ---- design and planning ------------------------------------------------------------------------------------------


def test_ladder_moves_in_half_decades():
    assert gs.ladder(1e-3, 1) == 3e-3 and gs.ladder(3e-3, 1) == 1e-2 and gs.ladder(1e-2, -1) == 3e-3
    assert gs.ladder(3e-5, -1) == 1e-5 and gs.ladder(1e-4, 2) == 1e-3 and gs.ladder(3.0e-2, 0) == 3e-2


def _fake(design: dict, arm: str, lr: float, seed: int, val_acc: float, loss: float = 1.0) -> tuple[str, dict]:
    name, spec = gs.job(design, arm, lr, seed)
    return name, {"spec": spec, "val": {"correct": round(200 * val_acc), "n": 200, "loss": loss}}


def test_bracket_extends_an_edge_best_until_it_is_interior_then_plans_the_seeds():
    design = gs.load_design(CONFIG, smoke=False, arms=["s2ft_down", "full"])
    acc = {3e-3: 0.30, 1e-2: 0.40, 3e-2: 0.50, 1e-1: 0.20}  # S²FT Down: best at the top edge, then inside
    results = {}
    st = gs.bracket_state(design, "s2ft_down", results)
    assert st["next"] == [1e-2, 3e-3, 3e-2]  # the initial grid, middle first
    for lr in (3e-3, 1e-2, 3e-2):
        results.update([_fake(design, "s2ft_down", lr, 0, acc[lr])])
    st = gs.bracket_state(design, "s2ft_down", results)
    assert st["best"] == 3e-2 and not st["bracketed"] and st["next"] == [1e-1]
    jobs, states = gs.planned_jobs(design, results)
    done = gs.bracket_done(states)
    assert not done and [n for n, _ in jobs] == [  # arm by arm in turn: each arm's k-th lr before any (k+1)-th
        "base", "s2ft_down_lr0.01_n300_s0", "full_lr0.0001_n300_s0", "s2ft_down_lr0.003_n300_s0",
        "full_lr3e-05_n300_s0", "s2ft_down_lr0.03_n300_s0", "full_lr0.0003_n300_s0", "s2ft_down_lr0.1_n300_s0",
    ]  # fmt: skip
    partial = {n: r for n, r in results.items() if "lr0.01_" in n}  # only the middle lr has run
    assert [n for n, _ in gs.planned_jobs(design, partial)[0]][:4] == [
        "base",
        "s2ft_down_lr0.01_n300_s0",
        "full_lr0.0001_n300_s0",
        "s2ft_down_lr0.003_n300_s0",
    ]  # the other arm's middle lr comes before this arm's next
    results.update([_fake(design, "s2ft_down", 1e-1, 0, acc[1e-1])])
    st = gs.bracket_state(design, "s2ft_down", results)
    assert st["bracketed"] and st["best"] == 3e-2 and st["next"] == [] and gs.top_lrs(st, 2) == [3e-2, 1e-2]
    jobs, states = gs.planned_jobs(design, results)
    done = gs.bracket_done(states)  # full FT's bracket has not started: S²FT Down's seeds go on
    assert not done and [n for n, _ in jobs if n.startswith("s2ft_down") and not n.endswith("_s0")] == [
        "s2ft_down_lr0.03_n300_s1", "s2ft_down_lr0.03_n300_s2", "s2ft_down_lr0.01_n300_s1", "s2ft_down_lr0.01_n300_s2",
    ]  # fmt: skip
    assert not [n for n, _ in jobs if n.startswith("full") and not n.endswith("_s0")]
    # full FT: equal val accuracy everywhere, the lower val loss wins (1e-4: inside the grid)
    for lr, loss in ((3e-5, 0.9), (1e-4, 0.5), (3e-4, 0.7)):
        results.update([_fake(design, "full", lr, 0, 0.3, loss)])
    jobs, states = gs.planned_jobs(design, results)
    done = gs.bracket_done(states)
    seeds = [n for n, _ in jobs if not n.endswith("_s0") and n != "base"]
    assert done and seeds == [  # the best lr over the seeds first, then the runner-up
        "s2ft_down_lr0.03_n300_s1", "full_lr0.0001_n300_s1", "s2ft_down_lr0.03_n300_s2", "full_lr0.0001_n300_s2",
        "s2ft_down_lr0.01_n300_s1", "full_lr0.0003_n300_s1", "s2ft_down_lr0.01_n300_s2", "full_lr0.0003_n300_s2",
    ]  # fmt: skip
    # an arm whose best stays at the edge stops after max_extensions, marked not bracketed
    edge = gs.load_design(CONFIG, smoke=False, arms=["lora"])
    edge["bracket"]["max_extensions"] = 1
    res = dict(_fake(edge, "lora", lr, 0, a) for lr, a in ((1e-3, 0.1), (3e-3, 0.2), (1e-2, 0.3), (3e-2, 0.4)))
    st = gs.bracket_state(edge, "lora", res)
    assert st["best"] == 3e-2 and not st["bracketed"] and st["next"] == []


def test_the_compared_lr_is_remade_on_every_seeds_val_once_the_top_lrs_have_all_seeds():
    from benchmarks.generalization_report import choose_lr

    design = gs.load_design(CONFIG, smoke=False, arms=["s2ft_down"])
    first = {3e-3: 0.30, 1e-2: 0.44, 3e-2: 0.46, 1e-1: 0.20}  # seed 0 ranks 3e-2 first, 1e-2 second
    results = dict(_fake(design, "s2ft_down", lr, 0, a) for lr, a in first.items())
    st = gs.bracket_state(design, "s2ft_down", results)
    assert gs.top_lrs(st, 2) == [3e-2, 1e-2]
    results.update([_fake(design, "s2ft_down", 3e-2, 1, 0.40), _fake(design, "s2ft_down", 1e-2, 1, 0.45)])
    lr, pooled, by = choose_lr(st, results, "s2ft_down", design)  # seed 2 missing: the first seed's choice stands
    assert lr == 3e-2 and "seed 0" in by and [p["seeds"] for p in pooled] == [[0, 1], [0, 1]]
    results.update([_fake(design, "s2ft_down", 3e-2, 2, 0.42), _fake(design, "s2ft_down", 1e-2, 2, 0.45)])
    lr, pooled, by = choose_lr(st, results, "s2ft_down", design)  # 1e-2: 268/600 > 3e-2: 256/600 over 3 seeds
    assert lr == 1e-2 and "seeds [0, 1, 2]" in by
    assert [round(600 * p["val_acc"]) for p in pooled] == [256, 268]
    # equal pooled accuracy (240/600 each), seed 0 ranking 3e-2 first: the lower mean val loss wins
    accs = {3e-2: (0.45, 0.40, 0.35), 1e-2: (0.40, 0.40, 0.40)}
    tie = dict(
        _fake(design, "s2ft_down", lr, s, accs[lr][s], loss)
        for lr, loss in ((3e-2, 0.5), (1e-2, 0.4))
        for s in range(3)
    )
    tie.update(_fake(design, "s2ft_down", lr, 0, 0.1) for lr in (3e-3, 1e-1))
    st = gs.bracket_state(design, "s2ft_down", tie)
    assert st["best"] == 3e-2 and choose_lr(st, tie, "s2ft_down", design)[0] == 1e-2


def _outputs_with(in_domain: list[int], ood: list[int], mc: list[int], nll: list[float]) -> dict:
    """A job's per-question outputs as outputs.json.gz holds them, from 0/1 scores and per-window nats/token."""
    return {
        "in_domain": [[f"q{i}", "", c] for i, c in enumerate(in_domain)],
        "ood": {"words": [[f"words/{i}", "", c] for i, c in enumerate(ood)]},
        "mc": {"general_knowledge": [[i, 0, 0, c, c] for i, c in enumerate(mc)]},
        "ppl_windows": {"apache_license": [[x * 100, 100] for x in nll]},
    }


def test_sensitivity_compares_each_runner_up_lr_with_every_compared_lr(tmp_path):
    from benchmarks import generalization_report as gr

    # S²FT Down ties on val at 3e-2 (compared) and 1e-2 (runner-up); LoRA is compared at 3e-3. The runner-up
    # answers every in-domain question LoRA misses and forgets nothing more: only that difference is significant.
    n = 60
    outs = {
        ("s2ft_down", 3e-2): _outputs_with([1] * n, [0, 1] * (n // 2), [1] * n, [2.0 + 0.01 * i for i in range(n)]),
        ("s2ft_down", 1e-2): _outputs_with([1] * n, [0, 1] * (n // 2), [1] * n, [1.0 + 0.01 * i for i in range(n)]),
        ("lora", 3e-3): _outputs_with([0] * n, [0, 1] * (n // 2), [1] * n, [1.0 + 0.01 * i for i in range(n)]),
    }
    results = {}
    for (arm, lr), o in outs.items():
        for seed in (0, 1, 2):
            name = f"{arm}_{lr:g}_s{seed}"
            results[name] = {"name": name, "spec": {"arm": arm, "lr": lr, "seed": seed}}
            job = tmp_path / "generalization" / "jobs" / name
            job.mkdir(parents=True)
            with gzip.open(job / "outputs.json.gz", "wt") as f:
                json.dump(o, f)
    seeds = [0, 1, 2]
    data = {
        "settings": {"seeds": seeds},
        "bracket": {
            "s2ft_down": {"chosen": 3e-2, "seed_pooled": [{"lr": 3e-2, "seeds": seeds}, {"lr": 1e-2, "seeds": seeds}]},
            "lora": {"chosen": 3e-3, "seed_pooled": [{"lr": 3e-3, "seeds": seeds}, {"lr": 1e-3, "seeds": [0]}]},
        },
        "chosen": {"s2ft_down": {"lr": 3e-2}, "lora": {"lr": 3e-3}},
    }
    scores = {arm: {s: gr.measures(outs[arm, lr]) for s in seeds} for arm, lr in (("s2ft_down", 3e-2), ("lora", 3e-3))}
    sens = gr._sensitivity(tmp_path, results, data, scores)
    assert list(sens) == list(gr.SENSITIVITY_MEASURES)
    # LoRA's runner-up has one seed only: just S²FT Down 1e-2 enters, against both compared configurations
    assert all([(r["arm"], r["lr"], r["vs"]) for r in rows] == [("s2ft_down", 1e-2, "s2ft_down"),
               ("s2ft_down", 1e-2, "lora")] for rows in sens.values())  # fmt: skip
    verdict = {(m, r["vs"]): (r["verdict"], round(r["diff"], 3)) for m, rows in sens.items() for r in rows}
    assert verdict["in_domain", "lora"] == ("significant", 1.0)
    assert verdict["in_domain", "s2ft_down"] == ("no difference detected", 0.0)
    assert verdict["log_ppl", "s2ft_down"] == ("significant", -1.0)  # the lower lr forgets less
    assert verdict["ood", "lora"][0] == verdict["mc_acc_norm", "lora"][0] == "no difference detected"
    data["sensitivity"] = sens
    md = "\n".join(gr.sensitivity_table(data))
    assert "| runner-up | vs S²FT Down 0.03 | vs LoRA 0.003 |" in md
    assert "| S²FT Down 0.01 | +0.0 [+0.0, +0.0] | +100.0 [+100.0, +100.0]* |" in md
    assert gr.sensitivity_table({"chosen": {}}) == []


def test_a_second_runner_takes_the_next_job_no_process_holds(tmp_path):
    design = gs.load_design(CONFIG, smoke=False, arms=["s2ft_down"])
    todo = [gs.job(design, "s2ft_down", lr, 0) for lr in (1e-2, 3e-3)]
    assert gs.next_job(todo, tmp_path)[0] == todo[0][0]  # nothing held: the planner's order
    first = tmp_path / "jobs" / todo[0][0]
    first.mkdir(parents=True)
    with gs.qs._claim(first, todo[0][0]):  # another runner holds the first job
        assert gs.next_job(todo, tmp_path)[0] == todo[1][0]
        second = tmp_path / "jobs" / todo[1][0]
        second.mkdir()
        with gs.qs._claim(second, todo[1][0]):  # all held: the first, which the caller waits for
            assert gs.next_job(todo, tmp_path)[0] == todo[0][0]
    assert gs.next_job(todo, tmp_path)[0] == todo[0][0]  # claims released: back to the planner's order


def test_design_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="study design"):
        gs.load_design(tmp_path / "none.yaml", smoke=False)
    bad = tmp_path / "bad.yaml"
    bad.write_text(CONFIG.read_text().replace("lrs: [1.0e-3, 3.0e-3, 1.0e-2]", "lrs: [1.0e-3, 2.0e-3]"))
    with pytest.raises(ValueError, match="ladder"):
        gs.load_design(bad, smoke=False)
    with pytest.raises(ValueError, match="unknown arms"):
        gs.load_design(CONFIG, smoke=False, arms=["dora"])


def test_evaluation_sets_are_new_shifted_and_deterministic():
    design = gs.load_design(CONFIG, smoke=False)
    ood = design["eval"]["ood"]
    train = {"123 + 456"}
    gym, items = build_set("digits4", {**ood["digits4"], "size": 50}, train)
    assert len(items) == 50 and items == build_set("digits4", {**ood["digits4"], "size": 50}, train)[1]
    assert all(max(len(t.lstrip("-")) for t in it["entry"]["metadata"]["expression"].split()[::2]) == 4 for it in items)
    _, words = build_set("words", {**ood["words"], "size": 20}, train)
    assert all(w["prompt"].startswith("Q: ") and " + " not in w["prompt"] and " - " not in w["prompt"] for w in words)
    assert in_words({"metadata": {"expression": "12 - 3"}}, 0) in {t.format(a="12", b="3") for t in
                                                                   ["What is {a} minus {b}?", "Subtract {b} from {a}.",
                                                                    "What is {a} take away {b}?",
                                                                    "How much is {a} minus {b}?"]}  # fmt: skip
    first = words[0]["entry"]["metadata"]["expression"]
    _, again = build_set("words", {**ood["words"], "size": 20}, {first})  # a training question is never scored
    assert first not in {it["entry"]["metadata"]["expression"] for it in again}
    texts = heldout_texts()
    assert len(texts) == 3 and len({i["sha256"] for _, i in texts.values()}) == 3
    assert "Gutenberg" not in texts["verne_2889"][0][:200] and "License" in texts["apache_license"][0][:400]


def test_the_readme_example_task_is_the_generator_output(tmp_path):
    write_lm_eval_task("s2ft_arith_mc", arithmetic_mc_rows(), tmp_path, data_ref="configs/lm_eval/s2ft_arith_mc.jsonl")
    for f in ("s2ft_arith_mc.yaml", "s2ft_arith_mc.jsonl"):
        assert (tmp_path / f).read_text() == (ROOT / "configs" / "lm_eval" / f).read_text()
    rows = arithmetic_mc_rows()
    assert all(eval(r["question"][8:-1]) == int(r["choices"][r["gold"]]) for r in rows)  # noqa: S307


# ---- the pipeline end to end ----------------------------------------------------------------------------------------


def _sdist(path: Path) -> Path:
    from benchmarks.quality import FORGET_TASKS

    with tarfile.open(path, "w:gz") as tar:
        for t in FORGET_TASKS:
            ex = [{"input": f"Is {i} {t[:4]} even?", "target_scores": {"yes": int(i % 2 == 0), "no": i % 2}}
                  for i in range(5)]  # fmt: skip
            data = json.dumps({"canary": "do not train", "examples": ex}).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{t}/task.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory):
    import benchmarks.quality as bq

    tmp = tmp_path_factory.mktemp("gen")
    tiny = save_tiny_llama(tmp / "tiny")
    mp = pytest.MonkeyPatch()
    mp.setattr(bq, "BIGBENCH_CACHE", tmp / "cache")
    argv = ["--smoke", "--model", str(tiny), "--bigbench", str(_sdist(tmp / "bigbench-1.0.0.tar.gz")),
            "--out", str(tmp / "out"), "--arms", "s2ft_down", "lora"]  # fmt: skip
    assert gs.main(["run", "--in-process", *argv]) == 0
    yield tmp / "out", argv
    mp.undo()


def test_smoke_study_runs_end_to_end_with_per_question_outputs(smoke_study):
    out, _ = smoke_study
    data = json.loads((out / "generalization.json").read_text())
    design = gs.load_design(CONFIG, smoke=True, arms=["s2ft_down", "lora"])
    ev = design["eval"]
    assert data["schema"] == "s2ft-generalization/1" and data["complete"]
    # base + each arm's 2 initial lrs + 1 extension (their best sits at an edge, max_extensions 1) + seed 1 at top 1
    assert len(data["runs"]) == 2 * (2 + 1 + 1) and data["base"]["in_domain"]["n"] == ev["test_size"]
    for r in data["runs"]:
        assert {"arm", "lr", "steps", "seed", "in_domain", "ood"} <= set(r) and r["steps"] == design["steps"]
        assert r["in_domain"]["n"] == ev["test_size"] and 0 <= r["in_domain"]["correct"] <= r["in_domain"]["n"]
        assert {k: v["n"] for k, v in r["ood"].items()} == {k: v["size"] for k, v in ev["ood"].items()}
        assert [c["step"] for c in r["curve"]] == [2, 3]  # every curve_every steps and the last
        assert set(r["mc"]) == set(ev["forgetting"]["tasks"]) and all(m["n"] == 3 for m in r["mc"].values())
        assert set(r["ppl"]) == {"apache_license", "verne_2889", "python_reference"}
        assert r["code"]["commit"] and r["train_seconds"] > 0
    for arm in ("s2ft_down", "lora"):
        b = data["bracket"][arm]
        assert b["extensions"] == 1 and len(b["points"]) == 3 and data["chosen"][arm]["lr"] == b["best"]
        assert data["chosen"][arm]["seeds"] == ([0, 1] if b["top"] == [b["best"]] else [0])
        assert b["chosen"] == b["best"] and b["chosen_by"].startswith("val accuracy over seeds [0, 1]")  # top 1
    pair = data["comparisons"]["in_domain"][0]
    assert {pair["a"], pair["b"]} == {"s2ft_down", "lora"} and "verdict" in pair and "p_holm" in pair
    assert set(data["vs_base"]) == {"mc_acc", "mc_acc_norm", "log_ppl"}
    name = next(n for n in sorted((out / "generalization" / "jobs").iterdir()) if n.name.startswith("lora"))
    with gzip.open(name / "outputs.json.gz", "rt") as f:
        outputs = json.load(f)
    assert len(outputs["in_domain"]) == ev["test_size"] and all(len(r) == 3 for r in outputs["in_domain"])
    row = outputs["ood"]["words"][0]
    assert row[0] == "words/0" and isinstance(row[1], str) and row[2] in (0, 1)
    assert all(len(r) == 5 for r in outputs["mc"]["general_knowledge"])
    md = (out / "generalization.md").read_text()
    assert "## Learning-rate bracket" in md and "AT AN EDGE" in md and "## What the statistics support" in md
    table = md.split("## Every arm and lr")[1].split("##")[0]
    assert table.count("| S²FT Down |") == 3 and table.count("**compared**") == 2  # every lr, one compared per arm
    assert (out / "generalization.png").stat().st_size > 1000


def test_smoke_study_resumes_job_by_job(smoke_study, capsys):
    out, argv = smoke_study
    jobs = out / "generalization" / "jobs"
    victim = sorted(p for p in jobs.iterdir() if p.name.endswith("_s1"))[0]
    (victim / "result.json").unlink()  # as if the study had been killed while running it
    kept = {p.parent.name: p.stat().st_mtime_ns for p in jobs.glob("*/result.json")}
    capsys.readouterr()
    assert gs.main(["run", "--in-process", *argv]) == 0
    printed = capsys.readouterr().out
    assert printed.count(": running") == 1 and f"{victim.name}: running" in printed
    assert f"{len(kept)} of the jobs planned so far are finished" in printed
    assert {p.parent.name: p.stat().st_mtime_ns for p in jobs.glob("*/result.json") if p.parent != victim} == kept
    assert (victim / "result.json").is_file() and (victim / "outputs.json.gz").is_file()
    (victim / "result.json").rename(victim / "result.kept")  # killed mid-job: a RUNNING file no process holds
    (victim / "RUNNING").write_text("12345")
    assert gs.main(["status", *argv]) == 0
    printed = capsys.readouterr().out
    assert f"{len(list(jobs.iterdir())) - 1} done (" in printed and f"planned  {victim.name}" in printed
    with gs.qs._claim(victim, victim.name):  # a live claim shows as running
        assert gs.main(["status", *argv]) == 0
    assert f"running  {victim.name}" in capsys.readouterr().out


def test_job_keys_ignore_where_the_job_ran():
    design = gs.load_design(CONFIG, smoke=False)
    name, spec = gs.job(design, "lora", 3e-3, 1)
    assert name == "lora_lr0.003_n300_s1" and "job_dir" not in spec
    assert spec["arm_config"]["s2"] == design["arms"]["s2ft_odown"]["s2"]  # LoRA's rank matches O + Down's count
    assert gs.job_key(spec) == gs.job_key(json.loads(json.dumps(spec)))
    assert gs.job_key(spec) != gs.job_key({**spec, "lr": 1e-3})
    assert not math.isnan(spec["warmup_ratio"])
