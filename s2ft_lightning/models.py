"""Local-only loading of Hugging Face models and tokenizers (folders or single GGUF files).

Everything here passes ``local_files_only=True``: a typo in a path must fail with a clear message, never
turn into a hub download.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import torch

Task = Literal["causal_lm", "sequence_classification"]

_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model*.safetensors.index.json", "*.pt")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "32": torch.float32,
    "32-true": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "bf16-true": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "16-true": torch.float16,
}


def quiet_torchao_import() -> None:
    """Silence what importing torchao prints (transformers imports it whenever it is installed): "Failed to load
    ... _C_mxfp8 / _C_cutlass_90a" for CUDA kernels S²FT never uses, and torch's pytree notes on its enums.
    Only these two loggers; an error is still shown. Called by the command-line entry points."""
    import logging

    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


class ModelLoadError(ValueError):
    """A model path that cannot be loaded (missing, not a model, wrong format); the message says why."""


def gguf_available() -> bool:
    """True when the ``gguf`` package (needed by transformers to read GGUF files) can be imported."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        return False
    return True


def require_gguf() -> None:
    """Raise a clear error when GGUF loading is requested without the ``gguf`` package."""
    if not gguf_available():
        raise ImportError(
            "Loading a .gguf file needs the `gguf` package (and `accelerate`): pip install gguf accelerate"
        )


def check_gguf(path: Path) -> None:
    """Refuse a .gguf file that the gguf reader cannot parse (truncated download, wrong file) by name."""
    import gguf

    try:
        gguf.GGUFReader(str(path), "r")
    except Exception as e:  # the reader raises ValueError/struct.error/IndexError/... on bad files
        size = path.stat().st_size
        raise ModelLoadError(
            f"{str(path)!r} ({size:,} bytes) is not a readable GGUF file (truncated or corrupted?): "
            f"{type(e).__name__}: {str(e).rstrip('.')}. Download it again or pass another model"
        ) from e


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str:
    """Map user spellings ('bf16', 'float32', torch.bfloat16, 'auto') to what ``from_pretrained`` takes."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)} or 'auto' or a torch.dtype")
    return _DTYPES[key]


DEMO_ALIAS = "demo:smollm2"


def check_source(path: str | os.PathLike) -> None:
    """Refuse a model path that cannot work, cheaply and before anything is loaded or downloaded.

    The demo alias is checked for a usable cache folder; local paths must exist and look like a model.
    """
    if str(path) == DEMO_ALIAS:
        from s2ft_lightning.demo import check_target, default_cache_dir

        check_target(default_cache_dir())
        return
    _resolve_source(path)


def resolve_path(path: str | os.PathLike) -> Path:
    """A local path for ``path``; the alias ``demo:smollm2`` prepares the offline demo model once."""
    if str(path) == DEMO_ALIAS:
        from s2ft_lightning.demo import prepare_demo_model

        return prepare_demo_model()
    if str(path).startswith("demo:"):
        raise ModelLoadError(f"unknown demo model {str(path)!r}; the only one is {DEMO_ALIAS!r}")
    return Path(path).expanduser()


def _resolve_source(path: str | os.PathLike) -> tuple[Path, str | None]:
    """Return (folder, gguf file name or None) for a model path, or raise ModelLoadError saying why not."""
    p = resolve_path(path)
    if not p.exists():
        raise ModelLoadError(
            f"model path {str(p)!r} does not exist. Expected a local Hugging Face model folder (with "
            "config.json and *.safetensors) or a .gguf file (hub ids are not downloaded), or demo:smollm2 for the "
            "offline demo model."
        )
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ModelLoadError(
                f"{str(p)!r} is a file but not a .gguf file; pass a model folder (config.json + weights) "
                "or a .gguf file"
            )
        require_gguf()
        check_gguf(p)
        return p.parent, p.name
    if (p / "config.json").is_file():
        if not any(next(p.glob(pat), None) for pat in _WEIGHT_PATTERNS):
            raise ModelLoadError(
                f"{str(p)!r} has config.json but no weights (looked for {', '.join(_WEIGHT_PATTERNS)})"
            )
        return p, None
    ggufs = sorted(p.glob("*.gguf"))
    if len(ggufs) == 1:
        require_gguf()
        check_gguf(ggufs[0])
        return p, ggufs[0].name
    found = sorted(x.name for x in p.iterdir())[:10]
    hint = f"; it holds {len(ggufs)} .gguf files, pass one of them directly" if ggufs else ""
    raise ModelLoadError(
        f"{str(p)!r} is not a model folder: no config.json (contents: {found}){hint}. Expected a "
        "Hugging Face folder saved with save_pretrained, or a .gguf file."
    )


def prepare_tokenizer(tokenizer: Any, padding_side: str = "right") -> Any:
    """Give a tokenizer a pad token (eos when missing) and the padding side used for training."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("tokenizer has neither a pad nor an eos token; set tokenizer.pad_token first")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_tokenizer(path: str | os.PathLike) -> Any:
    """Load the tokenizer of a local model folder or .gguf file, with pad token and right padding set."""
    from transformers import AutoTokenizer

    p = resolve_path(path)
    if p.is_dir() and any((p / n).is_file() for n in _TOKENIZER_FILES):
        folder, gguf_file = p, None  # a tokenizer-only folder is fine here
    else:
        folder, gguf_file = _resolve_source(p)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"could not load a tokenizer from {str(p)!r}: {e}. Save one next to the model with "
            "tokenizer.save_pretrained(<folder>)."
        ) from e
    return prepare_tokenizer(tokenizer)


