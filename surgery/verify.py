"""Function-equivalence check for model surgery: same seeded inputs, same logits, or roll back.

`compare_logits` is the one comparison of logits the project makes (verification and the probe use it).

Precision: the check computes in fp32 whatever dtype the model is stored in (`surgery.upcast`: block by
block, never a full fp32 copy). A permutation moves values bit-exactly, so a correct plan differs only by the
rounding of reordered sums, ~1e-6 of the logit scale in fp32; in bf16 that rounding reached 1e-2 and a
per-dtype tolerance of 3e-2 passed real errors (two swapped Down columns in the last of 24 layers, a k bias
not moved with its heads). One tolerance (1e-4 of the logit scale; 1e-8 for fp64 models) therefore holds
in every dtype, and the certificate records the dtype the check ran in and the difference it measured.

Experts: the logits reach only the experts the router sends 2 x 16 tokens to, so every experts module a
change touches is also driven expert by expert (`surgery.expert_check`) and each expert's output compared.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from surgery.expert_check import compare_experts, expert_outputs, experts_to_drive
from surgery.permute import storage_key
from surgery.structures import Coupling
from surgery.tokens import draw_token_ids, reserved_token_ids
from surgery.transaction import deferred_interrupts, transaction
from surgery.upcast import fp32_call


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


# Relative tolerance per dtype a check computes in (max |Δlogits| / max |logits|): fp32 for every model stored
# in fp32, bf16 or fp16 (`surgery.upcast`), fp64 for fp64 models.
DTYPE_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}


class VerificationError(RuntimeError):
    """Surgery changed the model's function; the model was restored before this was raised."""


@dataclass
class Certificate:
    """Evidence that a mutation kept the function: inputs used, measured differences, verdict.

    ``dtype`` is the model's storage dtype, ``check_dtype`` the dtype the logits and experts were computed in;
    ``rel_diff`` and ``experts_rel_diff`` are the measured differences (relative to the logit scale / to each
    expert's output scale), both held to ``tolerance``. ``experts_checked`` experts were driven one by one;
    ``experts_not_driven`` names experts modules the change touched whose forward could not be driven.
    """

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
    check_dtype: str = "float32"
    experts_checked: int = 0
    experts_rel_diff: float = 0.0
    experts_not_driven: list[str] = field(default_factory=list)

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
    """The model's logits on ``inputs`` as float64, computed in fp32 (or fp64) whatever the model's dtype
    (`surgery.upcast`), without gradients or a KV cache; the model is left bit-identical."""
    kwargs = dict(inputs)
    if hasattr(getattr(model, "config", None), "use_cache"):
        kwargs.setdefault("use_cache", False)
    with torch.no_grad():
        return fp32_call(model, lambda: logits_of(model(**kwargs)).detach().double())


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


def check_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype a check of ``model`` computes in: fp64 for an fp64 model, fp32 for every other."""
    return torch.float64 if model_dtype(model) == torch.float64 else torch.float32


def tolerance_for(model: torch.nn.Module, atol_rel: float | None = None) -> tuple[torch.dtype, float]:
    """The dtype a check of ``model`` computes in and its relative tolerance (``atol_rel`` or `DTYPE_TOLERANCE`)."""
    dtype = check_dtype(model)
    return dtype, DTYPE_TOLERANCE[dtype] if atol_rel is None else float(atol_rel)


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
    moved: Iterable[Coupling] = (),
) -> Certificate:
    """Run ``mutate()`` between two seeded forwards and certify the logits did not change, or undo it.

    Runs in the model's transaction (`surgery.transaction`). ``journaled=True`` says ``mutate`` journals its own
    changes there (as `surgery.permute.apply_permutations` does), so undoing needs no copy of the weights;
    otherwise the tensors ``mutate`` may touch (``restore``, default: every parameter and buffer) are copied
    first and put back bit-exactly if it raises or the check fails (`VerificationError`). ``moved`` names the
    couplings ``mutate`` moves: the experts modules holding per-expert ones are also driven expert by expert
    (`surgery.expert_check`), so an expert no input token reaches is checked too. Logits and experts are
    computed in fp32 (fp64 for fp64 models); ``atol_rel`` defaults to that dtype's entry in `DTYPE_TOLERANCE`.
    Eval mode during the check; training flags restored.
    """
    t0 = time.perf_counter()
    dtype, tol = tolerance_for(model, atol_rel)
    driven, not_driven = experts_to_drive(model, moved)
    if inputs is None:
        inputs = make_inputs(model, n_inputs, seq_len, seed)
    else:
        first = next(iter(inputs.values()))
        n_inputs, seq_len = int(first.shape[0]), int(first.shape[-1])
    with transaction(model, "a verified change") as txn, eval_mode(model):
        before = forward_logits(model, inputs)
        experts_before = [expert_outputs(model, d, seed=seed) for d in driven]
        if not journaled:
            snap = Snapshot([*model.parameters(), *model.buffers()] if restore is None else restore)
            txn.on_rollback(snap.restore, "the verified change")
        mutate()
        cmp = compare_logits(before, forward_logits(model, inputs), tol)
        experts_after = [expert_outputs(model, d, seed=seed) for d in driven]
        ecmp = compare_experts(driven, experts_before, experts_after, tol)
        cert = Certificate(
            passed=cmp.passed and ecmp.passed,
            max_abs_diff=cmp.max_abs_diff,
            rel_diff=cmp.rel_diff,
            logit_scale=cmp.logit_scale,
            tolerance=tol,
            dtype=str(model_dtype(model)).replace("torch.", ""),
            n_inputs=n_inputs,
            seq_len=seq_len,
            seed=seed,
            seconds=time.perf_counter() - t0,
            check_dtype=str(dtype).replace("torch.", ""),
            experts_checked=ecmp.checked,
            experts_rel_diff=ecmp.rel_diff,
            experts_not_driven=not_driven,
        )
        if not cmp.passed:
            raise VerificationError(
                f"surgery changed the model's function: max |Δlogits| {cmp.max_abs_diff:.3e} = {cmp.rel_diff:.3e} of "
                f"the logit scale {cmp.logit_scale:.3e} (tolerance {tol:.1e}, computed in {cert.check_dtype} for a "
                f"{cert.dtype} model, finite={cmp.finite}); the model was restored. This means a permutation was "
                "not legal for this architecture: check its structures."
            )
        if not ecmp.passed:
            shown = "; ".join(ecmp.detail[:6]) + ("; ..." if len(ecmp.detail) > 6 else "")
            raise VerificationError(
                f"surgery changed the function of {len(ecmp.failed)} expert(s), each driven with its own "
                f"tokens whatever the router picks: {shown} (tolerance {tol:.1e}, computed in {cert.check_dtype}); "
                "the logits on the check's inputs stayed within tolerance because the router sent their tokens "
                "elsewhere. The model was restored. A permutation of these experts' channels was not legal: check "
                "their layout."
            )
    return cert
