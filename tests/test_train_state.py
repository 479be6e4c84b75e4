"""One source of truth for the trained state: the S2 delta parameters (docs/ARCHITECTURE.md, "Trained state").

Any optimizer trains identically and reaches the next forward; whatever is saved (state dicts, save_pretrained,
adapters), at any moment, is what was trained; weight decay decays the update, not the pretrained weights;
preparation is all-or-nothing; bad inputs are refused by name with nothing changed.
"""

from __future__ import annotations

import functools

import pytest
import torch
import transformers

from benchmarks.tiny_models import perturb
from s2ft_lightning import (
    S2Config,
    extract_adapter,
    merge_adapter,
    prepare_model,
    state_dict_form,
    trainable_state_dict,
)
from s2ft_lightning.adapters import AdapterError
from s2ft_lightning.layers import S2InstallError, block_parameters, install, installed
from s2ft_lightning.optim import S2AdamW
from s2ft_lightning.pipeline import applied_plan
from surgery.plan import PlanError, S2Plan
from surgery.planner import make_plan

# O and V (heads) plus Down and Up (channels): column and row blocks, GQA runs.
S2 = S2Config(o_ratio=0.25, v_ratio=0.5, d_ratio=0.1, u_ratio=0.05, seed=1)
STEPS = 5


def _base(seed: int = 0) -> transformers.LlamaForCausalLM:
    """Tiny GQA Llama (hidden 64, 2 layers, 8 q / 2 kv heads) with every parameter and buffer perturbed."""
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(seed)
    return perturb(transformers.LlamaForCausalLM(cfg), seed).eval()


def _batches():
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(0, 96, (4, 12), generator=gen) for _ in range(STEPS)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


OPTIMIZERS = {
    # family -> form -> factory; the for-loop form of each family is its reference
    "adamw": {
        "for-loop": lambda p: torch.optim.AdamW(p, lr=5e-3, weight_decay=0.1, foreach=False),
        "foreach": lambda p: torch.optim.AdamW(p, lr=5e-3, weight_decay=0.1, foreach=True),
        "fused": lambda p: torch.optim.AdamW(p, lr=5e-3, weight_decay=0.1, fused=True),
        "s2adamw-torch": lambda p: S2AdamW(p, lr=5e-3, weight_decay=0.1, backend="torch"),
        "s2adamw-triton": lambda p: S2AdamW(p, lr=5e-3, weight_decay=0.1, backend="triton"),
    },
    "adam": {
        "for-loop": lambda p: torch.optim.Adam(p, lr=5e-3, foreach=False),
        "foreach": lambda p: torch.optim.Adam(p, lr=5e-3, foreach=True),
        "fused": lambda p: torch.optim.Adam(p, lr=5e-3, fused=True),
    },
    "sgd": {
        "for-loop": lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9, weight_decay=0.01, foreach=False),
        "foreach": lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9, weight_decay=0.01, foreach=True),
        "fused": lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9, weight_decay=0.01, fused=True),
    },
    "adafactor": {
        "for-loop": lambda p: torch.optim.Adafactor(p, lr=5e-2, foreach=False),
        "foreach": lambda p: torch.optim.Adafactor(p, lr=5e-2, foreach=True),
    },
}


def _train(family: str, form: str):
    """(losses, deltas, model, plan) after STEPS steps; the loss is read before each step's update."""
    model = _base()
    plan = prepare_model(model, S2)
    opt = OPTIMIZERS[family][form](block_parameters(model))
    losses = []
    for ids in _batches():
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    return losses, [p.detach().clone() for p in block_parameters(model)], model, plan


@functools.cache
def _reference(family: str):
    losses, deltas, _, _ = _train(family, "for-loop")
    return losses, deltas


@functools.cache
def _untrained_losses() -> list[float]:
    model = _base()
    with torch.no_grad():
        return [float(model(ids, labels=ids).loss) for ids in _batches()]


CASES = [(f, form) for f, forms in OPTIMIZERS.items() for form in forms if form != "for-loop"]


