"""Token ids that seeded check inputs must avoid: the placeholders of images, videos and audio.

A vision-language model replaces each image token of ``input_ids`` by an image feature and refuses inputs
whose image tokens have no image ("Image features and image tokens do not match"); random ids drawn over
the whole vocabulary hit those placeholders (surely on a tiny vocabulary, now and then on a real one). The
probe and verification drive token ids only, so they draw around every such id the config names.
"""

from __future__ import annotations

from typing import Any

import torch

_MEDIA = ("image", "video", "audio", "vision", "boi", "eoi", "boa", "eoa", "media", "patch", "frame", "speech")


def reserved_token_ids(config: Any) -> set[int]:
    """Ids of multimodal placeholder tokens named by ``config`` or its sub-configs (``image_token_id``, ...)."""
    out: set[int] = set()
    todo, seen = [config], set()
    while todo:
        cfg = todo.pop()
        if cfg is None or id(cfg) in seen or not hasattr(cfg, "to_dict"):
            continue
        seen.add(id(cfg))
        for key, v in vars(cfg).items():
            if key.endswith(("_token_id", "_token_index", "_token_ids")) and any(w in key for w in _MEDIA):
                vals = v if isinstance(v, (list, tuple)) else [v]
                out.update(int(x) for x in vals if isinstance(x, int) and not isinstance(x, bool) and x >= 0)
        todo += [getattr(cfg, k, None) for k in getattr(cfg, "sub_configs", None) or {}]
    return out


def draw_token_ids(vocab: int, shape: tuple[int, ...], generator: torch.Generator, reserved: set[int]) -> torch.Tensor:
    """Uniform ids in ``[0, vocab)`` outside ``reserved`` (exactly ``torch.randint`` when nothing is reserved)."""
    allowed = sorted(set(range(vocab)) - reserved) if reserved else None
    if not allowed:
        return torch.randint(0, vocab, shape, generator=generator)
    pick = torch.randint(0, len(allowed), shape, generator=generator)
    return torch.tensor(allowed, dtype=torch.long)[pick]
