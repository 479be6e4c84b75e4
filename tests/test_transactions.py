"""All-or-nothing preparation (docs/ARCHITECTURE.md, invariant 7): an exception or a KeyboardInterrupt at any stage
(probe, permute, verify, install, quantize, the Lightning hooks) leaves the model bit-identical and preparable
again; a failure that cannot be undone (sharding, a failed rollback) leaves a marker every later call refuses.

"Bit-identical" is `whole_state`: every parameter and buffer (values and objects), requires_grad flags, module
classes and training flags, hook tables and the attributes of every module.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sys
import types

import pytest
import torch
from tiny_models import tiny_llama

import s2ft_lightning
import surgery
import surgery.permute
import surgery.probe
import surgery.verify
from benchmarks.tiny_models import tiny_model
from s2ft_lightning import S2Config, layers, prepare_model
from s2ft_lightning.pipeline import applied_plan
from surgery.planner import unapply_plan
from surgery.transaction import ModelStateError, record_of

S2 = S2Config(o_ratio=0.5, v_ratio=0.5, u_ratio=0.1, d_ratio=0.1, seed=3)
_HOOKS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def whole_state(model: torch.nn.Module) -> dict:
    """Everything preparation may change, in a form ``==`` compares exactly."""
    tensors = {
        f"p:{n}": (p.detach().clone(), p.requires_grad, id(p))
        for n, p in model.named_parameters(remove_duplicate=False)
    }
    tensors |= {f"b:{n}": (b.clone(), False, id(b)) for n, b in model.named_buffers(remove_duplicate=False)}
    return {
        "tensors": tensors,
        "modules": {
            n: (type(m), m.training, sorted(m.__dict__), tuple(len(getattr(m, h)) for h in _HOOKS))
            for n, m in model.named_modules()
        },  # fmt: skip
        "attn": getattr(model.config, "_attn_implementation", None),
    }


def assert_same(model: torch.nn.Module, before: dict) -> None:
    now = whole_state(model)
    assert now["modules"] == before["modules"] and now["attn"] == before["attn"]
    assert now["tensors"].keys() == before["tensors"].keys()
    for k, (t, flag, ident) in now["tensors"].items():
        t0, flag0, ident0 = before["tensors"][k]
        assert torch.equal(t, t0) and t.dtype == t0.dtype, f"{k} changed"
        assert (flag, ident) == (flag0, ident0), f"{k}: requires_grad or object changed"
    assert record_of(model) is None


def _fail_on_call(monkeypatch, module, name: str, n: int, exc: type[BaseException]):
    """Make ``module.name`` raise ``exc`` on its n-th call (the earlier calls do the real work)."""
    real, calls = getattr(module, name), []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise exc(f"injected into {name}")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


# (stage, where, function, which call fails): each fails after earlier calls of the stage changed the model.
STAGES = {
    "probe-move": (surgery.permute, "_apply_member", 7),  # the probe's 7th member move
    "probe-forward": (surgery.probe, "forward_logits", 2),  # the forward with every coupling moved
    "permute": (surgery.permute, "_apply_member", None),  # a move of apply_plan, after the probe's moves
    "verify-forward": (surgery.verify, "forward_logits", 2),  # the forward after the plan's moves
    "install": (layers, "_set_child", 3),  # the third module swap
}


def _moves_before_apply(monkeypatch) -> int:
    """How many member moves the analysis probe makes (moves and undoes), so apply_plan's can be hit."""
    calls = _fail_on_call(monkeypatch, surgery.permute, "_apply_member", 10**9, RuntimeError)
    from surgery.analyze import analyze

    analyze(tiny_llama())
    monkeypatch.undo()
    return len(calls)


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt], ids=["exception", "interrupt"])
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_failure_at_any_stage_leaves_the_model_bit_identical_and_preparable(stage, exc, monkeypatch):
    module, name, n = STAGES[stage]
    if n is None:
        n = _moves_before_apply(monkeypatch) + 3
    model = tiny_llama()
    before = whole_state(model)
    calls = _fail_on_call(monkeypatch, module, name, n, exc)
    with pytest.raises(exc, match="injected"):
        prepare_model(model, S2)
    assert len(calls) >= n  # the failure came after the stage had changed the model
    assert_same(model, before)
    monkeypatch.undo()
    plan = prepare_model(model, S2)
    ref = tiny_llama()
    assert plan.certificate["passed"] and plan.to_dict()["slices"] == prepare_model(ref, S2).to_dict()["slices"]


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt], ids=["exception", "interrupt"])
def test_expert_install_and_quantize_are_undone(exc, monkeypatch):
    pytest.importorskip("torchao")
    from s2ft_lightning import experts, quantize

    moe = tiny_model("qwen3_moe")
    before = whole_state(moe)
    _fail_on_call(monkeypatch, layers, "attach_expert_blocks", 2, exc)  # the second experts module
    with pytest.raises(exc, match="injected"):
        prepare_model(moe, S2Config(d_ratio=0.25, u_ratio=0.25, seed=1))
    assert_same(moe, before)
    assert not any(isinstance(m, experts.S2ExpertsMixin) for m in moe.modules())
    monkeypatch.undo()
    prepare_model(moe, S2Config(d_ratio=0.25, u_ratio=0.25, seed=1))

    model = tiny_llama()
    prepare_model(model, S2)
    prepared = whole_state(model)
    _fail_on_call(monkeypatch, quantize, "_swap_weight", 5, exc)  # four weights already quantized
    with pytest.raises(exc, match="injected"):
        quantize.quantize_base(model, "nf4")
    state = whole_state(model)
    assert state["modules"] == prepared["modules"]
    assert all(
        torch.equal(a[0], b[0]) and a[2] == b[2]
        for a, b in zip(state["tensors"].values(), prepared["tensors"].values())
    )
    assert quantize.quantized_mode(model) == "none" and not any(quantize.is_quantized(p) for p in model.parameters())
    monkeypatch.undo()
    assert quantize.quantize_base(model, "nf4") > 0
    with pytest.raises(ValueError, match="already quantized as 'nf4'"):
        quantize.quantize_base(model, "int8")  # never a mixed base


