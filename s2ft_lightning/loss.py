"""Next-token loss from the last hidden states in row chunks: never the full ``[batch, seq, vocab]`` logits.

The stock ``model(labels=...)`` path materialises the logits, their fp32 upcast, the log-softmax and their
gradients: at a 49k-128k vocabulary that is most of the memory that grows with the sequence once the decoder
saves little (S²FT, checkpointing). `NextTokenLoss` runs the decoder, then computes the loss *and* its
gradients (hidden states; head weight and bias when they train) chunk by chunk inside one autograd Function's
forward, as Liger-Kernel's fused linear cross-entropy does, in plain torch (CPU and GPU). It keeps one chunk of
logits at a time and the ``[tokens, hidden]`` input gradient.

What a model computes between its decoder and its loss is read from a table of the causal LMs of transformers
5.24 (logit scaling, soft-capping; refusals for additive losses) and then *proved* on the first batch
(`probe`): the head's input must be the decoder's last hidden state, the model's logits must be our transform
of the head's output, and the model's loss our loss. Anything unrecognised falls back to the stock path with
the reason logged (docs/ARCHITECTURE.md, "Long sequences").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers.loss.loss_utils import ForCausalLMLoss

from s2ft_lightning.blocks import is_quantized

__all__ = [
    "IGNORE_INDEX",
    "LMHead",
    "LogitTransform",
    "NextTokenLoss",
    "StepOutput",
    "chunked_argmax",
    "chunked_next_token_loss",
    "find_lm_head",
    "probe",
]

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
LossMode = Literal["auto", "chunked", "stock"]


@dataclass(frozen=True)
class LogitTransform:
    """``logits = softcap · tanh(scale · z / softcap)`` (no tanh when ``softcap`` is None) of the head output z."""

    scale: float = 1.0
    softcap: float | None = None

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z


def _text_config(model: nn.Module) -> Any:
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def logit_transform(model: nn.Module) -> LogitTransform | str:
    """What ``model``'s forward does to the head output before its loss, or why the chunked loss cannot do it.

    Read from transformers 5.24's causal LMs: Cohere* multiply by ``logit_scale``; Granite* divide by
    ``config.logits_scaling``, HyperCLOVAX multiplies by it; Falcon-H1 multiplies by ``lm_head_multiplier``;
    Gemma 2/3/3n/4, VaultGemma, NanoChat and Beam soft-cap at ``final_logit_softcapping``, RecurrentGemma at
    ``logits_soft_cap``. Every other model is taken to use the head output as is; `probe` proves it.
    """
    name, cfg = type(model).__name__, _text_config(model)
    if getattr(cfg, "output_router_logits", False):
        return f"{name} adds the router's load-balancing loss to the loss (config.output_router_logits=True)"
    if (getattr(model, "z_loss_coefficient", 0) or 0) > 0:
        return f"{name} adds a z-loss on the logits (z_loss_coefficient={model.z_loss_coefficient})"
    scale = 1.0
    if name.startswith("Cohere"):
        scale = float(model.logit_scale)
    elif name.startswith("Granite"):
        scale = 1.0 / float(cfg.logits_scaling)
    elif name.startswith("HyperCLOVAX"):
        scale = float(cfg.logits_scaling)
    elif name.startswith("FalconH1"):
        scale = float(model.model.lm_head_multiplier)
    cap = getattr(cfg, "logits_soft_cap", None) if name.startswith("RecurrentGemma") else None
    cap = cap if cap is not None else getattr(cfg, "final_logit_softcapping", None)
    return LogitTransform(scale=scale, softcap=float(cap) if cap else None)


# ---------------------------------------------------------------------------------------------- the loss


# fp32 logits of one chunk: a constant that does not grow with the sequence, with enough rows for the head's matmul
# to run at full speed (256 rows at a 49k vocabulary, 512 at 32k, 64 at 256k; on this CPU 256 rows are as fast
# as 1,024).
CHUNK_BYTES = 64 * 2**20


def default_chunk_rows(rows: int, vocab: int) -> int:
    """Rows per chunk: the largest power of two whose fp32 logits fit `CHUNK_BYTES` (at most ``rows``)."""
    fit = max(1, CHUNK_BYTES // (4 * vocab))
    return max(1, min(rows, 1 << (fit.bit_length() - 1)))


class _ChunkedNextTokenLoss(torch.autograd.Function):
    """Mean cross-entropy of ``transform(h Wᵀ + b)`` against ``targets``; gradients computed in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, transform, chunk_rows):
        rows = hidden.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        valid_all = targets != IGNORE_INDEX
        count = valid_all.sum()
        # The stock mean over no valid target is 0/0 = nan; so is this one (its gradients are then zero).
        inv = 1.0 / count.clamp(min=1).to(torch.float32)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        for s in range(0, rows, chunk_rows):
            h = hidden[s : s + chunk_rows]
            y = targets[s : s + chunk_rows]
            valid = valid_all[s : s + chunk_rows]
            z = F.linear(h, weight, bias).float()  # the chunk's one [rows, vocab] buffer, changed in place
            t = None
            if transform.scale != 1.0:
                z.mul_(transform.scale)
            if transform.softcap is not None:
                t = z.div_(transform.softcap).tanh_()
                z = t * transform.softcap
            ysafe = torch.where(valid, y, 0).unsqueeze(1)
            picked = z.gather(1, ysafe).squeeze(1)
            top = z.amax(1, keepdim=True)
            sums = z.sub_(top).exp_().sum(1, keepdim=True)
            lse = (sums.log() + top).squeeze(1)
            total += ((lse - picked) * valid).sum()
            if not (need_h or need_w or need_b):
                continue
            g = z.div_(sums)  # the softmax, in place of the logits
            g.scatter_add_(1, ysafe, -valid.unsqueeze(1).to(g.dtype))  # minus the one-hot of the target
            g.mul_((valid.to(g.dtype) * inv).unsqueeze(1))
            if t is not None:  # d/dz of softcap·tanh(z/softcap)
                g.mul_(t.square_().neg_().add_(1.0))
            if transform.scale != 1.0:
                g.mul_(transform.scale)
            gc = g.to(hidden.dtype)
            if need_h:
                torch.mm(gc, weight, out=grad_h[s : s + chunk_rows])
            if need_w:
                grad_w.add_((gc.t() @ h).float())
            if need_b:
                grad_b.add_(g.sum(0))
        loss = total / count.to(torch.float32)
        ctx.save_for_backward(
            grad_h if need_h else None,
            grad_w.to(weight.dtype) if need_w else None,
            grad_b.to(bias.dtype) if need_b else None,
        )
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grads = [None if g is None else g * grad_out.to(g.dtype) for g in ctx.saved_tensors]
        return (*grads, None, None, None)


