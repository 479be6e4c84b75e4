"""`S2Plan`: what S²FT trains, where it sits after permutation, and the proof it is safe.

Indices are kept in two spaces. ``selected`` and ``BlockSlice.original`` are in the ORIGINAL
(unpermuted) model's index space, so adapters stay portable to a stock base. ``permutations`` and
``BlockSlice.runs`` describe the permuted model: new position ``p`` holds old index ``perm[p]``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

PLAN_FORMAT_VERSION = 1

# Config keys that do not change what the model computes from input ids: how it was stored, which tokens a
# tokenizer or generation uses, label names. Loading code fills some of them in (e.g. ``pad_token_id`` from the
# tokenizer when a Llama config has null), so hashing them would make a base refuse its own adapters.
_NON_FUNCTION_CONFIG_KEYS = {
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "architectures",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "_experts_implementation",
    "attn_implementation",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "_commit_hash",
    "tokenizer_class",
    "prefix",
    "task_specific_params",
    "id2label",
    "label2id",
    "finetuning_task",
    "problem_type",
    "generation_config",
    "max_length",
    "min_length",
    "do_sample",
    "num_beams",
    "temperature",
    "top_k",
    "top_p",
    "chunk_size_feed_forward",
    "torchscript",
}


def _function_config(config: Any) -> dict:
    """The config fields that determine the computed function (`_NON_FUNCTION_CONFIG_KEYS` and ``*_token_id(s)``
    left out)."""
    return {
        k: v
        for k, v in config.to_dict().items()
        if k not in _NON_FUNCTION_CONFIG_KEYS and not k.endswith(("_token_id", "_token_ids"))
    }


class PlanError(ValueError):
    """A plan that cannot be read, or does not belong to the model it is applied to."""


def model_fingerprint(model: torch.nn.Module, exclude: Callable[[str], bool] | None = None) -> str:
    """Hash of what fixes the model's function up to its weights: architecture config fields and parameter
    names and shapes. Token ids, tokenizer, generation and storage fields are left out, so loading a base (which
    may fill in ``pad_token_id``) never changes it; the weights themselves are checked per adapter/checkpoint
    by hashes of the touched base values. ``exclude(name)`` leaves parameters out (e.g. added trainable ones)."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        h.update(json.dumps(_function_config(config), sort_keys=True, default=str).encode())
    for name, p in model.named_parameters(remove_duplicate=False):
        if exclude is not None and exclude(name):
            continue
        h.update(f"{name}:{tuple(p.shape)};".encode())
    return h.hexdigest()[:16]


@dataclass
class BlockSlice:
    """The trainable block of one linear module, in its feature space after permutation.

    ``feature="out"`` trains rows (output features), ``"in"`` trains columns (input features).
    ``runs`` are half-open ``[start, end)`` ranges, several when GQA forces it; ``original`` lists,
    for each trained position in run order, the feature index in the unpermuted module.
    """

    module: str
    role: str
    feature: Literal["in", "out"]
    runs: list[tuple[int, int]]
    original: list[int]

    @property
    def numel_features(self) -> int:
        return sum(e - s for s, e in self.runs)

    def positions(self) -> list[int]:
        return [i for s, e in self.runs for i in range(s, e)]


@dataclass
class S2Plan:
    """Selection + permutation + slices for one model; JSON round-trips exactly."""

    fingerprint: str
    model_type: str
    permutations: dict[str, list[int]]
    selected: dict[str, dict[str, list[int]]]
    slices: list[BlockSlice]
    settings: dict[str, Any] = field(default_factory=dict)
    certificate: dict[str, Any] | None = None
    format_version: int = PLAN_FORMAT_VERSION

    @property
    def modules(self) -> list[str]:
        return sorted({s.module for s in self.slices})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["slices"] = [{**asdict(s), "runs": [list(r) for r in s.runs]} for s in self.slices]
        return d

    @staticmethod
    def from_dict(d: dict) -> S2Plan:
        try:
            version = int(d.get("format_version", 0))
            if version != PLAN_FORMAT_VERSION:
                raise PlanError(
                    f"plan format_version {version} is not supported (expected {PLAN_FORMAT_VERSION}); "
                    "re-create the plan with this version of s2ft-lightning"
                )
            slices = [
                BlockSlice(
                    module=s["module"],
                    role=s["role"],
                    feature=s["feature"],
                    runs=[(int(a), int(b)) for a, b in s["runs"]],
                    original=[int(i) for i in s["original"]],
                )
                for s in d["slices"]
            ]
            plan = S2Plan(
                fingerprint=str(d["fingerprint"]),
                model_type=str(d["model_type"]),
                permutations={k: [int(i) for i in v] for k, v in d["permutations"].items()},
                selected={k: {r: [int(i) for i in v] for r, v in rs.items()} for k, rs in d["selected"].items()},
                slices=slices,
                settings=dict(d.get("settings", {})),
                certificate=d.get("certificate"),
                format_version=version,
            )
        except PlanError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise PlanError(f"malformed S2 plan: {type(e).__name__}: {e}") from e
        plan.validate()
        return plan

    def validate(self) -> None:
        """Internal consistency: permutations are permutations, runs match ``original``."""
        for name, perm in self.permutations.items():
            if sorted(perm) != list(range(len(perm))):
                raise PlanError(f"plan permutation for {name!r} is not a permutation of 0..{len(perm) - 1}")
        for s in self.slices:
            if s.feature not in ("in", "out"):
                raise PlanError(f"slice of {s.module!r} has feature {s.feature!r}; expected 'in' or 'out'")
            for a, b in s.runs:
                if not 0 <= a < b:
                    raise PlanError(f"slice of {s.module!r} has an empty or negative run [{a}, {b})")
            if s.numel_features != len(s.original):
                raise PlanError(
                    f"slice of {s.module!r}: runs cover {s.numel_features} features but "
                    f"{len(s.original)} original indices are listed"
                )

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        os.replace(tmp, path)  # never leave a half-written plan behind

    @staticmethod
    def load(path: str | os.PathLike) -> S2Plan:
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"plan file {str(path)!r} does not exist")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PlanError(f"plan file {str(path)!r} is not valid JSON (corrupted or truncated?): {e}") from e
        if not isinstance(d, dict):
            raise PlanError(f"plan file {str(path)!r} does not hold a JSON object")
        return S2Plan.from_dict(d)

    def check_model(self, model: torch.nn.Module) -> None:
        """Refuse a model this plan was not made for."""
        fp = model_fingerprint(model)
        if fp != self.fingerprint:
            raise PlanError(
                f"this plan was made for a different model (fingerprint {self.fingerprint}, "
                f"model has {fp}; model_type {self.model_type!r}). Build a new plan for this model."
            )
