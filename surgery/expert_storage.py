"""How each MoE experts class stores expert ``e``'s weights, how it is called, and what its experts compute.

Storage of one expert as a logical ``[out, in]`` linear map (`view`):
- plain ``[E, 2I, H]`` / ``[E, H, I]`` (Mixtral, Qwen-MoE, OLMoE): ``t[e]``;
- transposed ``[E, H, 2I]`` / ``[E, I, H]`` (gpt-oss and Aria flag ``is_transposed``; Llama-4 is declared here):
  ``t[e].T``;
- stacked 2-D ``[E·I, H]`` (DBRX's ``w1`` gate, ``v1`` up and ``w2`` down, used as ``h @ w2``): rows
  ``e·I … (e+1)·I − 1``, the down tensor transposed.
A fused gate/up is concatenated ``[gates | ups]`` or interleaved per channel ``[g0, u0, g1, u1, …]`` (gpt-oss).

Activation ``h = f(g, u)`` per intermediate channel (`activation`): ``act(g)·u`` for transformers' default gate
and for the declared forwards that compute it (Llama-4's and Aria's ``act_fn``, DBRX's ``activation_fn``);
gpt-oss's clamped SwiGLU (``g ≤ limit``, ``|u| ≤ limit``, ``h = (u + 1)·g·σ(α·g)``; also OpenAI's privacy
filter, on concatenated gate/up), declared by class. Any
other gate is unknown, and its experts stay frozen with that reason (`untrainable`): never a guessed function.
A gate read from ``_apply_gate`` is also checked numerically against the declared activation.

Call (`ExpertStorage.call`): ``"routed"`` ``(hidden, top_k_index, top_k_weights)``; ``"scaled_inputs"``
(Llama-4: ``[E·T, H]`` rows already multiplied by their routing score, expert ``e`` on rows ``e·T …``);
``"one_expert"`` (DBRX's ``mlp(x, w1[e], v1[e], w2[e])`` once per expert reached, ``e`` read from the views).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

Activation = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ExpertStorage:
    """Where one module keeps its experts' tensors (see the module docstring)."""

    gate_up: str | None  # fused gate/up tensor, or None
    gate: str | None
    up: str | None
    down: str
    channels_last: bool  # transposed [E, H, 2I] / [E, I, H]
    interleaved: bool  # fused gate/up alternate per channel
    stacked: bool  # 2-D [E*I, H] tensors (DBRX)
    experts: int
    width: int  # intermediate channels per expert (I)
    call: str  # "routed" | "scaled_inputs" | "one_expert"

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(p for p in (self.gate_up, self.gate, self.up, self.down) if p is not None)

    def view(self, param: str, t: torch.Tensor, e: int) -> torch.Tensor:
        """Expert ``e`` of ``t`` (parameter ``param`` or a tensor shaped like it, e.g. its grad) as ``[out, in]``."""
        if self.stacked:
            w = t.view(self.experts, self.width, t.shape[-1])[e]
            return w.t() if param == self.down else w
        return t[e].t() if self.channels_last else t[e]

    def gate_rows(self, channels: torch.Tensor) -> torch.Tensor:
        """Rows of the (fused) gate tensor's ``[out, in]`` view holding the gates of ``channels``."""
        if self.gate_up is not None and self.interleaved:
            return 2 * channels
        return channels

    def up_rows(self, channels: torch.Tensor) -> torch.Tensor:
        """Rows of the (fused) up tensor's ``[out, in]`` view holding the ups of ``channels``."""
        if self.gate_up is None:
            return channels
        return 2 * channels + 1 if self.interleaved else channels + self.width

    def up_channels(self, param: str, rows: list[int]) -> list[int] | None:
        """The channels of Up rows ``rows`` of ``param``'s view, or None if any row is not an Up row."""
        if param == self.up and self.gate_up is None:
            return list(rows)
        if param != self.gate_up:
            return None
        if self.interleaved:
            return None if any(r % 2 != 1 for r in rows) else [(r - 1) // 2 for r in rows]
        return None if any(r < self.width for r in rows) else [r - self.width for r in rows]


# Experts classes whose layout transformers does not flag, read from their transformers 5 source.
_DECLARED: dict[str, dict] = {
    # gate_up_proj [E, H, 2I] (chunk: gates then ups), down_proj [E, I, H]; forward(routed_in) computes
    # bmm(act_fn(gate) * up, down) on rows pre-multiplied by their routing score
    "Llama4TextExperts": dict(gate_up="gate_up_proj", down="down_proj", channels_last=True, call="scaled_inputs"),
    # w1 (gate), v1 (up), w2 (down, used as h @ w2): each [E*I, H]; forward(x, w1[e], v1[e], w2[e]) computes
    # (activation_fn(x w1ᵀ) * x v1ᵀ) w2, called once per expert by DbrxExperts
    "DbrxExpertGLU": dict(gate="w1", up="v1", down="w2", stacked=True, call="one_expert"),
}
# Experts modules whose tensors sit in a child (path relative to the experts module).
HOLDERS = {"DbrxExperts": "mlp"}
# The attribute holding act for the declared act(gate)·up forwards.
_ACT_ATTR = {"DbrxExpertGLU": "activation_fn"}


def holder_path(experts: nn.Module) -> str | None:
    """Where ``experts`` keeps its tensors relative to itself (None: in itself)."""
    return HOLDERS.get(type(experts).__name__)


def stock_class(module: nn.Module) -> type:
    """``module``'s own class, past classes mixed in over it that mark themselves ``_wraps_experts`` (the S2
    forward of `s2ft_lightning.experts` while blocks are installed)."""
    return next(c for c in type(module).__mro__ if "_wraps_experts" not in c.__dict__)


def storage_of(module: nn.Module) -> ExpertStorage | None:
    """How ``module`` stores its experts, or None if it holds no experts tensors in a known layout."""
    name = stock_class(module).__name__
    params = dict(module.named_parameters(recurse=False))
    declared = _DECLARED.get(name)
    if declared is not None:
        d = {"gate_up": None, "gate": None, "up": None, "channels_last": False, "stacked": False, **declared}
        if any(not isinstance(params.get(p), torch.Tensor) for p in (d["gate_up"], d["gate"], d["up"], d["down"]) if p):
            return None
        down = params[d["down"]]
        if d["stacked"]:
            experts = int(getattr(module, "moe_num_experts", 0) or 0)
            if experts < 1 or down.dim() != 2 or down.shape[0] % experts:
                return None
            width = down.shape[0] // experts
        else:
            experts, width = down.shape[0], down.shape[1] if d["channels_last"] else down.shape[2]
        return ExpertStorage(interleaved=False, experts=experts, width=width, **d)
    down = params.get("down_proj")
    if down is None or down.dim() != 3:
        return None
    gate_up = "gate_up_proj" if "gate_up_proj" in params else None
    gate = "gate_proj" if gate_up is None and "gate_proj" in params else None
    up = "up_proj" if gate_up is None and "up_proj" in params else None
    if gate_up is None and up is None:
        return None
    transposed = bool(getattr(module, "is_transposed", False))
    return ExpertStorage(
        gate_up=gate_up,
        gate=gate,
        up=up,
        down="down_proj",
        channels_last=transposed,
        interleaved=getattr(module, "is_concatenated", True) is False,
        stacked=False,
        experts=down.shape[0],
        width=down.shape[1] if transposed else down.shape[2],
        call="routed",
    )


def _act_times_up(act: Callable) -> Activation:
    def f(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return act(g) * u

    f.linear_in_up = True  # h(u + du) − h(u) = act(g)·du
    return f


def _gpt_oss(module: nn.Module) -> Activation:
    alpha, limit = float(module.alpha), float(module.limit)

    def f(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        g = g.clamp(min=None, max=limit)
        u = u.clamp(min=-limit, max=limit)
        return (u + 1) * (g * torch.sigmoid(g * alpha))

    f.linear_in_up = False  # clamped: the Up rows' change is computed as h(u + du) − h(u)
    return f


# Experts classes with their own `_apply_gate` whose activation is declared here (read from the source).
_GATES: dict[str, Callable[[nn.Module], Activation]] = {
    "GptOssExperts": _gpt_oss,
    "OpenAIPrivacyFilterExperts": _gpt_oss,  # the same clamped SwiGLU on concatenated [gates | ups]
}


def _gate_matches(module: nn.Module, storage: ExpertStorage, f: Activation) -> bool:
    """The module's own ``_apply_gate`` computes ``f`` on probe values spanning its clamp range."""
    g = torch.linspace(-12.0, 12.0, 49).repeat_interleave(7)
    u = torch.linspace(-12.0, 12.0, 7).repeat(49)
    fused = torch.stack([g, u], -1).reshape(1, -1) if storage.interleaved else torch.cat([g, u])[None]
    with torch.no_grad():
        try:
            got = module._apply_gate(fused.to(_dtype(module)))
        except Exception:  # noqa: BLE001 - a gate that cannot run on a probe is not the declared one
            return False
        want = f(g.to(_dtype(module)), u.to(_dtype(module)))[None]
    return tuple(got.shape) == tuple(want.shape) and torch.allclose(got.float(), want.float(), rtol=1e-5, atol=1e-5)


def _dtype(module: nn.Module) -> torch.dtype:
    p = next(module.parameters(recurse=False), None)
    return torch.float32 if p is None or not p.is_floating_point() else p.dtype


def activation(module: nn.Module, storage: ExpertStorage, check: bool = True) -> Activation | str:
    """The declared ``h = f(g, u)`` of ``module``'s experts, or why it is not known; ``check`` also runs the
    module's ``_apply_gate`` on probe values against it (once, at analysis and install; not per forward)."""
    cls = stock_class(module)
    name = cls.__name__
    apply_gate = getattr(cls, "_apply_gate", None)
    default = apply_gate is not None and getattr(apply_gate, "__name__", "") == "_default_apply_gate"
    if name in _GATES:
        if getattr(apply_gate, "__qualname__", "") != f"{name}._apply_gate":
            return f"{name}._apply_gate is not the {name} gate whose activation is declared"
        f = _GATES[name](module)
    elif apply_gate is not None and not default:
        return f"{name} gates with its own {name}._apply_gate, an activation that is not declared"
    else:
        act = getattr(module, _ACT_ATTR.get(name, "act_fn"), None)
        if not callable(act):
            return f"{name} has no act_fn (not act(gate) * up experts)"
        f = _act_times_up(act)
    if check and apply_gate is not None and not _gate_matches(module, storage, f):
        return f"{name}._apply_gate does not compute the activation declared for it"
    return f


def untrainable(module: nn.Module, storage: ExpertStorage | None = None) -> str | None:
    """Why S²FT cannot train ``module``'s experts (None: it can); the one rule the analysis and install share."""
    name = stock_class(module).__name__
    storage = storage_of(module) if storage is None else storage
    if storage is None:
        return f"{name} holds no expert tensors in a known layout"
    if storage.gate_up is None and storage.gate is None or getattr(module, "has_gate", True) is False:
        return f"{name} has no gate (up -> act -> down experts)"
    if getattr(module, "has_post_expert_norm", False):
        return f"{name} normalises each expert's output"
    if storage.gate_up is None and any(
        isinstance(getattr(module, f"{p}_bias", None), torch.Tensor) for p in (storage.gate, storage.up)
    ):
        return f"{name} has biases on separate gate/up weights"
    f = activation(module, storage)
    return f if isinstance(f, str) else None


def gate_up_bias(module: nn.Module, storage: ExpertStorage) -> torch.Tensor | None:
    """The fused gate/up bias ``[E, 2I]`` (same channel positions as the fused weight's rows), or None."""
    if storage.gate_up is None:
        return None
    b = getattr(module, f"{storage.gate_up}_bias", None)
    return b if isinstance(b, torch.Tensor) else None
