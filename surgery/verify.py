"""Function-equivalence check for model surgery: same seeded inputs, same logits, or roll back.

`compare_logits` is the one comparison of logits the project makes (verification and the probe use it).

Precision: the check runs in the model's own dtype. fp32 models must agree to ``atol_rel`` (default
1e-4 of the logit scale); bf16/fp16 models use a looser per-dtype tolerance (recorded in the
certificate) because reordered sums round differently. Upcasting a copy would double memory on large
models, and a permutation moves values bit-exactly, so a dtype-level tolerance is enough to catch errors.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from surgery.permute import storage_key
from surgery.tokens import draw_token_ids, reserved_token_ids
from surgery.transaction import deferred_interrupts, transaction


class Snapshot:
    """Clones of a set of tensors (deduplicated by storage) that can be restored bit-exactly."""

    def __init__(self, tensors: Iterable[torch.Tensor]):
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        seen: set[tuple] = set()
        for t in tensors:
            key = storage_key(t)
            if key not in seen:
                seen.add(key)
                # Accelerator tensors are kept in host memory so a rollback never doubles device memory.
                saved = t.detach().clone() if t.device.type == "cpu" else t.detach().to("cpu", copy=True)
                self._saved.append((t, saved))

    def restore(self) -> None:
        with torch.no_grad():
            for t, saved in self._saved:
                t.copy_(saved)

    def __len__(self) -> int:
        return len(self._saved)


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


def logits_of(out: Any) -> torch.Tensor:
    """The logits (or last hidden state) in a model's output, however it is packed."""
    for key in ("logits", "last_hidden_state"):
        v = getattr(out, key, None) if not isinstance(out, Mapping) else out.get(key)
        if isinstance(v, torch.Tensor):
            return v
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find logits in model output of type {type(out).__name__}")


def forward_logits(model: torch.nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits on ``inputs`` as float64, without gradients or a KV cache."""
    kwargs = dict(inputs)
    if hasattr(getattr(model, "config", None), "use_cache"):
        kwargs.setdefault("use_cache", False)
    with torch.no_grad():
        return logits_of(model(**kwargs)).detach().double()


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's floating-point parameters (the most common one)."""
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get) if counts else torch.float32


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode inside the block; every module's training flag is put back, even on an interrupt."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        yield
    finally:
        with deferred_interrupts():
            for m, flag in modes.items():
                m.training = flag


@dataclass
class Comparison:
    """Two logits tensors compared: max |Δ|, the logit scale, Δ relative to it, finiteness and the verdict."""

    max_abs_diff: float
    rel_diff: float
    logit_scale: float
    tolerance: float
    finite: bool

    @property
    def passed(self) -> bool:
        return self.finite and self.rel_diff <= self.tolerance


def compare_logits(before: torch.Tensor, after: torch.Tensor, tolerance: float) -> Comparison:
    """The one comparison of logits every check uses (verification, the probe): max |Δ| relative to the
    logit scale of ``before``, against ``tolerance``; a shape change or a non-finite value fails."""
    if before.shape != after.shape:
        return Comparison(float("inf"), float("inf"), 0.0, tolerance, False)
    diff = float((after - before).abs().max()) if before.numel() else 0.0
    scale = float(before.abs().max()) if before.numel() else 0.0
    finite = bool(torch.isfinite(after).all()) and bool(torch.isfinite(before).all())
    return Comparison(diff, diff / max(scale, 1e-12), scale, tolerance, finite)


def tolerance_for(model: torch.nn.Module, atol_rel: float | None = None) -> tuple[torch.dtype, float]:
    """The model's dtype and the relative tolerance a check of it uses (``atol_rel`` or `DTYPE_TOLERANCE`)."""
    dtype = model_dtype(model)
    return dtype, DTYPE_TOLERANCE.get(dtype, 1e-4) if atol_rel is None else float(atol_rel)


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
    journaled: bool = False,
) -> Certificate:
    """Run ``mutate()`` between two seeded forwards and certify the logits did not change, or undo it.

    Runs in the model's transaction (`surgery.transaction`). ``journaled=True`` says ``mutate`` journals its own
    changes there (as `surgery.permute.apply_permutations` does), so undoing needs no copy of the weights;
    otherwise the tensors ``mutate`` may touch (``restore``, default: every parameter and buffer) are copied
    first and put back bit-exactly if it raises or the check fails (`VerificationError`). ``atol_rel``
    defaults to the dtype's entry in `DTYPE_TOLERANCE`. Eval mode during the check; training flags restored.
    """
    t0 = time.perf_counter()
    dtype, tol = tolerance_for(model, atol_rel)
    if inputs is None:
        inputs = make_inputs(model, n_inputs, seq_len, seed)
    else:
        first = next(iter(inputs.values()))
        n_inputs, seq_len = int(first.shape[0]), int(first.shape[-1])
    with transaction(model, "a verified change") as txn, eval_mode(model):
        before = forward_logits(model, inputs)
        if not journaled:
            snap = Snapshot([*model.parameters(), *model.buffers()] if restore is None else restore)
            txn.on_rollback(snap.restore, "the verified change")
        mutate()
        cmp = compare_logits(before, forward_logits(model, inputs), tol)
        cert = Certificate(
            passed=cmp.passed,
            max_abs_diff=cmp.max_abs_diff,
            rel_diff=cmp.rel_diff,
            logit_scale=cmp.logit_scale,
            tolerance=tol,
            dtype=str(dtype).replace("torch.", ""),
            n_inputs=n_inputs,
            seq_len=seq_len,
            seed=seed,
            seconds=time.perf_counter() - t0,
        )
        if not cert.passed:
            raise VerificationError(
                f"surgery changed the model's function: max |Δlogits| {cmp.max_abs_diff:.3e} = {cmp.rel_diff:.3e} of "
                f"the logit scale {cmp.logit_scale:.3e} (tolerance {tol:.1e}, {cert.dtype}, finite={cmp.finite}); "
                "the model was restored. This means a permutation was not legal for this architecture: check its "
                "structures."
            )
    return cert
