"""Activation checkpointing that knows what S²FT never differentiates.

transformers' switch (``activation_checkpointing_enable``, formerly ``gradient_checkpointing_enable``)
checkpoints every decoder layer and also hooks the input embeddings so their output requires grad: reentrant
checkpointing needs that to reach any parameter, but it makes the backward run through every layer down to the
embeddings. Non-reentrant checkpointing reaches parameters inside a layer without it. So here:

- the checkpoint is non-reentrant and the embedding hook is removed: nothing below the first trainable
  parameter is differentiated (S²FT: layer 0 below its first block; a plan that leaves the lower layers
  untouched: those layers);
- decoder layers before the first one holding a trainable parameter are not checkpointed: with nothing to
  differentiate they save nothing, so wrapping them would only add the checkpoint's bookkeeping.

Gradients are the same as without checkpointing (tests/test_loss.py).
"""

from __future__ import annotations

from typing import Literal

from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

__all__ = ["checkpointed_layers", "enable_activation_checkpointing"]

Scope = Literal["trainable", "all"]


def _checkpoint_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _trains(module: nn.Module | None) -> bool:
    return module is not None and any(p.requires_grad for p in module.parameters())


def enable_activation_checkpointing(model: nn.Module, scope: Scope = "trainable") -> list[int]:
    """Checkpoint ``model``'s decoder layers (non-reentrant) without forcing input gradients.

    ``scope="trainable"`` leaves the layers before the first trainable one unwrapped (they are only run
    forward); ``"all"`` wraps every layer as transformers does. Returns the indices of the checkpointed layers
    among the model's checkpointable layers, in module order.
    """
    if scope not in ("trainable", "all"):
        raise ValueError(f"checkpointing scope {scope!r} is not 'trainable' or 'all'")
    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:  # transformers >= 5.2x; gradient_checkpointing_enable is its deprecated alias there
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.disable_input_require_grads()
    layers = _checkpoint_layers(model)
    parents = {id(p) for p in _parents(model, layers)}
    first = 0
    # Only a single stack of layers has an order to reason about (multimodal models keep every layer wrapped).
    if scope == "trainable" and len(parents) == 1 and not _embeddings_train(model):
        first = next((i for i, layer in enumerate(layers) if _trains(layer)), len(layers))
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i >= first
    return list(range(first, len(layers)))


def checkpointed_layers(model: nn.Module) -> list[int]:
    """Indices of the checkpointable layers whose checkpointing is on."""
    return [i for i, m in enumerate(_checkpoint_layers(model)) if m.gradient_checkpointing]


def _embeddings_train(model: nn.Module) -> bool:
    get = getattr(model, "get_input_embeddings", None)
    try:
        return _trains(get()) if callable(get) else True
    except NotImplementedError:
        return True  # unknown: assume the input side trains, so every layer stays checkpointed


def _parents(model: nn.Module, layers: list[nn.Module]) -> list[nn.Module]:
    wanted = {id(m) for m in layers}
    return [m for m in model.modules() if any(id(c) in wanted for c in m.children())]
