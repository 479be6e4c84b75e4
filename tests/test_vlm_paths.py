"""Vision-language checkpoints go through the paths users take: a saved folder loads with its image-text-to-text
class, S2FTModule fine-tunes the language tower on text, a checkpoint reloads in a fresh module, and the adapter
merges into a fresh stock copy and exports as a PEFT LoRA that reproduces the trained model."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from tiny_tokenizer import build_tiny_tokenizer, save_tiny_llama
from transformers import AutoModelForImageTextToText

from benchmarks.tiny_models import perturb, tiny_config
from s2ft_lightning import S2Config, S2FTModule, extract_adapter, load_checkpoint, merge_adapter
from s2ft_lightning.adapters import export_peft_lora
from s2ft_lightning.data import ReasoningGymDataModule
from s2ft_lightning.models import load_model

S2 = S2Config(o_ratio=0.25, d_ratio=0.25, seed=3)
IDS = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(0))


def _save_vlm(model_type: str, folder):
    """A tiny checkpoint whose text vocabulary holds the tokenizer's ids and whose image/video ids lie above them."""
    tok = build_tiny_tokenizer()
    cfg = tiny_config(model_type)
    cfg.get_text_config().vocab_size = 512
    for i, key in enumerate(("image_token_id", "image_token_index", "video_token_id", "vision_start_token_id")):
        if getattr(cfg, key, None) is not None:
            setattr(cfg, key, 500 + i)
    torch.manual_seed(0)
    model = perturb(AutoModelForImageTextToText.from_config(cfg), seed=1, scale=0.05)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("model_type", ["llava", "qwen2_vl", "mistral3"])
def test_vision_language_folder_fine_tunes_reloads_merges_and_exports(model_type, tmp_path):
    from peft import PeftModel

    folder = _save_vlm(model_type, tmp_path / model_type)
    kw = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2, "operators": ["+"]}
    dm = ReasoningGymDataModule(str(folder), task_kwargs=kw, train_size=8, val_size=0, batch_size=4, max_length=48)
    module = S2FTModule(str(folder), s2=S2, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    model = module.model
    assert isinstance(model, AutoModelForImageTextToText._model_mapping[type(model.config)])
    assert all(".language_model." in s.module for s in module.plan.slices)
    want = _logits(model)
    stock = AutoModelForImageTextToText.from_pretrained(str(folder))
    assert (_logits(stock) - want).abs().max() > 1e-4  # training moved the language tower

    trainer.save_checkpoint(tmp_path / "last.ckpt")
    fresh = load_checkpoint(S2FTModule(str(folder), s2=S2), tmp_path / "last.ckpt")
    torch.testing.assert_close(_logits(fresh.model), want, atol=1e-5 * float(want.abs().max()), rtol=0)

    adapter = extract_adapter(model, module.plan)
    merge_adapter(stock, adapter)
    torch.testing.assert_close(_logits(stock), want, atol=1e-5 * float(want.abs().max()), rtol=0)
    export_peft_lora(adapter, tmp_path / "lora")
    served = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(str(folder)), tmp_path / "lora")
    torch.testing.assert_close(_logits(served), want, atol=1e-5 * float(want.abs().max()), rtol=0)


def test_a_folder_without_a_next_token_head_is_refused_naming_the_fix(tmp_path):
    from transformers import DistilBertConfig, DistilBertModel

    folder = save_tiny_llama(tmp_path / "llama")
    assert type(load_model(folder)[0]).__name__ == "LlamaForCausalLM"
    bert = tmp_path / "distilbert"
    DistilBertModel(DistilBertConfig(vocab_size=400, dim=32, hidden_dim=64, n_layers=1, n_heads=2)).save_pretrained(
        bert
    )
    build_tiny_tokenizer().save_pretrained(bert)
    before = sorted(p.name for p in bert.iterdir())
    with pytest.raises(ValueError, match=r"'distilbert'.*no causal-LM head.*task='sequence_classification'"):
        load_model(bert)
    assert sorted(p.name for p in bert.iterdir()) == before
