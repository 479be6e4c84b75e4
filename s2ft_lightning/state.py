"""`S2State`: the one owner of a prepared model's S²FT state, held in one attribute of the model.

PEFT keeps the state of its adapters in a tuner model around the user's model; S²FT changes the model in place
(permutes it, swaps in S2 layers, may quantize and shard its base), so it keeps that state in one record on the
model instead: ``model.__dict__["_s2ft"]``, the record surgery keeps for the applied plan
(`surgery.transaction.SurgeryRecord`), extended here. Nothing else stores private attributes on the user's
model. It holds:

- ``plan``: the applied plan (the model is permuted by it) and ``marker``, set while a change is in progress
  or could not be undone (`surgery.transaction`);
- ``config``: the `S2Config` the model was prepared with (a different one is refused, never silently ignored);
- ``requires_grad``: the base's flags saved at install (None while no S2 layers are installed);
- ``experts``: the experts modules whose class was swapped for the S2 forward, with their stock class;
- ``quantized``: how the frozen base is stored ("none", "int8", "nf4"); ``base_blocks``: the base values under
  the blocks kept before quantizing (adapters and checkpoints identify the unquantized base);
- ``base_values``: the digest of the base values under the blocks (checkpoints check it).

Install, uninstall, quantize and the Lightning attachment read and write these fields inside the model's
transaction, which puts every field back if a step fails. State dicts are written in the form the current call
asks for (`state_dict_form`): a property of one call (the Lightning hooks ask for the split form while a
checkpoint is taken), so it is a context variable, not a field of any model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import torch

from surgery.transaction import SurgeryRecord, check_intact, record_of

FORMS = ("merged", "split")
_FORM: ContextVar[str] = ContextVar("s2ft_state_dict_form", default="merged")

__all__ = ["FORMS", "S2State", "current_form", "reset_form", "set_form", "state_dict_form"]


class S2State(SurgeryRecord):
    """A prepared model's S²FT state (see the module docstring); ``S2State.of(model)`` reads it."""

    def __init__(self) -> None:
        super().__init__()
        self.config: Any = None
        self.requires_grad: dict[str, bool] | None = None
        self.experts: dict[str, type] = {}
        self.quantized: str = "none"
        self.base_blocks: dict[str, list[torch.Tensor]] = {}
        self.base_values: str | None = None

    @staticmethod
    def of(model: torch.nn.Module) -> S2State | None:
        """The S²FT state of ``model`` (None when S²FT never changed it)."""
        rec = record_of(model)
        return rec if isinstance(rec, S2State) else None

    @staticmethod
    def checked(model: torch.nn.Module) -> S2State | None:
        """`of`, refusing a model whose surgery could not be undone (`surgery.transaction.check_intact`)."""
        check_intact(model)
        return S2State.of(model)

    @property
    def installed(self) -> bool:
        return self.requires_grad is not None

    def is_empty(self) -> bool:
        return super().is_empty() and not self.installed and self.quantized == "none" and not self.experts

    def forget_install(self) -> None:
        """Clear what an install recorded (after uninstall); the plan and the quantization stay."""
        self.requires_grad = None
        self.experts = {}
        self.base_blocks = {}
        self.base_values = None
        self.config = None if self.plan is None else self.config


@contextlib.contextmanager
def state_dict_form(form: str) -> Iterator[None]:
    """Within this block, S2 layers write state dicts in ``form`` ("merged" or "split")."""
    if form not in FORMS:
        raise ValueError(f"state dict form {form!r} is not one of {FORMS}")
    token = _FORM.set(form)
    try:
        yield
    finally:
        _FORM.reset(token)


def set_form(form: str):
    """Switch the state-dict form without a block; returns the token `reset_form` takes (the Lightning hooks)."""
    if form not in FORMS:
        raise ValueError(f"state dict form {form!r} is not one of {FORMS}")
    return _FORM.set(form)


def reset_form(token) -> None:
    """Undo a `set_form`."""
    _FORM.reset(token)


def current_form() -> str:
    """The state-dict form S2 layers write now ("merged" unless inside ``state_dict_form("split")``)."""
    return _FORM.get()
