"""Shared test helpers: the tiny GQA Llama of the surgery tests, parameter snapshots, trained tiny models."""

from __future__ import annotations

import torch

from benchmarks.tiny_models import tiny_model


def tiny_llama(**kw) -> torch.nn.Module:
    """Tiny GQA Llama: 4 q heads, 2 kv heads, head_dim 8, hidden 32, intermediate 48, 2 layers, with biases."""
    base = dict(num_key_value_heads=2, head_dim=8, attention_bias=True, mlp_bias=True)
    return tiny_model("llama", **{**base, **kw})


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter (tied ones under each name)."""
    return {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}


def assert_same(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    """Every parameter equals its snapshot bit for bit."""
    now = state(model)
    assert now.keys() == before.keys()
    changed = [n for n in now if not torch.equal(now[n], before[n])]
    assert not changed, f"parameters changed: {changed}"


def trained_tiny(model_type: str, kw: dict, seed: int = 1, dtype: torch.dtype = torch.float32):
    """A tiny model prepared by the real pipeline (permuted + S2 layers) with its blocks 'trained' (random
    deltas); returns (model, plan)."""
    from s2ft_lightning.pipeline import S2Config, prepare_model

    model = tiny_model(model_type, seed=0, **kw).to(dtype)
    plan = prepare_model(model, S2Config(o_ratio=0.5, v_ratio=0.5, u_ratio=0.25, d_ratio=0.25, seed=seed))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model, plan


def block_grads_rel(model: torch.nn.Module, reference: torch.nn.Module) -> float:
    """Largest relative difference between each installed delta's gradient and that block of ``reference``'s
    full gradient (masked full fine-tuning of the same model)."""
    from s2ft_lightning import layers
    from s2ft_lightning.ops import gather_runs
    from surgery.linear import resolve_linear

    worst = 0.0
    for name, blocks in layers.installed(model).items():
        ref = resolve_linear(reference, name)
        grad = ref.view(ref.owner.get_parameter(ref.param).grad) if hasattr(ref, "owner") else ref.weight.grad
        for d, (feature, runs) in zip(blocks.deltas, blocks.specs):
            want = gather_runs(grad, runs, 0 if feature == "out" else 1)
            got = torch.zeros_like(want) if d.grad is None else d.grad  # an expert no token reached
            worst = max(worst, float((got - want).abs().max() / want.abs().max().clamp_min(1e-12)))
    return worst


def randomize_blocks(model: torch.nn.Module, seed: int) -> torch.Generator:
    """Give every installed block a seeded random update (zeros would hide a block read from the wrong place);
    returns the generator for further draws."""
    from s2ft_lightning import layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layers.block_parameters(model):
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return g


def masked_reference(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` with its blocks merged into stock weights, every weight trainable: masked full
    fine-tuning, whose gradients at the blocks' positions the blocks' gradients must equal."""
    import copy

    from s2ft_lightning import layers

    reference = copy.deepcopy(model)
    layers.uninstall(reference, merge=True)
    return reference.requires_grad_(True)