@pytest.mark.parametrize("family, form", CASES, ids=[f"{f}-{form}" for f, form in CASES])
def test_every_optimizer_form_trains_identically_and_reaches_the_forward(family, form):
    ref_losses, ref_deltas = _reference(family)
    losses, deltas, model, plan = _train(family, form)
    # updates reached the forward (a fused step used to be invisible: every loss equal to the untrained model's)
    assert all(a != b for a, b in zip(losses[1:], _untrained_losses()[1:]))
    for a, b in zip(losses, ref_losses):
        assert abs(a - b) <= 1e-5 * abs(b)
    for a, b in zip(deltas, ref_deltas):
        assert _rel(a, b) <= 1e-5
    # The live forward is the stock base with the extracted adapter merged.
    ids = _batches()[0]
    stock = _base()
    merge_adapter(stock, extract_adapter(model, plan))
    assert _rel(_logits(stock, ids), _logits(model, ids)) <= 1e-5


def test_what_is_saved_right_after_a_step_is_what_was_trained(tmp_path):
    model = _base()
    plan = prepare_model(model, S2)
    opt = torch.optim.AdamW(block_parameters(model), lr=1e-2, fused=True)
    ids = _batches()[0]
    model(ids, labels=ids).loss.backward()
    opt.step()  # no forward after the step: nothing may still be waiting to be synced
    want = _logits(model, ids)
    # state_dict: stock keys holding base + delta; a stock model loading it computes the trained function
    stock = _base(seed=5)
    stock.load_state_dict(model.state_dict())
    assert _rel(_logits(stock, ids), want) <= 1e-5
    # save_pretrained -> stock from_pretrained (the permuted layout is function-equivalent)
    model.save_pretrained(tmp_path / "saved")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    assert _rel(_logits(reloaded, ids), want) <= 1e-5
    # an adapter extracted now, on an unpermuted stock base
    fresh = _base()
    merge_adapter(fresh, extract_adapter(model, plan))
    assert _rel(_logits(fresh, ids), want) <= 1e-5
    # the trainable-only form holds exactly the deltas
    assert set(trainable_state_dict(model)) == {n for n, p in model.named_parameters() if p.requires_grad}
    with state_dict_form("split"):
        split = model.state_dict()
    assert {k for k in split if "delta_" in k} == set(trainable_state_dict(model))


def test_weight_decay_decays_the_update_toward_the_pretrained_values():
    lr, wd = 1e-2, 0.5
    model = _base()
    plan = prepare_model(model, S2)
    opt = torch.optim.AdamW(block_parameters(model), lr=lr, weight_decay=wd)
    # Reference: masked full fine-tuning of the same permuted model where decoupled decay acts on W - W0.
    ref = _base()
    prepare_model(ref, S2, plan=S2Plan.from_dict(plan.to_dict()))
    from s2ft_lightning.layers import uninstall

    uninstall(ref, merge=False)
    params = dict(ref.named_parameters())
    masks, w0 = {}, {}
    for s in plan.slices:
        w = params[f"{s.module}.weight"]
        mask = masks.setdefault(w, torch.zeros_like(w, dtype=torch.bool))
        for a, b in s.runs:
            (mask[a:b] if s.feature == "out" else mask[:, a:b]).fill_(True)
        w0[w] = w.detach().clone()
    ref_opt = torch.optim.Adam(list(masks), lr=lr)
    for ids in _batches():
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
        ref_opt.zero_grad()
        ref(ids, labels=ids).loss.backward()
        with torch.no_grad():
            for w, mask in masks.items():
                w.grad.mul_(mask)
                w.sub_(lr * wd * (w - w0[w]) * mask)  # AdamW's decay, applied to the update only
        ref_opt.step()
    ids = _batches()[0]
    assert _rel(_logits(model, ids), _logits(ref, ids)) <= 1e-5
    # With no gradient at all, decay leaves the pretrained weights alone (it used to shrink them toward 0).
    still = _base()
    prepare_model(still, S2)
    before = _logits(still, ids)
    decay_only = torch.optim.AdamW(block_parameters(still), lr=0.1, weight_decay=1.0)
    for p in block_parameters(still):
        p.grad = torch.zeros_like(p)
    decay_only.step()
    assert torch.equal(_logits(still, ids), before)


