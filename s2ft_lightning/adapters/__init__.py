"""S²FT adapters: the format and its base checks, extraction, files, merge/switch, fusion, serving, CLI.

One module per job: `format` (Adapter, BlockDelta, base checks), `extract` (from a trained model or two stock
models), `files` (directories on disk), `bank` (merge / unmerge / switch, bit-exact), `fusion`, `serving`
(a batched forward where every row runs its own adapter), `peft_export` (the adapter as an exact PEFT LoRA
adapter) and `cli` (``s2ft adapter ...``).
"""

from s2ft_lightning.adapters.bank import AdapterBank, merge_adapter
from s2ft_lightning.adapters.extract import block_delta, diff_adapter, extract_adapter
from s2ft_lightning.adapters.files import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    list_adapters,
    load_adapter,
    load_adapters,
    save_adapter,
    save_adapters,
)
from s2ft_lightning.adapters.format import Adapter, AdapterError, BaseCheck, BlockDelta, check_base
from s2ft_lightning.adapters.fusion import FusionReport, fuse_adapters
from s2ft_lightning.adapters.peft_export import export_peft_lora, lora_factors
from s2ft_lightning.adapters.serving import MultiAdapterModel

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "Adapter",
    "AdapterBank",
    "AdapterError",
    "BaseCheck",
    "BlockDelta",
    "FusionReport",
    "MultiAdapterModel",
    "block_delta",
    "check_base",
    "diff_adapter",
    "export_peft_lora",
    "extract_adapter",
    "fuse_adapters",
    "list_adapters",
    "load_adapter",
    "load_adapters",
    "lora_factors",
    "merge_adapter",
    "save_adapter",
    "save_adapters",
]
