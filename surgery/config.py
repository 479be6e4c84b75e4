"""`SelectionConfig`: which heads and channels S²FT trains, defined once, validated, with help text.

`surgery.select`, `surgery.planner`, `s2ft_lightning.S2Config` (which adds the training-side settings), the
tools and the YAML recipes all read these fields from here; jsonargparse shows the ``Args`` below as help.
"""

from __future__ import annotations

import argparse
import math
import typing
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

STRATEGIES = ("random", "weight", "activation", "weight_activation", "gradient")
DATA_STRATEGIES = ("activation", "weight_activation", "gradient")
VARIANTS = ("large", "small")
ALLOCATIONS = ("even", "global")
# Trainable role -> its budget field.
RATIO_KEYS = {"o": "o_ratio", "v": "v_ratio", "up": "u_ratio", "down": "d_ratio"}


class SelectionError(ValueError):
    """A budget, strategy or calibration set that cannot produce a valid selection."""


@dataclass(frozen=True)
class SelectionConfig:
    """Which attention heads and FFN channels train, per layer.

    Args:
        o_ratio: Fraction of attention heads per layer whose output-projection (O) columns train, e.g. 0.05
            (at least one head per layer when > 0). The paper's LLaMA2-7B recipe: 0.052.
        v_ratio: Fraction of value heads per layer (kv groups under GQA) whose V rows train.
        u_ratio: Fraction of FFN channels per layer whose up (and gate) rows train.
        d_ratio: Fraction of FFN channels per layer whose down-projection columns train, e.g. 0.02 (the paper's
            LLaMA2-7B recipe; LLaMA3-8B: 0.03).
        strategy: How units are scored: random, weight (weight norm), activation (input norm on calibration
            data), weight_activation (their product) or gradient (on calibration data).
        variant: Keep the "large" (highest) or "small" (lowest) scores; ignored by strategy random.
        allocation: "even" trains round(ratio x units) per layer (at least 1); "global" spreads the same total
            over the layers at random, as the paper does.
        seed: Seed of random selection and of the "global" allocation.
    """

    o_ratio: float = 0.0
    v_ratio: float = 0.0
    u_ratio: float = 0.0
    d_ratio: float = 0.02
    strategy: Literal["random", "weight", "activation", "weight_activation", "gradient"] = "random"
    variant: Literal["large", "small"] = "large"
    allocation: Literal["even", "global"] = "even"
    seed: int = 42

    def __post_init__(self) -> None:
        for key, r in self.ratios().items():
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r):
                raise SelectionError(f"{key}={r!r} must be a number in [0, 1)")
            if not 0.0 <= r < 1.0:
                hint = (
                    "1 trains every unit: that is full fine-tuning of those weights, not S²FT"
                    if r == 1.0
                    else "it is the fraction of heads (o, v) or FFN channels (u, d) trained per layer, e.g. 0.05"
                )
                raise SelectionError(f"{key}={r} is outside [0, 1): {hint}")
        if not any(self.ratios().values()):
            raise SelectionError(
                "every ratio is 0, so nothing would be trained; set at least one of " + ", ".join(RATIO_KEYS.values())
            )
        for key, allowed in (("strategy", STRATEGIES), ("variant", VARIANTS), ("allocation", ALLOCATIONS)):
            if getattr(self, key) not in allowed:
                raise SelectionError(f"unknown {key} {getattr(self, key)!r}; valid: {', '.join(allowed)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise SelectionError(f"seed={self.seed!r} must be an int")

    def ratios(self) -> dict[str, float]:
        """The four budgets by field name."""
        return {"o_ratio": self.o_ratio, "v_ratio": self.v_ratio, "u_ratio": self.u_ratio, "d_ratio": self.d_ratio}

    def role_ratios(self) -> dict[str, float]:
        """The four budgets by role ("o", "v", "up", "down")."""
        return {role: float(getattr(self, key)) for role, key in RATIO_KEYS.items()}

    @property
    def needs_data(self) -> bool:
        """True when scoring needs calibration batches."""
        return self.strategy in DATA_STRATEGIES

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> SelectionConfig:
        """The keyword form of the functions (``make_plan(model, o_ratio=0.5)``): ratios not given are 0.

        Any keyword that is not a selection field is named in the error.
        """
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown selection setting(s) {unknown}; valid: {sorted(names)}")
        return cls(**{**dict.fromkeys(RATIO_KEYS.values(), 0.0), **kwargs})


def resolve(config: SelectionConfig | None, kwargs: dict[str, Any]) -> SelectionConfig:
    """``config`` or the keyword form, refusing a mix of both."""
    if config is not None and kwargs:
        raise TypeError(f"pass either a SelectionConfig or keyword settings, not both (got {sorted(kwargs)})")
    if config is None:
        return SelectionConfig.from_kwargs(**kwargs)
    if not isinstance(config, SelectionConfig):
        raise TypeError(f"config must be a SelectionConfig (or S2Config), not {type(config).__name__}")
    return config


def field_help(cls: type) -> dict[str, str]:
    """``{field: help}`` from the ``Args:`` section of a dataclass docstring (and its bases'), for CLIs."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        doc = klass.__dict__.get("__doc__") or ""
        if "Args:" not in doc:
            continue
        name = None
        for line in doc.split("Args:", 1)[1].splitlines():
            text = line.strip()
            if not text:
                continue
            indent = len(line) - len(line.lstrip())
            if ":" in text and indent <= 8 and text.split(":", 1)[0].isidentifier():
                name, rest = text.split(":", 1)
                out[name] = rest.strip()
            elif name is not None:
                out[name] += " " + text
    return out


def add_arguments(parser: Any, cls: type = SelectionConfig, **defaults: Any) -> None:
    """Add ``--o-ratio`` … ``--seed`` (every field of ``cls``) to an argparse parser, with the fields' help."""
    helps, hints = field_help(cls), typing.get_type_hints(cls)
    for f in fields(cls):
        default = defaults.get(f.name, f.default)
        flag = "--" + f.name.replace("_", "-")
        if hints[f.name] is bool:
            parser.add_argument(flag, default=default, action=argparse.BooleanOptionalAction, help=helps.get(f.name))
        elif typing.get_origin(hints[f.name]) is Literal:
            parser.add_argument(flag, default=default, choices=typing.get_args(hints[f.name]), help=helps.get(f.name))
        else:
            parser.add_argument(flag, type=hints[f.name], default=default, help=helps.get(f.name))


def from_namespace(args: Any, cls: type = SelectionConfig) -> SelectionConfig:
    """Build ``cls`` from the attributes `add_arguments` created."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})
