"""Offline tiny tokenizer and model folder for data/model-loading tests (no hub access)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "Q: what is 12 + 34?\nA: 46",
    "The capital of France is Paris.",
    "Below is an instruction that describes a task. Write a response.",
    "Calculate 1 + 2 + 3 + 4 + 5 + 6 + 7 + 8 + 9 + 0.",
]


def build_tiny_tokenizer(eos: str = "</s>", chat: bool = True, bos: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few strings; no pad token, so the eos fallback is exercised."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token=eos)
    if chat:
        out.chat_template = CHAT_TEMPLATE
    return out


def save_tiny_llama(folder: Path, *, max_position_embeddings: int = 64) -> Path:
    """Write a random-init 2-layer GQA Llama plus the tiny tokenizer to ``folder`` (save_pretrained)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.tiny_models import perturb

    tok = build_tiny_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    perturb(LlamaForCausalLM(cfg)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def save_tiny_moe(folder: Path, model_type: str = "qwen3_moe") -> Path:
    """Write a random-init tiny MoE causal LM (4 experts, top 2) plus the tiny tokenizer to ``folder``."""
    from benchmarks.tiny_models import tiny_model

    tok = build_tiny_tokenizer()
    model = tiny_model(
        model_type, vocab_size=len(tok), max_position_embeddings=128, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=None,
    )  # fmt: skip
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
