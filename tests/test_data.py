"""Datamodules: label masking, chat templates, packing, collation, reasoning-gym splits, evaluation."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_tokenizer import build_tiny_tokenizer, save_tiny_llama

from s2ft_lightning.data import (
    IGNORE_INDEX,
    CausalLMCollator,
    DataError,
    InstructionDataModule,
    PlainTextDataModule,
    ReasoningGymDataModule,
    SequenceTooLongError,
    encode_instruction,
    evaluate_accuracy,
    exact_match,
    pack_blocks,
)
from s2ft_lightning.data.instruction import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT
from s2ft_lightning.data.reasoning import extract_answer, format_prompt

ADD2 = {
    "min_terms": 2,
    "max_terms": 2,
    "min_digits": 2,
    "max_digits": 2,
    "operators": ["+"],
    "allow_parentheses": False,
    "allow_negation": False,
}
ROWS = [
    {"instruction": "Name the capital of France.", "input": "", "output": "Paris"},
    {"instruction": "Add the numbers.", "input": "12 + 34", "output": "46"},
    {"instruction": "Say hi.", "output": "hi there"},
]


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def loss_part(ex):
    """The tokens that carry a loss, checked to be one contiguous suffix of the row."""
    labels = ex["labels"]
    first = next(i for i, x in enumerate(labels) if x != IGNORE_INDEX)
    assert all(x == IGNORE_INDEX for x in labels[:first])
    assert labels[first:] == ex["input_ids"][first:]
    return ex["input_ids"][:first], labels[first:]


# ---------------------------------------------------------------- collate


def test_collate_pads_right_with_mask_and_ignored_labels():
    c = CausalLMCollator(pad_token_id=7)
    b = c([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4, 5], "labels": [4, 5]}])
    assert b["input_ids"].tolist() == [[1, 2, 3], [4, 5, 7]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b["labels"].tolist() == [[-100, 2, 3], [4, 5, -100]]
    assert b["input_ids"].dtype == torch.long


def test_collate_left_padding_and_multiple_of():
    c = CausalLMCollator(pad_token_id=0, pad_to_multiple_of=8, padding_side="left")
    b = c([{"input_ids": [1, 2, 3]}, {"input_ids": [4] * 9}])
    assert b["input_ids"].shape == (2, 16) and "labels" not in b
    assert b["input_ids"][0, -3:].tolist() == [1, 2, 3] and b["attention_mask"][0].sum() == 3
    assert b["attention_mask"][0, :13].sum() == 0


def test_collate_errors():
    with pytest.raises(ValueError, match="padding_side"):
        CausalLMCollator(pad_token_id=0, padding_side="middle")
    with pytest.raises(ValueError, match="pad_token"):
        CausalLMCollator(pad_token_id=None)
    with pytest.raises(ValueError, match="labels length"):
        CausalLMCollator(pad_token_id=0)([{"input_ids": [1, 2], "labels": [1]}])
    with pytest.raises(ValueError, match="empty batch"):
        CausalLMCollator(pad_token_id=0)([])


# ---------------------------------------------------------------- instruction


def test_alpaca_labels_cover_exactly_response_and_eos(tok):
    for row in ROWS:
        ids, labels = encode_instruction(tok, {"input": "", **row}, use_chat_template=False)
        prompt_ids, resp = loss_part({"input_ids": ids, "labels": labels})
        assert tok.decode(resp) == row["output"] + tok.eos_token
        template = ALPACA_PROMPT if row.get("input") else ALPACA_PROMPT_NO_INPUT
        expected = template.format(instruction=row["instruction"], input=row.get("input", ""))
        assert tok.decode(prompt_ids) == tok.bos_token + expected


@pytest.mark.parametrize("eos", ["</s>", "<|im_end|>"])
def test_chat_template_labels_cover_exactly_assistant_turn(eos):
    tok = build_tiny_tokenizer(eos=eos)
    row = ROWS[1]
    ids, labels = encode_instruction(tok, row, use_chat_template=True)
    prompt_ids, resp = loss_part({"input_ids": ids, "labels": labels})
    msgs = [{"role": "user", "content": "Add the numbers.\n\n12 + 34"}]
    assert tok.decode(prompt_ids) == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    # The template's end-of-turn token is learned; eos is added once, never twice.
    expected = "46<|im_end|>" + ("" if eos == "<|im_end|>" else eos)
    assert tok.decode(resp) == expected
    assert tok.decode(resp, skip_special_tokens=True) == "46"


def test_chat_flag_without_template_falls_back_to_alpaca(tmp_path):
    tok = build_tiny_tokenizer(chat=False)
    ids, labels = encode_instruction(tok, ROWS[0], use_chat_template=True)
    prompt_ids, _ = loss_part({"input_ids": ids, "labels": labels})
    assert "### Instruction:" in tok.decode(prompt_ids)


def test_instruction_datamodule_batches_and_loss_matches_response_only(tok, tmp_path):
    f = write_jsonl(tmp_path / "train.jsonl", ROWS * 2)
    dm = InstructionDataModule(tok, f, batch_size=3, seed=1)
    dm.setup("fit")
    assert len(dm.train_dataset) == 6 and tok.padding_side == "right" and tok.pad_token == tok.eos_token
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert ((batch["labels"] != IGNORE_INDEX) <= (batch["attention_mask"] == 1)).all()
    order1 = [b["input_ids"].tolist() for b in dm.train_dataloader()]
    order2 = [b["input_ids"].tolist() for b in InstructionDataModule(tok, f, batch_size=3, seed=1).train_dataloader()]
    assert order1 == order2
    # HF's loss with our labels equals cross-entropy over the response tokens only.
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        out = model(**batch)
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    manual = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
    torch.testing.assert_close(out.loss, manual)


def test_instruction_val_fraction_split_is_seeded_and_disjoint(tok, tmp_path):
    rows = [{"instruction": f"Say {i}.", "output": str(i)} for i in range(20)]
    f = write_jsonl(tmp_path / "t.jsonl", rows)
    a = InstructionDataModule(tok, f, val_fraction=0.25, seed=3, use_chat_template=False)
    b = InstructionDataModule(tok, f, val_fraction=0.25, seed=3, use_chat_template=False)
    a.setup("fit"), b.setup("fit")
    va = [tuple(x["input_ids"]) for x in a.val_dataset.examples]
    tr = {tuple(x["input_ids"]) for x in a.train_dataset.examples}
    assert len(va) == 5 and len(tr) == 15 and not (set(va) & tr)
    assert va == [tuple(x["input_ids"]) for x in b.val_dataset.examples]


def test_instruction_json_list_and_val_file(tok, tmp_path):
    f = tmp_path / "alpaca.json"
    f.write_text(json.dumps(ROWS))
    v = write_jsonl(tmp_path / "val.jsonl", ROWS[:1])
    dm = InstructionDataModule(tok, f, v)
    dm.setup("fit")
    assert len(dm.train_dataset) == 3 and len(dm.val_dataset) == 1
    assert len(dm.val_dataloader()) == 1


def test_instruction_errors_name_the_file(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        InstructionDataModule(tok, tmp_path / "nope.jsonl").setup("fit")
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"instruction": "x", "output": ""}, {"foo": 1}])
    with pytest.raises(DataError, match=r"empty\.jsonl: no usable rows"):
        InstructionDataModule(tok, empty).setup("fit")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{not json\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        InstructionDataModule(tok, bad).setup("fit")
    with pytest.raises(ValueError, match="val_fraction"):
        InstructionDataModule(tok, empty, val_fraction=1.0)


def test_non_utf8_and_skipped_rows_are_named(tok, tmp_path):
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes('{"instruction": "café", "output": "ok"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.jsonl: not UTF-8 text \(byte \d+, line 1"):
        InstructionDataModule(tok, latin).setup("fit")
    text = tmp_path / "latin1.txt"
    text.write_bytes("Paris est la capitale de la France. Été.".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt: not UTF-8"):
        PlainTextDataModule(tok, text).setup("fit")
    rows = [
        {"instruction": "a", "output": "b"},
        [1, 2],
        "str",
        {"instruction": "c"},
        {"instruction": "d", "output": "e"},
    ]
    mixed = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.warns(UserWarning, match=r"mixed\.jsonl: skipped 3 of 5 rows: 2 not JSON objects \(first at line 2\)"):
        InstructionDataModule(tok, mixed).setup("fit")
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"text": "Paris " * 40}, {"body": "x"}])
    with pytest.warns(UserWarning, match=r"docs\.jsonl: skipped 1 of 2 rows: 1 without a non-empty string 'text'"):
        PlainTextDataModule(tok, docs, max_length=16).setup("fit")


def test_too_long_rows_error_or_truncate_explicitly(tok, tmp_path):
    long_row = {"instruction": "Say hi.", "output": "hi there " * 100}
    f = write_jsonl(tmp_path / "long.jsonl", [ROWS[0], long_row])
    with pytest.raises(SequenceTooLongError, match=r"long\.jsonl row 2: \d+ tokens.*truncation=True"):
        InstructionDataModule(tok, f, max_length=150, use_chat_template=False).setup("fit")
    dm = InstructionDataModule(tok, f, max_length=150, use_chat_template=False, truncation=True)
    dm.setup("fit")
    assert len(dm.train_dataset) == 2
    assert all(len(x["input_ids"]) <= 150 for x in dm.train_dataset.examples)
    # A limit so small that the prompt eats it all: those rows are dropped, then none is left.
    with pytest.raises(DataError, match="lost its whole response"):
        InstructionDataModule(tok, f, max_length=4, use_chat_template=False, truncation=True).setup("fit")


def test_context_length_from_model_folder(tmp_path):
    folder = save_tiny_llama(tmp_path / "m", max_position_embeddings=40)
    f = write_jsonl(tmp_path / "long.jsonl", [{"instruction": "Say hi.", "output": "hi there " * 40}])
    dm = InstructionDataModule(str(folder), f)
    assert dm.context_length == 40
    with pytest.raises(SequenceTooLongError, match="context length"):
        dm.setup("fit")
    with pytest.raises(ValueError, match="exceeds the model's context length of 40 tokens"):
        InstructionDataModule(str(folder), f, max_length=41)


# ---------------------------------------------------------------- plain text


def test_pack_blocks_is_a_lossless_cut_of_the_stream():
    blocks = pack_blocks([[1, 2, 3], [4, 5], [6]], 3, sep_id=0)
    assert blocks == [[1, 2, 3], [0, 4, 5], [0, 6, 0]]
    assert pack_blocks([[1, 2]], 4, sep_id=None) == []


def test_plain_text_packs_txt_and_jsonl(tok, tmp_path):
    t = tmp_path / "a.txt"
    t.write_text("The capital of France is Paris. " * 5)
    j = write_jsonl(tmp_path / "b.jsonl", [{"text": "Q: what is 12 + 34?"}, {"text": ""}, {"other": 1}])
    dm = PlainTextDataModule(tok, [t, j], max_length=16, batch_size=2)
    dm.setup("fit")
    stream = tok(t.read_text(), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    stream += tok("Q: what is 12 + 34?", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    blocks = [x["input_ids"] for x in dm.train_dataset.examples]
    assert len(blocks) == len(stream) // 16 and all(len(b) == 16 for b in blocks)
    assert sum(blocks, []) == stream[: 16 * len(blocks)]
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (2, 16) and torch.equal(batch["labels"], batch["input_ids"])
    assert batch["attention_mask"].all()


def test_plain_text_errors(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        PlainTextDataModule(tok, tmp_path / "missing.txt").setup("fit")
    e = tmp_path / "empty.txt"
    e.write_text("  \n")
    with pytest.raises(DataError, match=r"empty\.txt: file is empty"):
        PlainTextDataModule(tok, e).setup("fit")
    j = write_jsonl(tmp_path / "notext.jsonl", [{"body": "x"}])
    with pytest.raises(DataError, match=r"notext\.jsonl: no rows .*'text'"):
        PlainTextDataModule(tok, j).setup("fit")
    s = tmp_path / "short.txt"
    s.write_text("Paris.")
    with pytest.raises(DataError, match=r"short\.txt: \d+ tokens, not enough for one block of 64"):
        PlainTextDataModule(tok, s, max_length=64).setup("fit")
    c = tmp_path / "data.csv"
    c.write_text("a,b")
    with pytest.raises(DataError, match="unsupported extension"):
        PlainTextDataModule(tok, c).setup("fit")


# ---------------------------------------------------------------- reasoning-gym


def test_reasoning_splits_are_seeded_and_disjoint(tok):
    def make(seed, **kw):
        dm = ReasoningGymDataModule(tok, "basic_arithmetic", ADD2, train_size=200, val_size=30, test_size=20,
                                    seed=seed, **kw)  # fmt: skip
        dm.setup()
        return dm

    a, b, c = make(0), make(0), make(5)
    assert [e["question"] for e in a.train_entries] == [e["question"] for e in b.train_entries]
    assert [e["question"] for e in a.val_entries] == [e["question"] for e in b.val_entries]
    assert [e["question"] for e in a.train_entries] != [e["question"] for e in c.train_entries]
    # heldout_seed = seed + 1 overlaps item by item in reasoning-gym; de-duplication must still hold.
    for dm in (a, make(0, heldout_seed=1)):
        tr = {e["question"] for e in dm.train_entries}
        va = [e["question"] for e in dm.val_entries]
        te = [e["question"] for e in dm.test_entries]
        assert len(va) == 30 and len(te) == 20 and len(set(va + te)) == 50
        assert not (tr & set(va)) and not (tr & set(te))
    assert len(a.train_dataset) == 200 and len(a.val_dataset) == 30 and len(a.test_dataset) == 20


def test_reasoning_loss_on_answer_only_and_metadata_prompt(tok):
    dm = ReasoningGymDataModule(tok, "basic_arithmetic", ADD2, train_size=5, val_size=0,
                                prompt_template="Q: {metadata[expression]}=\nA:")  # fmt: skip
    dm.setup("fit")
    for entry, ex in zip(dm.train_entries, dm.train_dataset.examples):
        prompt_ids, resp = loss_part(ex)
        assert tok.decode(resp) == f" {entry['answer']}{tok.eos_token}"
        assert tok.decode(prompt_ids) == f"{tok.bos_token}Q: {entry['metadata']['expression']}=\nA:"
    assert dm.val_dataset is None and dm.val_dataloader() == []


def test_reasoning_errors(tok):
    with pytest.raises(ValueError, match="unknown reasoning-gym task 'basic_arith'"):
        ReasoningGymDataModule(tok, "basic_arith")
    with pytest.raises(ValueError, match="must not contain 'seed'"):
        ReasoningGymDataModule(tok, "basic_arithmetic", {"seed": 3})
    with pytest.raises(ValueError, match="invalid task_kwargs"):
        ReasoningGymDataModule(tok, "basic_arithmetic", {"min_terms": 0})
    with pytest.raises(ValueError, match="prompt_template"):
        ReasoningGymDataModule(tok, prompt_template="no field")
    tiny_space = {**ADD2, "min_digits": 1, "max_digits": 1}  # 11 x 11 questions
    dm = ReasoningGymDataModule(tok, "basic_arithmetic", tiny_space, train_size=300, val_size=100)
    with pytest.raises(DataError, match="question space is too small"):
        dm.setup()
    dm = ReasoningGymDataModule(tok, "basic_arithmetic", ADD2, train_size=3, val_size=0, max_length=5)
    with pytest.raises(SequenceTooLongError, match="basic_arithmetic train item 0"):
        dm.setup()


def test_exact_match_and_answer_extraction():
    e = {"question": "q", "answer": "47"}
    assert exact_match(" 47 ", e) == 1.0 and exact_match("470", e) == 0.0 and exact_match(None, e) == 0.0
    assert extract_answer(" 47\nQ: 1+1=\nA: 2") == "47"
    assert format_prompt("Q: {question}\nA:", e) == "Q: q\nA:"
    with pytest.raises(ValueError, match="missing field"):
        format_prompt("{metadata[nope]}", e)


class FakeModel(torch.nn.Module):
    """Answers from a lookup table by decoding its (left-padded) prompts; records the calls it got."""

    def __init__(self, tok, replies):
        super().__init__()
        self.tok, self.replies, self.calls = tok, replies, []
        self.w = torch.nn.Parameter(torch.zeros(1))

    def generate(self, input_ids, attention_mask, max_new_tokens, do_sample, **kw):
        self.calls.append((attention_mask.clone(), max_new_tokens, do_sample, self.training))
        outs = []
        for row in input_ids:
            prompt = self.tok.decode(row, skip_special_tokens=True)
            outs.append(self.tok(self.replies[prompt], add_special_tokens=False)["input_ids"][:max_new_tokens])
        width = max(len(o) for o in outs)
        new = torch.tensor([o + [self.tok.pad_token_id] * (width - len(o)) for o in outs])
        return torch.cat([input_ids, new], dim=1)


def test_evaluate_accuracy_uses_task_scorer_with_left_padding(tok):
    dm = ReasoningGymDataModule(tok, "basic_arithmetic", ADD2, train_size=10, val_size=0, test_size=5)
    dm.setup()
    items = dm.test_entries
    # 2 right, 1 right-then-junk-line (still right), 1 partial credit (not full), 1 wrong.
    texts = [f" {items[0]['answer']}\nQ: x", f" {items[1]['answer']}", f" {items[2]['answer']}\n\n",
             f" {items[3]['answer']} apples", " -1"]  # fmt: skip
    replies = {f"Q: {e['question']}\nA:": t for e, t in zip(items, texts)}
    model = FakeModel(tok, replies).train()
    acc = evaluate_accuracy(model, tok, dm, max_new_tokens=8, batch_size=2)
    assert acc == pytest.approx(3 / 5)
    assert model.training and len(model.calls) == 3
    for mask, n, sample, training in model.calls:
        assert n == 8 and sample is False and not training
        assert mask[:, -1].all()  # left padding: every prompt ends at the last column
    assert dm.evaluate(model, "test", max_new_tokens=8) == pytest.approx(3 / 5)
    # A plain list of dicts uses exact match; the gym dataset object uses its own scorer.
    assert evaluate_accuracy(model, tok, items, max_new_tokens=8) == pytest.approx(3 / 5)
    with pytest.raises(DataError, match="no items"):
        evaluate_accuracy(model, tok, [])


def test_evaluate_accuracy_runs_real_greedy_generation(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg)
    items = [{"question": "12 + 34", "answer": "46"}, {"question": "1 + 2 + 3", "answer": "6"}]
    acc = evaluate_accuracy(model, tok, items, max_new_tokens=3, batch_size=2)
    assert 0.0 <= acc <= 1.0
