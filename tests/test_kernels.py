"""Triton kernels under the interpreter (CPU) vs the torch reference; CUDA variants skip without a GPU."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("Triton kernels need TRITON_INTERPRET=1 or a GPU", allow_module_level=True)

from s2ft_lightning.ops import delta_linear, gather_runs, reference_block_grads, tn_matmul_torch  # noqa: E402
from s2ft_lightning.ops.kernels.adamw import CHUNK, multi_tensor_adamw_  # noqa: E402
from s2ft_lightning.ops.kernels.block_grad import tn_matmul_triton  # noqa: E402
from s2ft_lightning.optim import S2AdamW  # noqa: E402

cuda = pytest.mark.cuda
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# CPU-tensor tests run the kernels under the interpreter only (with real Triton they need CUDA tensors).
interp = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


# Per-dtype tolerances (relative to the largest reference value), as Liger-Kernel's tests use: the reference
# is computed in fp32 from the same (rounded) inputs, so these bound accumulation and output rounding only.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
DTYPES = list(TOL)

CASES = [
    # (N, a_cols, b_cols, a_runs, b_runs); odd sizes everywhere so no tile divides them
    (37, 45, 12, None, ((2, 5), (9, 11))),  # columns: gᵀ x[:, cols], 2 runs
    (37, 45, 30, ((0, 3), (40, 45)), None),  # rows: g[:, rows]ᵀ x, 2 runs
    (37, 45, 5, None, None),  # pre-gathered columns
    (200, 33, 70, None, ((64, 70),)),  # split-K over N (atomics), tile edge
    (1, 7, 3, None, ((1, 2),)),  # a single token, one column
]


@interp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_block_grad_kernel_matches_torch(dtype, case):
    n, ma, mb, ar, br = case
    a, b = torch.randn(n, ma).to(dtype), torch.randn(n, mb).to(dtype)
    ref = tn_matmul_torch(a.float(), b.float(), ar, br)
    # write into a strided window of a sentinel-filled buffer: nothing outside may change
    guard = torch.full((ref.shape[0] + 3, ref.shape[1] + 5), 7.0)
    out = guard[1 : 1 + ref.shape[0], 2 : 2 + ref.shape[1]]
    out.zero_()
    before = guard.clone()
    got = tn_matmul_triton(a, b, ar, br, out=out, split=1 if n < 100 else 3)
    assert got.dtype == torch.float32
    assert _rel(got, ref) <= 1e-5  # fp32 accumulation of the same inputs: tight for every input dtype
    mask = torch.ones_like(guard, dtype=torch.bool)
    mask[1 : 1 + ref.shape[0], 2 : 2 + ref.shape[1]] = False
    assert torch.equal(guard[mask], before[mask])


@interp
def test_block_grad_kernel_rejects_bad_shapes():
    with pytest.raises(ValueError, match="equal rows"):
        tn_matmul_triton(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="fp32"):
        tn_matmul_triton(torch.randn(4, 3), torch.randn(4, 2), out=torch.empty(3, 2, dtype=torch.float64))


@interp
def test_deterministic_mode_runs_split_k_without_atomics(monkeypatch):
    import s2ft_lightning.ops.kernels.block_grad as bg

    grids = []
    launch = bg._tn_kernel

    class Spy:
        def __getitem__(self, grid):
            grids.append(grid)
            return launch[grid]

    monkeypatch.setattr(bg, "_tn_kernel", Spy())
    a, b = torch.randn(300, 20), torch.randn(300, 9)
    split = tn_matmul_triton(a, b, split=3)
    torch.use_deterministic_algorithms(True)
    try:
        det = tn_matmul_triton(a, b, split=3)
    finally:
        torch.use_deterministic_algorithms(False)
    assert grids[0][2] == 3 and grids[1][2] == 1  # one program per tile: no atomics, run-to-run identical
    assert _rel(det, split) <= 1e-5 and _rel(det, tn_matmul_torch(a, b)) <= 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "specs",
    [(("in", ((2, 5), (9, 11))),), (("out", ((0, 3), (40, 45))),), (("in", ((0, 4),)), ("in", ((6, 8),)))],
)
@interp
def test_delta_linear_triton_backend(dtype, specs):
    weight = torch.randn(45, 12).to(dtype)
    x = torch.randn(37, 12).to(dtype).requires_grad_(True)
    blocks = [
        (0.1 * torch.randn_like(gather_runs(weight, r, dim=0 if f == "out" else 1).float())).requires_grad_(True)
        for f, r in specs
    ]
    y = delta_linear(x, weight, None, blocks, specs, backend="triton")
    g = torch.randn_like(y)
    y.backward(g)
    gx, gbs = reference_block_grads(x.float(), weight.float(), None, specs, g.float(), deltas=blocks)
    tol = TOL[dtype]
    assert y.dtype == dtype and x.grad.dtype == dtype
    assert _rel(x.grad, gx) <= tol
    for blk, ref in zip(blocks, gbs):
        assert blk.grad.dtype == torch.float32 and _rel(blk.grad, ref) <= tol


def _adamw_pair(shapes, wd=0.1):
    """Params as contiguous windows of one sentinel buffer (to catch stray writes), and torch copies."""
    total = sum(torch.Size(s).numel() for s in shapes) + 8 * (len(shapes) + 1)
    buf = torch.full((total,), 3.0)
    ours, off = [], 8
    for s in shapes:
        n = torch.Size(s).numel()
        buf[off : off + n] = torch.randn(n)
        ours.append(torch.nn.Parameter(buf[off : off + n].view(s)))
        off += n + 8
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    return buf, ours, ref


@interp
def test_s2adamw_matches_torch_adamw(monkeypatch):
    monkeypatch.setenv("S2FT_KERNELS", "triton")
    shapes = [(7, 5), (CHUNK + 37,), (3, 33)]
    buf, ours, ref = _adamw_pair(shapes)
    o1 = S2AdamW(ours, lr=1e-2, weight_decay=0.1)
    o2 = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, foreach=False)
    for _ in range(3):
        for a, b in zip(ours, ref):
            g = torch.randn_like(a)
            a.grad, b.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    for a, b in zip(ours, ref):
        assert _rel(a, b) <= 1e-6
    gaps = torch.ones_like(buf, dtype=torch.bool)
    off = 8
    for s in shapes:
        n = torch.Size(s).numel()
        gaps[off : off + n] = False
        off += n + 8
    assert torch.equal(buf[gaps], torch.full_like(buf[gaps], 3.0))
    # state_dict layout is AdamW's: torch can continue from ours
    o2.load_state_dict(o1.state_dict())
    assert set(o2.state[ref[0]]) == {"step", "exp_avg", "exp_avg_sq"}


@interp
def test_multi_tensor_adamw_rejects_non_contiguous():
    p = torch.randn(4, 6)[:, 1:3]
    with pytest.raises(ValueError, match="contiguous fp32"):
        multi_tensor_adamw_(
            [p], [torch.zeros_like(p)], [torch.zeros_like(p)], [torch.zeros_like(p)],
            step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
        )  # fmt: skip


@cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_grad_kernel_cuda(dtype):
    n, m, k = 4096, 1024, 100
    a, b = torch.randn(n, m, device="cuda").to(dtype), torch.randn(n, 3 * k, device="cuda").to(dtype)
    runs = ((0, 60), (200, 240))
    ref = tn_matmul_torch(a.double(), b.double(), None, runs)
    got = tn_matmul_triton(a, b, None, runs)
    assert _rel(got, ref) <= (1e-3 if dtype == torch.float32 else 1e-2)


@cuda
@needs_gpu
def test_s2adamw_cuda():
    ps = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in [(4096, 11), (333,), (5, 7)]]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    o1 = S2AdamW(ps, lr=1e-3, backend="triton")
    o2 = torch.optim.AdamW(qs, lr=1e-3, foreach=False)
    for _ in range(3):
        for a, b in zip(ps, qs):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        o1.step()
        o2.step()
    for a, b in zip(ps, qs):
        assert _rel(a, b) <= 1e-5


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama_blocks_triton_equals_torch(monkeypatch, dtype):
    transformers = pytest.importorskip("transformers")
    from s2ft_lightning.layers import block_parameters, install
    from surgery.plan import BlockSlice

    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, attn_implementation="eager",
    )  # fmt: skip
    slices = [
        BlockSlice("model.layers.0.self_attn.o_proj", "o", "in", [(0, 8), (16, 24)], list(range(16))),
        BlockSlice("model.layers.0.mlp.up_proj", "up", "out", [(5, 12)], list(range(7))),
        BlockSlice("model.layers.0.mlp.down_proj", "down", "in", [(40, 48)], list(range(8))),
    ]
    grads = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("S2FT_KERNELS", backend)
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg).to(dtype)
        install(model, slices)
        ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
        model(ids, labels=ids).loss.backward()
        grads[backend] = [p.grad for p in block_parameters(model)]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(grads["triton"], grads["torch"]):
        assert a.dtype == torch.float32 and _rel(a, b) <= tol


@cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_delta_linear_triton_cuda(dtype):
    specs = (("in", ((0, 96), (512, 608))),)
    weight = torch.randn(1024, 1024, device="cuda").to(dtype)
    x = torch.randn(3, 700, 1024, device="cuda").to(dtype).requires_grad_(True)
    blocks = [(0.1 * torch.randn(1024, 192, device="cuda")).requires_grad_(True)]
    y = delta_linear(x, weight, None, blocks, specs, backend="triton")
    g = torch.randn_like(y)
    y.backward(g)
    gx, gbs = reference_block_grads(
        x.double(), weight.double(), None, specs, g.double(), deltas=[b.double() for b in blocks]
    )
    tol = 1e-3 if dtype == torch.float32 else 2e-2
    assert _rel(x.grad, gx) <= tol and _rel(blocks[0].grad, gbs[0]) <= tol
