"""Partial coverage: what the analysis leaves frozen (and why) instead of refusing the whole model.

A model is refused only when nothing at all is recognised. Otherwise every layer of every stack (a
ModuleList of blocks holding couplings) is checked: a token mixer that is not a recognised attention block
(linear attention, Mamba, anything new) or an FFN that is not recognised stays frozen and is named with its
class; the ratios whose structures exist elsewhere train there (`surgery.select` refuses only a ratio that
has no structure anywhere, quoting these reasons). Towers the analysis cannot drive with token ids (the
vision or audio encoder of a composite model) are analysed like any stack, then kept frozen as a whole: the
probe and the verification feed token ids, so they could not prove a permutation there.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .structures import Coupling, Frozen

if TYPE_CHECKING:
    from .analyze import _Finder

_TOWER_WORDS = ("vision", "visual", "image", "audio", "speech", "video", "pixel")
# Modules of a composite model that only image / audio inputs reach (the towers and their projectors).
_TOWER_MODULES = {
    "vision_tower",
    "visual",
    "vision_model",
    "vision_encoder",
    "image_encoder",
    "audio_tower",
    "audio_encoder",
    "multi_modal_projector",
    "mm_projector",
}
_FFN_WORDS = ("mlp", "ffn", "feed_forward", "moe", "expert")


def sub_configs(config: Any, prefix: str = "") -> dict[int, str]:
    """id(sub-config) -> its dotted key path under ``config`` (text_config, vision_config, thinker.audio_config)."""
    out: dict[int, str] = {}
    for key in getattr(config, "sub_configs", None) or {}:
        sub = getattr(config, key, None)
        if sub is not None and hasattr(sub, "to_dict") and id(sub) not in out:
            out[id(sub)] = prefix + key
            out.update({k: v for k, v in sub_configs(sub, f"{prefix}{key}.").items() if k not in out})
    return out


def tower_of(finder: _Finder, path: str, subs: dict[int, str]) -> str | None:
    """The non-text tower ``path`` lies in (its owning module's path), or None for the language side."""
    parts = path.split(".")
    for i in range(len(parts)):
        prefix = ".".join(parts[: i + 1])
        mod = finder.modules.get(prefix)
        cfg = getattr(mod, "config", None)
        key = subs.get(id(cfg), "") if cfg is not None else ""
        words = f"{key} {type(cfg).__name__ if cfg is not None else ''}".lower()
        if (key and any(w in words for w in _TOWER_WORDS)) or parts[i] in _TOWER_MODULES:
            return prefix
    return None


def split_towers(finder: _Finder) -> None:
    """Move the couplings of vision / audio towers out of ``finder.couplings`` into one frozen entry per tower."""
    for f in list(finder.frozen):  # a part of a tower stays frozen with its tower: one entry says why
        tower = tower_of(finder, f.name, finder.sub_configs)
        if tower is not None:
            finder.frozen.remove(f)
            finder.tower_errors.setdefault(tower, []).append(f"{f.name}: {f.reason}")
    towers: dict[str, list[Coupling]] = {t: [] for t in finder.tower_errors}
    kept = []
    for c in finder.couplings:
        tower = tower_of(finder, c.name, finder.sub_configs)
        (towers.setdefault(tower, []) if tower is not None else kept).append(c)
    finder.couplings = kept
    for tower, cs in sorted(towers.items()):
        kinds = sorted({c.kind for c in cs if c.parent is None})
        found = f"{len(cs)} couplings ({', '.join(kinds)}) recognised" if cs else "nothing recognised"
        errors = finder.tower_errors.get(tower, [])
        unknown = f"; not recognised: {errors[0]}" if errors else ""
        finder.frozen.append(
            Frozen(
                name=tower,
                layer=-1,
                roles=("o", "v", "up", "down"),
                reason=(
                    f"{type(finder.modules[tower]).__name__} is an image/audio-side module ({found}{unknown}): the "
                    "probe and the verification feed token ids, so they cannot prove permutations there; it "
                    "stays frozen"
                ),
            )
        )


def _stacks(finder: _Finder) -> list[tuple[str, nn.ModuleList]]:
    """ModuleLists of blocks that hold couplings. A list of blocks of one class nested in another list wins
    (ALBERT keeps its layers in a list inside a list of layer groups); a list of different sub-layers (T5's
    [attention, FFN] inside each block) does not; a ModuleList of experts is not a stack of blocks."""
    found = [
        (name, mod)
        for name, mod in finder.modules.items()
        if isinstance(mod, nn.ModuleList)
        and len(mod)
        and name
        and not name.endswith("experts")
        and any(re.match(rf"{re.escape(name)}\.\d+\.", c.name + ".") for c in finder.couplings)
    ]
    uniform = {n for n, m in found if len({type(block) for block in m}) == 1}

    def kept(n: str) -> bool:
        inner_uniform = any(o.startswith(f"{n}.") and o in uniform for o, _ in found)
        nested_mixed = n not in uniform and any(n.startswith(f"{o}.") for o, _ in found)
        return not inner_uniform and not nested_mixed

    return [(n, m) for n, m in found if kept(n)]


def _covered(finder: _Finder) -> set[str]:
    paths = {f.name for f in finder.frozen}
    for c in finder.couplings:
        paths.add(c.name)
        for m in c.members:
            paths.add(m.param.rsplit(".", 1)[0])
    return paths


def _has_matrices(mod: nn.Module) -> bool:
    return any(p.dim() >= 2 for p in mod.parameters())


def layer_coverage(finder: _Finder) -> None:
    """Record a frozen entry for every layer's unrecognised token mixer or FFN (see the module docstring)."""
    covered = _covered(finder)
    for stack, layers in _stacks(finder):
        for i, layer in enumerate(layers):
            base = f"{stack}.{i}"
            here = [c for c in finder.couplings if c.name.startswith(base + ".") and c.parent is None]
            frozen_here = [f for f in finder.frozen if f.name.startswith(base + ".")]
            has_heads = any(c.kind == "heads" for c in here) or any("o" in f.roles for f in frozen_here)
            has_ffn = any(c.kind in ("ffn", "experts") for c in here) or any("down" in f.roles for f in frozen_here)
            for child_name, child in layer.named_children():
                path = f"{base}.{child_name}"
                if any(p == path or p.startswith(path + ".") for p in covered) or not _has_matrices(child):
                    continue
                ffn_like = any(w in child_name.lower() for w in _FFN_WORDS)
                if not has_ffn and ffn_like:
                    roles, what = ("up", "down"), "FFN"
                elif not has_heads and not ffn_like:
                    roles, what = ("o", "v"), "token mixer"
                elif not has_ffn:
                    roles, what = ("up", "down"), "FFN"
                else:
                    finder.notes.append(f"{path} ({type(child).__name__}): not a recognised structure; left frozen")
                    continue
                kind = "a recognised attention block" if what == "token mixer" else "a recognised FFN or MoE block"
                finder.frozen.append(
                    Frozen(
                        name=path,
                        layer=i,
                        roles=roles,
                        reason=f"{what} {type(child).__name__} is not {kind}; it stays frozen",
                    )
                )
            frozen_roles = {r for f in finder.frozen if f.layer == i and f.name.startswith(base + ".") for r in f.roles}
            missing = [
                w
                for w, ok, role in (("attention", has_heads, "o"), ("FFN", has_ffn, "down"))
                if not ok and role not in frozen_roles
            ]
            if missing:
                finder.notes.append(f"layer {i} ({base}): no {' and no '.join(missing)} found; nothing there to train")


def main_input_refusal(cls: type) -> str | None:
    """Why a model class whose main input is not token ids cannot be analysed (decided from the class alone)."""
    main = getattr(cls, "main_input_name", "input_ids")
    if main == "input_ids":
        return None
    kind = {"pixel_values": "an image model", "input_features": "a speech model"}.get(main, "not a text model")
    return (
        f"{cls.__name__}'s main input is {main} ({kind}): S²FT's structure probe and verification drive the model "
        "with token ids, so it cannot prove a permutation of this model; image and speech encoders are not "
        "supported yet"
    )


def check_token_model(model: nn.Module, make_inputs: Any, logits_of: Any) -> str | None:
    """Why ``model`` cannot be driven by token ids alone (the probe and verification need that, and outputs
    they can compare: logits or hidden states), or None."""
    name = type(model).__name__
    why = main_input_refusal(type(model))
    if why is not None:
        return why
    try:
        emb = model.get_input_embeddings()
    except (NotImplementedError, AttributeError) as e:
        emb = None
        why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    else:
        why = f"get_input_embeddings() returned {type(emb).__name__}"
    if not isinstance(emb, nn.Embedding):
        return (
            f"{name} has no single token-embedding table ({why}): it is not a token model (e.g. a dual "
            "text/image encoder); analyse its text model alone"
        )
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            inputs = make_inputs(model, 1, 8, 0)
            out = model(**inputs, **({"use_cache": False} if hasattr(model.config, "use_cache") else {}))
    except Exception as e:  # any failure here is the model refusing token-only inputs
        return (
            f"{name} does not run on token ids alone ({type(e).__name__}: {str(e)[:200]}); S²FT's probe and "
            "verification drive the model with token ids"
        )
    finally:
        for m, flag in modes.items():
            m.training = flag
    try:
        logits_of(out)
    except TypeError as e:
        return f"{name} returns no logits or hidden states to compare ({e}); the probe and verification compare them"
    return None