def test_refusals_decidable_before_anything_moves_come_first():
    pytest.importorskip("torchao")
    from s2ft_lightning.attach import S2Attachment

    class Holder(torch.nn.Module):
        def __init__(self, model, mesh=None):
            super().__init__()
            self.model = model
            if mesh is not None:
                self.device_mesh = mesh

    for model_type, kw, quant, mesh, match in (
        ("gpt2", {}, "nf4", None, "Conv1D"),
        ("llama", {}, "nf4", types.SimpleNamespace(mesh_dim_names=None), "under FSDP"),
        ("llama", {"intermediate_size": 33}, "nf4", None, "not a multiple of it"),  # 33x32 weights
    ):
        model = tiny_model(model_type, **kw)
        before = whole_state(model)
        attachment = S2Attachment(S2, quantize=quant)
        with pytest.raises(ValueError, match=match):
            attachment.prepare(Holder(model, mesh))
        assert_same(model, before)


def test_sharding_failing_midway_leaves_a_marker_every_later_call_refuses(monkeypatch):
    from s2ft_lightning import attach

    class Holder(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model
            self.device_mesh = object()

    monkeypatch.setattr(attach, "data_parallel_mesh", lambda mesh: mesh)
    monkeypatch.setattr(attach, "shard", lambda model, mesh: (_ for _ in ()).throw(RuntimeError("gloo died")))
    model = tiny_llama()
    holder = Holder(model)
    with pytest.raises(RuntimeError, match="gloo died"):
        attach.S2Attachment(S2).prepare(holder)
    for call in (
        lambda: prepare_model(model, S2),
        lambda: layers.block_parameters(model),
        lambda: layers.uninstall(model),
        lambda: unapply_plan(model),
        lambda: s2ft_lightning.extract_adapter(model, applied_plan(model)),
        lambda: surgery.analyze(model),
    ):
        with pytest.raises(ModelStateError, match="sharding the model .* reload the model"):
            call()


def test_a_rollback_that_cannot_complete_leaves_the_marker(monkeypatch):
    model = tiny_llama()
    real = surgery.permute._apply_member
    calls = []

    def broken(t, m, idx):  # the probe's 10th move fails, and so does undoing the 9th
        calls.append(1)
        if len(calls) in (10, 11):
            raise RuntimeError(f"disk on fire {len(calls)}")
        real(t, m, idx)

    monkeypatch.setattr(surgery.permute, "_apply_member", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        prepare_model(model, S2)
    monkeypatch.undo()
    with pytest.raises(
        ModelStateError, match=r"could not be restored: undoing the move of .* disk on fire 11\). .* reload the model"
    ):
        prepare_model(model, S2)


def test_preparing_again_with_another_config_is_refused_not_ignored():
    model = tiny_llama()
    plan = prepare_model(model, S2)
    assert prepare_model(model, S2) is plan and prepare_model(model) is plan  # same config or none: idempotent
    with pytest.raises(surgery.PlanError, match=r"another S2 config \(d_ratio=0.25 \(prepared with 0.1\)"):
        prepare_model(model, S2Config(o_ratio=0.5, v_ratio=0.5, u_ratio=0.1, d_ratio=0.25, seed=3))
    with pytest.raises(surgery.PlanError, match="master_dtype"):
        prepare_model(model, S2Config(o_ratio=0.5, v_ratio=0.5, u_ratio=0.1, d_ratio=0.1, seed=3, master_dtype="base"))
    assert applied_plan(model) is plan


def test_whether_a_strategy_needs_data_has_one_answer():
    """surgery.config's needs_data decides for prepare_model, S2Attachment and S2FTModule alike."""
    from s2ft_lightning.attach import S2Attachment

    class Holder(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

    for strategy in ("random", "weight"):
        cfg = S2Config(d_ratio=0.1, strategy=strategy)
        assert not cfg.needs_data
        prepare_model(tiny_llama(), cfg)
        S2Attachment(cfg).prepare(Holder(tiny_llama()))  # no trainer, no data: fine
    for strategy in ("activation", "weight_activation", "gradient"):
        cfg = S2Config(d_ratio=0.1, strategy=strategy)
        model = tiny_llama()
        before = whole_state(model)
        with pytest.raises(surgery.SelectionError, match="calibration batches"):
            prepare_model(model, cfg)
        with pytest.raises(ValueError, match="no training data is reachable"):
            S2Attachment(cfg).prepare(Holder(model))
        assert_same(model, before)


# ---- an interrupt at the N-th executed line of project code ------------------------------------------------
_OURS = tuple(os.path.dirname(os.path.realpath(m.__file__)) + os.sep for m in (surgery, s2ft_lightning))


# The stages that change the model: where extra interrupt points are drawn.
_STAGES = ("probe_structures", "apply_plan", "install")


class _LineInterrupt:
    """A trace function that sends SIGINT at the N-th executed line of surgery/ or s2ft_lightning/ code, as a
    Ctrl-C would arrive (so code that holds interrupts back around a change and its undo entry is honoured).
    It also records the line span of each stage in `_STAGES`."""

    def __init__(self, at: int | None) -> None:
        self.at, self.count, self._ours = at, 0, {}
        self.spans: dict[str, list[int]] = {}

    def __call__(self, frame, event, arg):
        code = frame.f_code
        ours = self._ours.get(code)
        if ours is None:
            ours = self._ours[code] = os.path.realpath(code.co_filename).startswith(_OURS)
        if ours and code.co_name in _STAGES:
            self.spans.setdefault(code.co_name, [self.count, self.count])
        return self._line if ours else None

    def _line(self, frame, event, arg):
        if event == "line":
            self.count += 1
            if self.count == self.at:
                signal.raise_signal(signal.SIGINT)
        elif event == "return" and frame.f_code.co_name in self.spans:
            self.spans[frame.f_code.co_name][1] = self.count
        return self._line

    def run(self, fn):
        old = sys.gettrace()
        sys.settrace(self)
        try:
            return fn()
        finally:
            sys.settrace(old)


@pytest.mark.parametrize("model_type", ["llama", "qwen3_moe"])
def test_an_interrupt_at_any_line_of_preparation_leaves_the_model_whole(model_type):
    """Ctrl-C at a spread of executed lines of `prepare_model` (probe, permute, verify, install): the model is
    bit-identical and preparable again, or fully prepared when the interrupt came after the commit."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("needs Python's default SIGINT handler")
    make = tiny_llama if model_type == "llama" else (lambda: tiny_model("qwen3_moe"))
    cfg = S2 if model_type == "llama" else S2Config(o_ratio=0.25, d_ratio=0.25, u_ratio=0.25, seed=1)
    counter, fresh = _LineInterrupt(None), make()
    reference = counter.run(lambda: prepare_model(fresh, cfg))
    assert set(counter.spans) == set(_STAGES)
    model = make()
    before = whole_state(model)
    rng = random.Random(0)
    # a spread over the whole run, and more inside each stage that moves weights or modules
    points = [rng.randrange(k * counter.count // 3, (k + 1) * counter.count // 3) + 1 for k in range(3)]
    points += [rng.randrange(a, b) + 1 for a, b in counter.spans.values()]
    for at in sorted(points):
        with contextlib.suppress(KeyboardInterrupt):
            _LineInterrupt(at).run(lambda: prepare_model(model, cfg))
        if applied_plan(model) is not None:  # the interrupt came after the commit: a whole preparation
            assert record_of(model).marker is None and layers.installed(model)
            layers.uninstall(model, merge=False)
            unapply_plan(model, verify=False)
        assert_same(model, before)
    plan = prepare_model(model, cfg)
    assert plan.certificate["passed"] and plan.slices == reference.slices


# ---- experts in the declared layouts (transposed, interleaved, stacked 2-D): the same guarantee ---------------
def _fail_on_expert_move(monkeypatch, skip: int, n: int, exc: type[BaseException]) -> list:
    """Make the n-th move of an experts tensor after the first ``skip`` moves (the probe's) raise ``exc``."""
    real, calls, hits = surgery.permute._apply_member, [], []

    def wrapper(t, m, idx):
        calls.append(1)
        if len(calls) > skip and ".experts." in m.param:
            hits.append(1)
            if len(hits) == n:
                raise exc("injected into an experts move")
        return real(t, m, idx)

    monkeypatch.setattr(surgery.permute, "_apply_member", wrapper)
    return hits


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt], ids=["exception", "interrupt"])
@pytest.mark.parametrize(
    ("model_type", "stage"),
    [("gpt_oss", "install"), ("dbrx", "install"), ("llama4_text", "permute"), ("dbrx", "permute")],
)
def test_declared_expert_layouts_fail_whole(model_type, stage, exc, monkeypatch):
    """A failure while moving transposed / stacked experts tensors, or while swapping in their S2 forward (the
    second experts module), leaves the model bit-identical and preparable."""
    from s2ft_lightning import experts
    from surgery.analyze import analyze

    cfg = S2Config(o_ratio=0.5, d_ratio=0.25, u_ratio=0.25, seed=1)
    model = tiny_model(model_type)
    before = whole_state(model)
    if stage == "install":
        _fail_on_call(monkeypatch, layers, "attach_expert_blocks", 2, exc)
    else:
        probe = _fail_on_call(monkeypatch, surgery.permute, "_apply_member", 10**9, RuntimeError)
        analyze(tiny_model(model_type))
        monkeypatch.undo()
        _fail_on_expert_move(monkeypatch, len(probe), 5, exc)
    with pytest.raises(exc, match="injected"):
        prepare_model(model, cfg)
    assert_same(model, before)
    assert not any(isinstance(m, experts.S2ExpertsMixin) for m in model.modules())
    monkeypatch.undo()
    assert prepare_model(model, cfg).certificate["passed"]
    assert any(isinstance(m, experts.S2ExpertsMixin) for m in model.modules())