def _stage_failure(name, monkeypatch):
    """Make one preparation stage refuse; returns (kwargs for prepare_model, expected exception type)."""
    model_for_plan = _base()
    plan = make_plan(model_for_plan, **S2.ratios(), seed=1)
    if name == "another-model":
        other = S2Plan.from_dict({**plan.to_dict(), "fingerprint": "0" * 16})
        return {"plan": other}, PlanError
    if name == "edited-plan":
        d = plan.to_dict()
        d["slices"][0]["original"] = list(reversed(d["slices"][0]["original"]))
        return {"plan": S2Plan.from_dict(d)}, PlanError
    if name == "verification":
        import surgery.verify

        # with a plan given no analysis (and so no probe) runs: the refusal comes from the final verification
        monkeypatch.setitem(surgery.verify.DTYPE_TOLERANCE, torch.float32, -1.0)
        return {"plan": plan}, surgery.verify.VerificationError
    if name == "install":
        from s2ft_lightning import layers

        def refuse(*a, **k):
            raise S2InstallError("injected refusal after the permutation")

        monkeypatch.setattr(layers, "install", refuse)
        return {}, S2InstallError
    raise AssertionError(name)


@pytest.mark.parametrize("stage", ["another-model", "edited-plan", "verification", "install"])
def test_a_refusal_at_any_stage_leaves_the_model_bit_identical_and_preparable(stage, monkeypatch):
    model = _base()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    kwargs, exc = _stage_failure(stage, monkeypatch)
    with pytest.raises(exc):
        prepare_model(model, S2, **kwargs)
    assert {n: p for n, p in model.named_parameters()}.keys() == before.keys()
    assert all(torch.equal(p, before[n]) and p.requires_grad for n, p in model.named_parameters())
    assert applied_plan(model) is None and not installed(model)
    monkeypatch.undo()
    plan = prepare_model(model, S2)
    assert plan.certificate["passed"] and installed(model)


def test_edited_plan_file_is_refused_before_training(tmp_path):
    plan = make_plan(_base(), **S2.ratios(), seed=1)
    for edit in ("shift", "reverse"):
        d = plan.to_dict()
        s = next(x for x in d["slices"] if x["feature"] == "in")
        if edit == "shift":
            s["runs"] = [[a + 1, b + 1] for a, b in s["runs"]]
        else:
            s["original"] = list(reversed(s["original"]))
        S2Plan.from_dict(d).save(tmp_path / f"{edit}.json")
        model = _base()
        with pytest.raises(PlanError, match="was the plan file edited"):
            prepare_model(model, S2, plan=S2Plan.load(tmp_path / f"{edit}.json"))
        assert applied_plan(model) is None


def test_bad_inputs_are_refused_by_name_with_nothing_changed():
    with pytest.raises(ValueError, match="master_dtype='fp16' is not one of"):
        S2Config(master_dtype="fp16")
    # a model on the meta device
    with torch.device("meta"):
        meta = transformers.LlamaForCausalLM(_base().config)
    with pytest.raises(ValueError, match="meta device"):
        prepare_model(meta, S2)
    # a plan installed on a model it did not permute
    model = _base()
    plan = make_plan(model, **S2.ratios(), seed=1)
    with pytest.raises(S2InstallError, match="was not permuted by it"):
        install(model, plan)
    assert not installed(model)
    # non-finite merge scales
    trained = _base()
    trained_plan = prepare_model(trained, S2)
    for p in block_parameters(trained):
        torch.nn.init.normal_(p)
    adapter = extract_adapter(trained, trained_plan)
    stock = _base()
    before = {n: p.clone() for n, p in stock.state_dict().items()}
    for scale in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(AdapterError, match="not finite"):
            merge_adapter(stock, adapter, scale=scale)
    assert all(torch.equal(v, before[k]) for k, v in stock.state_dict().items())


def test_package_root_exports_what_a_user_needs():
    import s2ft_lightning

    for name in (
        "prepare_model", "S2Config", "S2FTModule", "S2FT", "load_checkpoint", "extract_adapter", "save_adapter",
        "load_adapter", "merge_adapter", "AdapterBank", "export_merged", "merged_copy", "trainable_state_dict",
    ):  # fmt: skip
        assert name in s2ft_lightning.__all__ and getattr(s2ft_lightning, name) is not None


def test_saving_an_adapter_does_not_import_lightning():
    import subprocess
    import sys

    code = (
        "import sys, s2ft_lightning.adapters, s2ft_lightning.layers, s2ft_lightning.pipeline; "
        "assert 'lightning' not in sys.modules and 'lightning.pytorch' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