def context_length_from_path(path: str | os.PathLike) -> int | None:
    """Read the model's context length (max_position_embeddings or equivalent) from a folder's config.json."""
    p = resolve_path(path)
    cfg_file = p / "config.json" if p.is_dir() else p.parent / "config.json"
    if p.suffix.lower() == ".gguf" or not cfg_file.is_file():
        return None
    cfg = json.loads(cfg_file.read_text())
    return context_length_from_config(cfg)


def context_length_from_config(config: Any) -> int | None:
    """Context length from a config object or dict (None when the architecture does not state one)."""
    for key in _CONTEXT_KEYS:
        value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _causal_lm_class(folder: Path, gguf_file: str | None) -> Any:
    """AutoModelForCausalLM, or for a vision-language folder (LLaVA, Qwen2-VL, Mistral-3, ...) the
    image-text-to-text class: its forward takes token ids alone, so the language tower trains on text
    (the vision tower stays frozen, docs/ARCHITECTURE.md "Partial coverage and composite models")."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    if gguf_file:
        return AutoModelForCausalLM
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    if type(config) in AutoModelForCausalLM._model_mapping:
        return AutoModelForCausalLM
    if type(config) in AutoModelForImageTextToText._model_mapping:
        return AutoModelForImageTextToText
    raise ValueError(
        f"{folder}: model type {config.model_type!r} ({type(config).__name__}) has no causal-LM head in "
        "transformers (neither AutoModelForCausalLM nor AutoModelForImageTextToText knows it), so it cannot be "
        "fine-tuned for next-token prediction; for a classifier pass task='sequence_classification' "
        "(--model.task sequence_classification), otherwise pick a causal LM or a vision-language checkpoint"
    )


def load_model(
    path: str | os.PathLike,
    *,
    task: Task = "causal_lm",
    dtype: torch.dtype | str | None = torch.float32,
    num_labels: int | None = None,
    attn_implementation: str | None = None,
) -> tuple[torch.nn.Module, Any]:
    """Load ``(model, tokenizer)`` from a local HF folder or a .gguf file; never touches the hub.

    ``task`` picks the head (causal LM or sequence classification with ``num_labels``). The tokenizer gets a
    pad token (eos if missing) and right padding, and so does the generation config; the model config is
    changed only for classification (its head needs ``pad_token_id``).
    """
    from transformers import AutoModelForSequenceClassification

    if task not in ("causal_lm", "sequence_classification"):
        raise ValueError(f"task must be 'causal_lm' or 'sequence_classification', got {task!r}")
    if task == "causal_lm" and num_labels is not None:
        raise ValueError("num_labels only applies to task='sequence_classification'")
    folder, gguf_file = _resolve_source(path)
    tokenizer = load_tokenizer(folder / gguf_file if gguf_file else folder)
    kwargs: dict[str, Any] = {"local_files_only": True, "dtype": resolve_dtype(dtype)}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if task == "causal_lm":
        model = _causal_lm_class(folder, gguf_file).from_pretrained(str(folder), **kwargs)
    else:
        if num_labels is not None:
            kwargs["num_labels"] = num_labels
        model = AutoModelForSequenceClassification.from_pretrained(str(folder), **kwargs)
        # Classification heads pick the last non-pad token; without pad_token_id batching fails.
        model.config.pad_token_id = tokenizer.pad_token_id
    # A causal LM's config is left as stored (pad_token_id may stay null): generation reads its own config.
    gen = getattr(model, "generation_config", None)
    if gen is not None and getattr(gen, "pad_token_id", None) is None:
        gen.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
