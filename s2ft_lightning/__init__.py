"""S²FT (Structured Sparse Fine-Tuning) for PyTorch Lightning.

Lightning parts: `S2FTModule`, the `S2FT` callback, `load_checkpoint`, adapter/merge/report callbacks. Plain
PyTorch: `prepare_model` (surgery + S2 layers), `trainable_state_dict`, adapter extract/save/load/merge/fuse,
merged export. Names are imported on first use, so ``import s2ft_lightning.adapters`` (or layers, ops) does not
pull in Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

from s2ft_lightning._version import __version__ as __version__

_EXPORTS = {
    "S2FT": "s2ft_lightning.callbacks",
    "AdapterCheckpoint": "s2ft_lightning.callbacks",
    "MergeAdapters": "s2ft_lightning.callbacks",
    "S2FTModule": "s2ft_lightning.module",
    "WarmupLinear": "s2ft_lightning.module",
    "HeldOutAccuracy": "s2ft_lightning.reporting",
    "LossCurve": "s2ft_lightning.reporting",
    "RunSummary": "s2ft_lightning.reporting",
    "StepLog": "s2ft_lightning.reporting",
    "SaveOnInterrupt": "s2ft_lightning.interrupt",
    "CheckpointError": "s2ft_lightning.attach",
    "ModelStateError": "surgery.transaction",
    "load_checkpoint": "s2ft_lightning.attach",
    "S2Config": "s2ft_lightning.pipeline",
    "applied_plan": "s2ft_lightning.pipeline",
    "prepare_model": "s2ft_lightning.pipeline",
    "state_dict_form": "s2ft_lightning.layers",
    "trainable_state_dict": "s2ft_lightning.layers",
    "export_merged": "s2ft_lightning.export",
    "merged_copy": "s2ft_lightning.export",
    "Adapter": "s2ft_lightning.adapters",
    "AdapterBank": "s2ft_lightning.adapters",
    "AdapterError": "s2ft_lightning.adapters",
    "extract_adapter": "s2ft_lightning.adapters",
    "export_peft_lora": "s2ft_lightning.adapters",
    "fuse_adapters": "s2ft_lightning.adapters",
    "load_adapter": "s2ft_lightning.adapters",
    "merge_adapter": "s2ft_lightning.adapters",
    "save_adapter": "s2ft_lightning.adapters",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 's2ft_lightning' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
