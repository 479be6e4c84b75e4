"""Delta op (torch reference path): outputs and every gradient vs full-weight autograd on ``W + Δ``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from s2ft_lightning.ops import (
    backend_for,
    delta_linear,
    gather_runs,
    interpreter_problem,
    kernel_mode,
    merged_weight,
    reference_block_grads,
)

SPECS = {
    "cols": (("in", ((2, 5),)),),
    "cols2": (("in", ((0, 3), (9, 11))),),
    "rows": (("out", ((1, 4),)),),
    "rows2": (("out", ((0, 2), (7, 10))),),
    "both": (("in", ((4, 6),)), ("in", ((10, 12),))),
    # rows and columns of one weight (the op allows it; install keeps one feature per module): column grads then
    # come from the full saved input, not the gathered columns
    "mixed": (("in", ((2, 5),)), ("out", ((1, 4), (8, 10)))),
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def _blocks(weight, specs, dtype=None, transposed=False):
    """Random (non-zero) deltas shaped like each block, so the forward and input-gradient terms are tested."""
    w = weight.t() if transposed else weight
    gen = torch.Generator().manual_seed(3)
    out = []
    for f, runs in specs:
        shape = gather_runs(w, runs, dim=0 if f == "out" else 1).shape
        out.append((0.5 * torch.randn(shape, generator=gen)).to(dtype or w.dtype).requires_grad_(True))
    return out


def _check(x, weight, bias, specs, tol, transposed=False, master=None):
    x = x.detach().requires_grad_(True)
    blocks = _blocks(weight, specs, master, transposed)
    y = delta_linear(x, weight, bias, blocks, specs, transposed=transposed)
    merged = merged_weight(weight, blocks, specs, transposed)
    w = merged.t() if transposed else merged
    assert _rel(y, F.linear(x, w, bias)) <= tol
    assert not torch.equal(merged, weight)  # the deltas take part
    g = torch.randn_like(y)
    y.backward(g)
    gx, gbs = reference_block_grads(x, weight, bias, specs, g, transposed=transposed, deltas=blocks)
    assert _rel(x.grad, gx) <= tol
    for blk, ref in zip(blocks, gbs):
        assert blk.grad.dtype == blk.dtype and blk.grad.shape == blk.shape
        assert _rel(blk.grad, ref) <= tol
    assert weight.grad is None


@pytest.mark.parametrize("kind", sorted(SPECS))
@pytest.mark.parametrize("lead", [(7,), (2, 5), (1, 3, 4)])
@pytest.mark.parametrize("use_bias", [False, True])
def test_fp32_matches_full_autograd(kind, lead, use_bias):
    weight = torch.randn(13, 12)
    bias = torch.randn(13) if use_bias else None
    _check(torch.randn(*lead, 12), weight, bias, SPECS[kind], 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["cols2", "rows2"])
@pytest.mark.parametrize("master", [None, torch.float32])
def test_half_precision(dtype, kind, master):
    weight = torch.randn(13, 12).to(dtype)
    _check(torch.randn(3, 6, 12).to(dtype), weight, torch.randn(13).to(dtype), SPECS[kind], 1e-2, master=master)


@pytest.mark.parametrize("kind", ["cols2", "rows"])
def test_conv1d_transposed_storage(kind):
    weight = torch.randn(12, 13)  # Conv1D stores [in, out]
    _check(torch.randn(2, 5, 12), weight, torch.randn(13), SPECS[kind], 1e-5, transposed=True)


@pytest.mark.parametrize("kind", sorted(SPECS))
@pytest.mark.parametrize("transposed", [False, True])
def test_fp32_merged_copy_equals_the_block_terms(kind, transposed, monkeypatch):
    """fp32 with many rows multiplies by a per-call copy holding ``W + Δ`` (the frozen layer's matmuls); bf16
    keeps separate block terms (``W + Δ`` would round a small update away). Same outputs and gradients in fp32."""
    import sys

    dl = sys.modules["s2ft_lightning.ops.delta_linear"]
    monkeypatch.setattr(dl, "MERGE_MACS_PER_ELEMENT", 0)  # these tiny shapes would otherwise keep the terms
    weight = torch.randn(12, 13) if transposed else torch.randn(13, 12)
    bias, x, specs = torch.randn(13), torch.randn(2, 5, 12), SPECS[kind]
    w = weight.t() if transposed else weight
    blocks = _blocks(weight, specs, transposed=transposed)
    merged = dl._fp32_merged(w, x, blocks, specs)
    want = merged_weight(weight, blocks, specs, transposed)  # the stored layout
    torch.testing.assert_close(merged, want.t() if transposed else want)
    bf16 = weight.bfloat16()
    assert dl._fp32_merged(bf16, x.bfloat16(), _blocks(bf16, specs, torch.float32, transposed), specs) is None
    monkeypatch.setattr(dl, "MERGE_MACS_PER_ELEMENT", 10**6)
    assert dl._fp32_merged(w, x, blocks, specs) is None  # too few rows for the copy to pay
    monkeypatch.setattr(dl, "MERGE_MACS_PER_ELEMENT", 0)

    def run():
        xs = x.clone().requires_grad_(True)
        blocks = _blocks(weight, specs, transposed=transposed)
        y = delta_linear(xs, weight, bias, blocks, specs, transposed=transposed, backend="torch")
        y.backward(torch.cos(y.detach()))
        return y.detach(), xs.grad, [b.grad for b in blocks]

    got = run()
    monkeypatch.setattr(dl, "_fp32_merged", lambda *a: None)
    ref = run()
    for a, b in zip([got[0], got[1], *got[2]], [ref[0], ref[1], *ref[2]]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_no_input_grad_skips_grad_input_and_weight():
    weight = torch.randn(13, 12)
    specs = SPECS["cols"]
    blocks = _blocks(weight, specs)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = delta_linear(torch.randn(4, 12), weight, None, blocks, specs)
    assert [tuple(t.shape) for t in saved] == [(4, 3)]  # only x[:, cols], no weight, no full x
    y.sum().backward()
    assert blocks[0].grad is not None


def test_input_sliced_saves_only_k_columns():
    weight = torch.randn(13, 12)
    x = torch.randn(2, 6, 12, requires_grad=True)
    for kind, expect in (("cols2", 2 * 6 * 5), ("rows", 2 * 6 * 12)):
        saved = []
        blocks = _blocks(weight, SPECS[kind])
        with torch.autograd.graph.saved_tensors_hooks(lambda t, s=saved: s.append(t) or t, lambda t: t):
            delta_linear(x, weight, None, blocks, SPECS[kind])
        acts = [t for t in saved if t is not weight and all(t is not b for b in blocks)]  # not parameters
        # storage bytes: a view of x would pin all of x
        assert sum(t.untyped_storage().nbytes() for t in acts) == expect * 4


def test_autocast_bf16_cpu():
    weight = torch.randn(13, 12)
    specs = SPECS["cols2"]
    x = torch.randn(2, 5, 12, requires_grad=True)
    blocks = _blocks(weight, specs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = delta_linear(x, weight, None, blocks, specs)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert blocks[0].grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    gx, gbs = reference_block_grads(x, weight, None, specs, torch.ones(2, 5, 13), deltas=blocks)
    assert _rel(x.grad, gx) <= 2e-2 and _rel(blocks[0].grad, gbs[0]) <= 2e-2


def test_non_reentrant_checkpoint():
    weight = torch.randn(13, 12)
    specs = SPECS["rows2"]
    x = torch.randn(3, 12, requires_grad=True)
    blocks = _blocks(weight, specs)
    y = checkpoint(lambda t: delta_linear(t, weight, None, blocks, specs).tanh(), x, use_reentrant=False)
    y.sum().backward()
    ref = [b.grad.clone() for b in blocks] + [x.grad.clone()]
    for t in [*blocks, x]:
        t.grad = None
    delta_linear(x, weight, None, blocks, specs).tanh().sum().backward()
    for a, b in zip(ref, [*[b.grad for b in blocks], x.grad]):
        assert torch.equal(a, b)


def test_compile_fullgraph_no_graph_break():
    weight = torch.randn(13, 12)
    specs = SPECS["both"]
    blocks = _blocks(weight, specs)
    x = torch.randn(2, 3, 12, requires_grad=True)

    def f(t):
        return delta_linear(t, weight, None, blocks, specs, backend="torch").square().sum()

    torch._dynamo.reset()
    torch.compile(f, backend="aot_eager", fullgraph=True)(x).backward()
    got = [b.grad.clone() for b in blocks] + [x.grad.clone()]
    for t in [*blocks, x]:
        t.grad = None
    f(x).backward()
    for a, b in zip(got, [*[b.grad for b in blocks], x.grad]):
        assert _rel(a, b) <= 1e-6


def test_dispatch(monkeypatch):
    monkeypatch.setenv("S2FT_KERNELS", "torch")
    assert kernel_mode() == "torch" and backend_for("cpu") == "torch"
    monkeypatch.setenv("S2FT_KERNELS", "auto")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend_for("cpu") == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert backend_for("cpu") == "torch"
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        monkeypatch.setenv("S2FT_KERNELS", "triton")
        backend_for("cpu")
    monkeypatch.setenv("S2FT_KERNELS", "fast")
    with pytest.raises(ValueError, match="S2FT_KERNELS"):
        kernel_mode()


def test_interpreter_version_check_names_the_fix(monkeypatch):
    from s2ft_lightning import ops
    from s2ft_lightning.ops.kernels.block_grad import tn_matmul_triton

    why = interpreter_problem("3.6.0", "2.4.6")  # the combination that failed here; 2.3.5 / triton 3.7.1 pass
    assert "triton>=3.7" in why and "numpy<2.4" in why and "S2FT_KERNELS=torch" in why
    assert interpreter_problem("3.6.0", "2.3.5") is None and interpreter_problem("3.7.1", "2.4.6") is None
    assert interpreter_problem("3.10.0+git1", "2.5.0") is None  # numeric, not string, version order
    # With such versions installed: auto falls back to torch, a forced triton and a direct launch say why.
    monkeypatch.setattr(ops, "installed_interpreter_problem", lambda: why)  # what dispatch reads
    monkeypatch.setattr(ops.kernels, "installed_interpreter_problem", lambda: why)  # what a launch checks
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("S2FT_KERNELS", "auto")
    assert backend_for("cpu") == "torch"
    monkeypatch.setenv("S2FT_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="triton>=3.7"):
        backend_for("cpu")
    with pytest.raises(RuntimeError, match="numpy<2.4"):
        tn_matmul_triton(torch.randn(4, 3), torch.randn(4, 2))


def test_bad_inputs():
    weight = torch.randn(13, 12)
    blocks = _blocks(weight, SPECS["cols"])
    with pytest.raises(TypeError, match="autocast"):
        delta_linear(torch.randn(2, 12, dtype=torch.float64), weight, None, blocks, SPECS["cols"])
    with pytest.raises(ValueError, match="one spec per delta"):
        delta_linear(torch.randn(2, 12), weight, None, blocks, SPECS["both"])
    with pytest.raises(ValueError, match="frozen"):
        delta_linear(torch.randn(2, 12), weight.requires_grad_(True), None, blocks, SPECS["cols"])