def _shift(labels: torch.Tensor) -> torch.Tensor:
    """The target of every position: the next label, ``IGNORE_INDEX`` at the last (as transformers' loss)."""
    return F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)


def _compute_args(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """Hidden, weight and bias in the dtype the head's matmul runs in (autocast's dtype when it is on)."""
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        return hidden.to(dt), weight.to(dt), None if bias is None else bias.to(dt)
    return hidden, weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype)


def chunked_next_token_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    transform: LogitTransform = LogitTransform(),  # noqa: B008 - frozen dataclass
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Mean next-token cross-entropy of ``transform(hidden Wᵀ + b)`` against ``labels`` shifted by one.

    Equals transformers' ``ForCausalLMLoss`` on the full logits (fp32 logits, ``IGNORE_INDEX`` skipped, mean
    over the valid targets) with the same gradients, holding one chunk of ``chunk_rows`` rows of logits at a time.
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    targets = _shift(labels).reshape(-1).to(h.device)
    if targets.shape[0] != h.shape[0]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match hidden states {tuple(hidden.shape[:-1])}")
    rows = chunk_rows or default_chunk_rows(h.shape[0], weight.shape[0])
    h, w, b = _compute_args(h, weight, bias)
    with torch.autocast(h.device.type, enabled=False):
        return _ChunkedNextTokenLoss.apply(h, w, b, targets, transform, int(rows))


