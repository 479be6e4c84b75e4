"""S²FT (Structured Sparse Fine-Tuning) for PyTorch Lightning.

Lightning parts: `S2FTModule`, the `S2FT` callback, `load_checkpoint`, adapter/merge callbacks. Plain PyTorch:
`prepare_model` (surgery + S2 layers), `trainable_state_dict`, adapter extract/save/load/merge, merged export.
"""

from s2ft_lightning._version import __version__
from s2ft_lightning.adapters import (
    Adapter,
    AdapterBank,
    AdapterError,
    extract_adapter,
    fuse_adapters,
    load_adapter,
    merge_adapter,
    save_adapter,
)
from s2ft_lightning.attach import CheckpointError, load_checkpoint
from s2ft_lightning.callbacks import S2FT, AdapterCheckpoint, MergeAdapters
from s2ft_lightning.export import export_merged, merged_copy
from s2ft_lightning.layers import state_dict_form, trainable_state_dict
from s2ft_lightning.module import S2FTModule, WarmupLinear
from s2ft_lightning.pipeline import S2Config, applied_plan, prepare_model
from s2ft_lightning.reporting import HeldOutAccuracy, LossCurve

__all__ = [
    "S2FT",
    "Adapter",
    "AdapterBank",
    "AdapterCheckpoint",
    "AdapterError",
    "CheckpointError",
    "HeldOutAccuracy",
    "LossCurve",
    "MergeAdapters",
    "S2Config",
    "S2FTModule",
    "WarmupLinear",
    "__version__",
    "applied_plan",
    "export_merged",
    "extract_adapter",
    "fuse_adapters",
    "load_adapter",
    "load_checkpoint",
    "merge_adapter",
    "merged_copy",
    "prepare_model",
    "save_adapter",
    "state_dict_form",
    "trainable_state_dict",
]
