"""Adapter directories on disk: ``adapter_config.json`` + ``adapter_model.safetensors``, never pickle.

One adapter per directory, or several named ones as subdirectories; written atomically, validated (format
version, checksums, shapes) when read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from s2ft_lightning._version import __version__
from s2ft_lightning.adapters.format import Adapter, AdapterError, BaseCheck, BlockDelta, tensor_sha256
from s2ft_lightning.atomic import atomic_directory

ADAPTER_FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
METHOD = "S2FT"


def _config_dict(adapter: Adapter) -> dict:
    modules: dict[str, Any] = {}
    for b in adapter.blocks:
        entry = modules.setdefault(
            b.module,
            {
                "kind": adapter.module_kinds[b.module],
                "shape": list(adapter.module_shapes[b.module]),
                "blocks": {},
            },
        )
        entry["blocks"][b.feature] = {
            "indices": list(b.indices),
            "delta_sha256": tensor_sha256(b.delta),
            "base_checks": [vars(c).copy() for c in b.base_checks],
        }
    return {
        "method": METHOD,
        "format_version": ADAPTER_FORMAT_VERSION,
        "package_version": __version__,
        "name": adapter.name,
        "base_model": adapter.base_model,
        "base_fingerprint": adapter.base_fingerprint,
        "base_values_sha256": adapter.base_values_sha256,
        "dtype": "float32",
        "num_params": adapter.num_params,
        "modules": modules,
        "metadata": adapter.metadata,
    }


def _write_adapter_files(adapter: Adapter, d: Path) -> None:
    from safetensors.torch import save_file

    adapter.validate()
    (d / CONFIG_NAME).write_text(json.dumps(_config_dict(adapter), indent=1))
    save_file(
        {b.key: b.delta.contiguous() for b in adapter.blocks},
        str(d / WEIGHTS_NAME),
        metadata={"format": "pt"},
    )


def save_adapter(adapter: Adapter, path: str | os.PathLike) -> None:
    """Write one adapter directory atomically."""
    with atomic_directory(path) as d:
        _write_adapter_files(adapter, d)


def save_adapters(adapters: Mapping[str, Adapter], path: str | os.PathLike) -> None:
    """Write several named adapters as subdirectories of ``path`` (atomically, as one directory)."""
    for n in adapters:
        if not n or "/" in n or n.startswith("."):
            raise AdapterError(f"adapter name {n!r} is not a valid directory name")

    with atomic_directory(path) as d:
        for n, a in adapters.items():
            (d / n).mkdir()
            _write_adapter_files(a, d / n)


def list_adapters(path: str | os.PathLike) -> list[str]:
    """Names of the adapters stored as subdirectories of ``path`` ("" when ``path`` itself is one)."""
    path = Path(path)
    if (path / CONFIG_NAME).is_file():
        return [""]
    if path.exists() and not path.is_dir():
        raise AdapterError(
            f"{str(path)!r} is a file, not an adapter directory; pass the folder that holds {CONFIG_NAME} "
            "(a fit run writes <run>/adapter/default)"
        )
    if not path.is_dir():
        raise AdapterError(f"adapter directory {str(path)!r} does not exist")
    return sorted(p.name for p in path.iterdir() if (p / CONFIG_NAME).is_file())


def load_adapter(path: str | os.PathLike, name: str | None = None) -> Adapter:
    """Load and validate an adapter directory (or the subdirectory ``name`` of a multi-adapter one)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path) / name if name else Path(path)
    cfg_path, w_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    if path.exists() and not path.is_dir():
        raise AdapterError(
            f"{str(path)!r} is a file, not an adapter directory; pass the folder that holds {CONFIG_NAME}"
        )
    for p in (cfg_path, w_path):
        if not p.is_file():
            hint = "" if path.is_dir() else " (the directory does not exist)"
            raise AdapterError(f"adapter file {str(p)!r} is missing{hint}; is {str(path)!r} an S2FT adapter?")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{str(cfg_path)!r} is not valid JSON (truncated or corrupted?): {e}") from e
    if not isinstance(cfg, dict) or cfg.get("method") != METHOD:
        raise AdapterError(f"{str(cfg_path)!r} is not an S2FT adapter config (method must be {METHOD!r})")
    if cfg.get("format_version") != ADAPTER_FORMAT_VERSION:
        raise AdapterError(
            f"adapter format_version {cfg.get('format_version')} is not supported (expected "
            f"{ADAPTER_FORMAT_VERSION}); re-export the adapter with this version of s2ft-lightning"
        )
    try:
        tensors = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterError(f"{str(w_path)!r} cannot be read (truncated or corrupted safetensors?): {e}") from e
    try:
        blocks, shapes, kinds, keys = [], {}, {}, set()
        for mod_name, entry in cfg["modules"].items():
            shapes[mod_name] = tuple(int(x) for x in entry["shape"])
            kinds[mod_name] = str(entry["kind"])
            for feature, be in entry["blocks"].items():
                b = BlockDelta(mod_name, feature, [int(i) for i in be["indices"]], torch.empty(0))
                keys.add(b.key)
                if b.key not in tensors:
                    raise AdapterError(f"{str(w_path)!r} lacks tensor {b.key!r} listed in the config")
                b.delta = tensors[b.key].float()
                if tensor_sha256(tensors[b.key]) != be["delta_sha256"]:
                    raise AdapterError(f"tensor {b.key!r} in {str(w_path)!r} does not match its checksum (corrupted)")
                b.base_checks = [BaseCheck(**c) for c in be["base_checks"]]
                blocks.append(b)
        extra = set(tensors) - keys
        if extra:
            raise AdapterError(f"{str(w_path)!r} holds tensors not in the config: {sorted(extra)[:3]}")
        adapter = Adapter(
            blocks,
            str(cfg["base_fingerprint"]),
            shapes,
            kinds,
            base_model=cfg.get("base_model"),
            name=cfg.get("name") or name,
            metadata=dict(cfg.get("metadata") or {}),
        )
    except AdapterError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise AdapterError(f"malformed adapter config {str(cfg_path)!r}: {type(e).__name__}: {e}") from e
    adapter.validate()
    return adapter


def load_adapters(path: str | os.PathLike) -> dict[str, Adapter]:
    """All adapters of a directory by name (a single-adapter directory: its config name or "default")."""
    names = list_adapters(path)
    if names == [""]:
        a = load_adapter(path)
        return {a.name or "default": a}
    if not names:
        raise AdapterError(f"{str(path)!r} holds no adapter (no {CONFIG_NAME} in it or its subdirectories)")
    return {n: load_adapter(path, n) for n in names}
