"""Function-equivalence check for model surgery: same seeded inputs, same logits, or roll back.

Precision: the check runs in the model's own dtype. fp32 models must agree to ``atol_rel`` (default
1e-4 of the logit scale); bf16/fp16 models use a looser per-dtype tolerance (recorded in the
certificate) because reordered sums round differently. Upcasting a copy would double memory on large
models, and a permutation moves values bit-exactly, so a dtype-level tolerance is enough to catch errors.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from surgery.permute import Snapshot
from surgery.tokens import draw_token_ids, reserved_token_ids

# Relative tolerance per dtype (max |Δlogits| / max |logits|).
DTYPE_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8, torch.bfloat16: 3e-2, torch.float16: 5e-3}


class VerificationError(RuntimeError):
    """Surgery changed the model's function; the model was restored before this was raised."""


@dataclass
class Certificate:
    """Evidence that a mutation kept the function: inputs used, measured difference, verdict."""

    passed: bool
    max_abs_diff: float
    rel_diff: float
    logit_scale: float
    tolerance: float
    dtype: str
    n_inputs: int
    seq_len: int
    seed: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _vocab_size(model: torch.nn.Module) -> int:
    sizes = []
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and hasattr(emb, "num_embeddings"):
        sizes.append(int(emb.num_embeddings))
    cfg = getattr(model, "config", None)
    v = getattr(cfg, "vocab_size", None)
    if isinstance(v, int) and v > 0:
        sizes.append(v)
    if not sizes:
        raise ValueError("cannot tell the model's vocabulary size; pass inputs= explicitly")
    return min(sizes)


def make_inputs(model: torch.nn.Module, n_inputs: int, seq_len: int, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random token ids within the vocabulary (plus decoder ids for encoder-decoder models), never a
    multimodal placeholder id (`surgery.tokens`)."""
    g = torch.Generator().manual_seed(seed)
    vocab = _vocab_size(model)
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        limit = getattr(cfg, key, None)
        if isinstance(limit, int) and 0 < limit < seq_len:
            seq_len = limit
    device = next(model.parameters()).device
    reserved = reserved_token_ids(cfg)  # image/video/audio placeholders need their media: never drawn
    ids = draw_token_ids(vocab, (n_inputs, seq_len), g, reserved).to(device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(cfg, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = draw_token_ids(vocab, (n_inputs, seq_len), g, reserved).to(device)
    return inputs


def _logits(out: Any) -> torch.Tensor:
    for key in ("logits", "last_hidden_state"):
        v = getattr(out, key, None) if not isinstance(out, Mapping) else out.get(key)
        if isinstance(v, torch.Tensor):
            return v
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find logits in model output of type {type(out).__name__}")


def _forward(model: torch.nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    kwargs = dict(inputs)
    if hasattr(getattr(model, "config", None), "use_cache"):
        kwargs.setdefault("use_cache", False)
    with torch.no_grad():
        return _logits(model(**kwargs)).detach().double()


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's floating-point parameters (the most common one)."""
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def verify_function(
    model: torch.nn.Module,
    mutate: Callable[[], Any],
    *,
    n_inputs: int = 2,
    seq_len: int = 16,
    seed: int = 0,
    atol_rel: float | None = None,
    inputs: Mapping[str, torch.Tensor] | None = None,
    restore: Iterable[torch.Tensor] | None = None,
) -> Certificate:
    """Run ``mutate()`` between two seeded forwards and certify the logits did not change.

    ``restore`` names the tensors ``mutate`` may touch (default: all parameters and buffers); they are
    snapshotted and put back bit-exactly if ``mutate`` raises or the check fails (`VerificationError`).
    ``atol_rel`` defaults to the dtype's entry in `DTYPE_TOLERANCE`. Eval mode during the check; each
    module's training flag is restored afterwards.
    """
    t0 = time.perf_counter()
    dtype = model_dtype(model)
    tol = DTYPE_TOLERANCE.get(dtype, 1e-4) if atol_rel is None else float(atol_rel)
    if restore is None:
        restore = [*model.parameters(), *model.buffers()]
    snap = Snapshot(restore)
    modes = {m: m.training for m in model.modules()}
    if inputs is None:
        inputs = make_inputs(model, n_inputs, seq_len, seed)
    else:
        first = next(iter(inputs.values()))
        n_inputs, seq_len = int(first.shape[0]), int(first.shape[-1])
    try:
        model.eval()
        before = _forward(model, inputs)
        try:
            mutate()
        except BaseException:
            snap.restore()
            raise
        after = _forward(model, inputs)
    finally:
        for m, flag in modes.items():
            m.training = flag
    if before.shape != after.shape:
        snap.restore()
        raise VerificationError(f"output shape changed from {tuple(before.shape)} to {tuple(after.shape)}")
    diff = float((after - before).abs().max()) if before.numel() else 0.0
    scale = float(before.abs().max()) if before.numel() else 0.0
    finite = bool(torch.isfinite(after).all()) and bool(torch.isfinite(before).all())
    rel = diff / max(scale, 1e-12)
    cert = Certificate(
        passed=finite and rel <= tol,
        max_abs_diff=diff,
        rel_diff=rel,
        logit_scale=scale,
        tolerance=tol,
        dtype=str(dtype).replace("torch.", ""),
        n_inputs=n_inputs,
        seq_len=seq_len,
        seed=seed,
        seconds=time.perf_counter() - t0,
    )
    if not cert.passed:
        snap.restore()
        raise VerificationError(
            f"surgery changed the model's function: max |Δlogits| {diff:.3e} = {rel:.3e} of the logit scale "
            f"{scale:.3e} (tolerance {tol:.1e}, {cert.dtype}, finite={finite}); the model was restored. "
            "This means a permutation was not legal for this architecture: check its structures."
        )
    return cert