@torch.no_grad()
def chunked_argmax(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    transform: LogitTransform = LogitTransform(),  # noqa: B008 - frozen dataclass
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """``argmax`` over the vocabulary of every position's logits, chunk by chunk (shape ``hidden.shape[:-1]``)."""
    h = hidden.reshape(-1, hidden.shape[-1])
    rows = chunk_rows or default_chunk_rows(h.shape[0], weight.shape[0])
    h, w, b = _compute_args(h, weight, bias)
    out = torch.empty(h.shape[0], dtype=torch.long, device=h.device)
    for s in range(0, h.shape[0], rows):
        out[s : s + rows] = transform(F.linear(h[s : s + rows], w, b).float()).argmax(-1)
    return out.reshape(hidden.shape[:-1])


# ---------------------------------------------------------------------------------------------- the model


@dataclass
class LMHead:
    """Where a causal LM's last hidden states and head are: ``transform(head(decoder(...).last_hidden_state))``."""

    decoder: nn.Module
    head: nn.Linear
    transform: LogitTransform

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return self.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (the model itself otherwise)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def find_lm_head(model: nn.Module) -> LMHead | str:
    """The decoder, head and logit transform of a causal LM, or the reason the chunked loss cannot use it."""
    base = _unwrap(model)
    name = type(base).__name__
    if not hasattr(base, "get_output_embeddings") or not hasattr(base, "get_decoder"):
        return f"{name} is not a transformers model with get_output_embeddings() and get_decoder()"
    head = base.get_output_embeddings()
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        return f"{name}'s output head is {type(head).__name__}, not a plain nn.Linear (wrapped or replaced)"
    if is_quantized(head.weight):
        return f"{name}'s output head is quantized"
    if any(type(p).__name__ == "DTensor" for p in base.parameters()):
        return f"{name} is sharded (FSDP/DTensor): its decoder cannot be called outside the sharded root"
    try:
        decoder = base.get_decoder()
    except Exception as e:  # noqa: BLE001 - get_decoder raises for models it does not know
        return f"{name}.get_decoder() failed: {e}"
    if decoder is base or decoder is None:
        return f"{name}.get_decoder() did not return its decoder (base_model_prefix {base.base_model_prefix!r})"
    if getattr(base, "loss_function", None) is not ForCausalLMLoss:
        return f"{name} does not use transformers' ForCausalLMLoss"
    transform = logit_transform(base)
    if isinstance(transform, str):
        return transform
    return LMHead(decoder=decoder, head=head, transform=transform)


@torch.no_grad()
def probe(model: nn.Module, lm: LMHead, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> str | None:
    """Prove on a few tokens that the stock model computes what `lm` does, or say where it differs.

    Runs the model's own forward with labels once, its head output replaced by known values ``z`` (spread wide
    enough to make scaling and soft-capping visible), and checks: the head's input is the decoder's last hidden
    state; the returned logits are ``transform(z)``; the loss is our loss of ``z``. Random ops (dropout) see
    the same generator state in both forwards and the caller's state is restored.
    """
    ids = input_ids[:1, : min(16, input_ids.shape[1])]
    if ids.shape[1] < 2:
        return "the probe needs a batch of at least 2 tokens"
    mask = None if attention_mask is None else attention_mask[:1, : ids.shape[1]]
    labels = ids.clone()
    labels[0, 1] = IGNORE_INDEX  # exercise the ignore index
    seen: dict[str, torch.Tensor] = {}
    spread = 3.0 * (lm.transform.softcap or 10.0) / abs(lm.transform.scale)
    gen = torch.Generator().manual_seed(0)

    def replace(module, args, output):
        seen["input"] = args[0]
        z = torch.randn(output.shape, generator=gen, dtype=torch.float32) * spread
        seen["z"] = z.to(output.device, output.dtype)
        return seen["z"]

    devices = [ids.device] if ids.device.type == "cuda" else []
    handle = lm.head.register_forward_hook(replace)
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(0)
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(0)
            hidden = lm.hidden(ids, mask)
    except Exception as e:  # noqa: BLE001 - a model the probe cannot run is one the chunked loss does not know
        return f"the probe failed: {type(e).__name__}: {e}"
    finally:
        handle.remove()
    if "z" not in seen:
        return "the model's forward did not call its output head"
    dt = seen["z"].dtype
    tol = 1e-5 if dt in (torch.float32, torch.float64) else 2.0**-6
    got_in, want_in = seen["input"].float(), hidden.float()
    if got_in.shape != want_in.shape or (got_in - want_in).abs().max() > tol * want_in.abs().max().clamp(min=1):
        return "its head's input is not the decoder's last hidden state (the model transforms it)"
    want = lm.transform(seen["z"].float())
    err = (out.logits.float() - want).abs().max()
    if err > tol * want.abs().max().clamp(min=1):
        return f"its logits are not {lm.transform} of the head output (max |Δ| {float(err):.3g} on the probe)"
    mine = _loss_of_logits(seen["z"].float(), labels, lm.transform)
    if out.loss is None or not torch.isclose(out.loss.float(), mine, rtol=tol, atol=tol):
        got = None if out.loss is None else f"{float(out.loss):.6g}"
        return f"its loss ({got}) is not the next-token cross-entropy of its logits ({float(mine):.6g}) on the probe"
    return None


def _loss_of_logits(z: torch.Tensor, labels: torch.Tensor, transform: LogitTransform) -> torch.Tensor:
    logits = transform(z.float()).reshape(-1, z.shape[-1])
    return F.cross_entropy(logits, _shift(labels).reshape(-1).to(z.device), ignore_index=IGNORE_INDEX)


# ---------------------------------------------------------------------------------------------- the module's view


@dataclass
class StepOutput:
    """A step's loss and, when asked for, its next-token accuracy parts (correct and counted targets)."""

    loss: torch.Tensor
    correct: torch.Tensor | None = None
    counted: torch.Tensor | None = None


class NextTokenLoss:
    """The causal-LM loss of a model as ``S2FTModule`` computes it: chunked where proved, else the stock path.

    ``mode``: ``"chunked"`` requires the chunked loss (an unrecognised model is an error), ``"stock"`` always
    calls ``model(labels=...)``, ``"auto"`` chunks where it is proved and logs why when it falls back. The
    model is recognised and probed once, on the first batch.
    """

    def __init__(self, mode: LossMode = "auto", chunk_rows: int | None = None) -> None:
        if mode not in ("auto", "chunked", "stock"):
            raise ValueError(f"loss={mode!r} is not one of 'auto', 'chunked', 'stock'")
        self.mode = mode
        self.chunk_rows = chunk_rows
        self.lm: LMHead | None = None
        self.reason: str | None = "not resolved yet" if mode != "stock" else "loss='stock'"
        self._model_id: int | None = None

    @property
    def chunked(self) -> bool:
        """Whether the last resolved model uses the chunked path."""
        return self.lm is not None

    def resolve(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        """Recognise and probe ``model`` (once per model object); falls back or raises as ``mode`` says."""
        if self.mode == "stock" or self._model_id == id(model):
            return
        self._model_id = id(model)
        found = find_lm_head(model)
        why = found if isinstance(found, str) else probe(model, found, input_ids, attention_mask)
        self.lm, self.reason = (None, why) if why else (found, None)
        if why is None:
            log.info("s2ft: chunked next-token loss on %s (%s)", type(_unwrap(model)).__name__, found.transform)
            return
        msg = f"the chunked next-token loss cannot be used: {why}"
        if self.mode == "chunked":
            raise ValueError(msg + ". Use loss='auto' (falls back to the stock loss) or loss='stock'.")
        log.warning("s2ft: %s; using the stock loss (full logits)", msg)

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor], accuracy: bool = False) -> StepOutput:
        ids, mask, labels = batch["input_ids"], batch.get("attention_mask"), batch["labels"]
        self.resolve(model, ids, mask)
        if self.lm is None:
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
            if not accuracy:
                return StepOutput(out.loss)
            pred = out.logits[:, :-1].argmax(-1)
            target = labels[:, 1:]
        else:
            lm = self.lm
            hidden = lm.hidden(ids, mask)
            loss = chunked_next_token_loss(
                hidden, lm.head.weight, lm.head.bias, labels, lm.transform, chunk_rows=self.chunk_rows
            )
            if not accuracy:
                return StepOutput(loss)
            pred = chunked_argmax(hidden[:, :-1], lm.head.weight, lm.head.bias, lm.transform, self.chunk_rows)
            target = labels[:, 1:]
            out = None
        valid = target != IGNORE_INDEX
        return StepOutput(out.loss if out is not None else loss, ((pred == target) & valid).sum(), valid.sum())
