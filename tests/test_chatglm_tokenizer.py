"""ptune's ChatGLM tokenizer against ids recorded from the original ChatGLM3 tokenizer.

The fixtures are made by tests/golden/make_chatglm_golden.py; the tokenizer model itself is the
real one in ../shared, so these tests skip when that folder is absent.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from ptune.chatglm.tokenizer import ChatGLMTokenizer, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MODEL = SHARED / "chatglm" / "tokenizer.model"
GOLDEN = ROOT / "tests" / "golden" / "chatglm" / "tokenizer_cases.json"
ADGEN = SHARED / "data" / "advertisegen" / "train_5000.json"
sys.path.insert(0, str(ROOT / "tests" / "golden"))
from chatglm_strings import load_rows, sha256_text, tokenizer_strings  # noqa: E402

pytestmark = [
    pytest.mark.shared,
    pytest.mark.skipif(not MODEL.is_file(), reason=f"needs the real ChatGLM tokenizer.model at {MODEL}"),
    pytest.mark.skipif(not ADGEN.is_file(), reason=f"needs the AdvertiseGen slice at {ADGEN} to rebuild the strings"),
]


@pytest.fixture(scope="module")
def tok() -> ChatGLMTokenizer:
    return load_tokenizer(MODEL.parent)


@pytest.fixture(scope="module")
def golden() -> dict:
    """The reference's ids, with each case's text rebuilt from ../shared (the fixture keeps only hashes)."""
    data = json.loads(GOLDEN.read_text(encoding="utf-8"))
    texts, prompts = tokenizer_strings(load_rows(ADGEN))
    assert [sha256_text(t) for t in texts] == [c["sha256"] for c in data["cases"]], "strings no longer match"
    for case, text in zip(data["cases"], texts):
        case["text"] = text
    data["chatglm2_prompts"] = [{**p, "sha256": h} for p, h in zip(prompts, data["chatglm2_prompts"])]
    return data


def test_golden_covers_enough_strings(golden):
    assert len(golden["cases"]) >= 500


def test_vocab_and_special_ids(tok, golden):
    assert tok.vocab_size == golden["vocab_size"] == len(tok)
    assert tok.pad_token_id == golden["pad_token_id"] == 0
    assert tok.eos_token_id == golden["eos_token_id"] == 2
    for token, idx in golden["special_ids"].items():
        assert tok.get_command(token) == idx
        assert tok.convert_tokens_to_ids(token) == idx
    assert tok.prefix_tokens == [golden["special_ids"]["[gMASK]"], golden["special_ids"]["sop"]]


def test_encode_matches_reference(tok, golden):
    mismatches = []
    for case in golden["cases"]:
        text = case["text"]
        if tok.encode(text) != case["ids"]:
            mismatches.append(("encode", text))
        if tok.encode(text, add_special_tokens=False) != case["ids_plain"]:
            mismatches.append(("encode(add_special_tokens=False)", text))
        if tok(text)["input_ids"] != case["ids"]:
            mismatches.append(("__call__", text))
    assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[:5]}"


def test_decode_matches_reference(tok, golden):
    mismatches = []
    for case in golden["cases"]:
        if sha256_text(tok.decode(case["ids"])) != case["decoded_sha256"]:
            mismatches.append(("with specials", case["text"]))
        if sha256_text(tok.decode(case["ids_plain"])) != case["decoded_plain_sha256"]:
            mismatches.append(("plain", case["text"]))
        if tok.decode(case["ids_plain"]) != case["text"]:
            mismatches.append(("round trip", case["text"]))
    assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[:5]}"


def test_skip_special_tokens_drops_command_tokens(tok):
    ids = tok.encode("你好，世界") + [tok.eos_token_id]
    assert tok.decode(ids, skip_special_tokens=True) == "你好，世界"
    assert tok.batch_decode([ids], skip_special_tokens=True) == ["你好，世界"]


def test_special_token_spellings_in_text_stay_text(tok):
    # "<|user|>" typed by a user must not become the role token (prompt injection).
    ids = tok.encode("<|user|>[gMASK]</s>", add_special_tokens=False)
    assert tok.get_command("<|user|>") not in ids
    assert tok.get_command("[gMASK]") not in ids
    assert tok.eos_token_id not in ids
    opt_in = ChatGLMTokenizer(str(MODEL), encode_special_tokens=True)
    assert tok.get_command("<|user|>") in opt_in.encode("a<|user|>b", add_special_tokens=False)


def test_chatglm2_prompts(tok, golden):
    for case in golden["chatglm2_prompts"]:
        prompt = tok.build_prompt(case["query"], [tuple(h) for h in case["history"]])
        assert sha256_text(prompt) == case["sha256"]
    assert tok.build_prompt("q") == "[Round 1]\n\n问：q\n\n答："
    assert tok.build_prompt("q2", [("q1", "a1")]) == "[Round 1]\n\n问：q1\n\n答：a1\n\n[Round 2]\n\n问：q2\n\n答："


def test_chatglm3_chat_inputs(tok, golden):
    for case in golden["chat_inputs"]:
        out = tok.build_chat_input(case["query"], history=case["history"], role=case["role"])
        assert out["input_ids"][0].tolist() == case["input_ids"], case["query"]
        assert out["attention_mask"].sum().item() == len(case["input_ids"])
    with pytest.raises(ValueError, match="role"):
        tok.build_chat_input("x", role="robot")


def test_batch_left_padding(tok, golden):
    batch = golden["batch"]
    out = tok(batch["texts"], padding=True)
    assert out["input_ids"] == batch["input_ids"]
    assert out["attention_mask"] == batch["attention_mask"]


def test_right_padding_on_request(tok):
    texts = ["短", "a longer one"]
    lengths = [len(tok.encode(t)) for t in texts]
    out = tok(texts, padding=True, padding_side="right", return_tensors="pt")
    width = max(lengths)
    for row, n in enumerate(lengths):
        assert out["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        assert out["input_ids"][row, n:].tolist() == [tok.pad_token_id] * (width - n)
        assert out["input_ids"][row, :n].tolist() == tok.encode(texts[row])


def test_load_from_any_folder_with_tokenizer_model(tok, tmp_path):
    # only tokenizer.model
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "tokenizer.model").write_bytes(MODEL.read_bytes())
    assert load_tokenizer(tmp_path / "only").encode("你好") == tok.encode("你好")
    # a remote-code tokenizer_config.json beside it is ignored apart from padding_side
    (tmp_path / "only" / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "ChatGLMTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
        "padding_side": "right", "remove_space": False}))
    assert load_tokenizer(tmp_path / "only").padding_side == "right"
    # the file path itself
    assert load_tokenizer(MODEL).encode("abc") == tok.encode("abc")
    # save_pretrained -> load_tokenizer round trip
    tok.save_pretrained(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved")
    assert again.encode("类型#裙") == tok.encode("类型#裙") and again.padding_side == "left"
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        load_tokenizer(tmp_path / "missing")


def test_a_cut_short_tokenizer_model_is_one_clear_error(tmp_path):
    """sentencepiece's own failure is a RuntimeError from its C++ parser; a model folder names the file."""
    from ptune.models import ModelError, load_tokenizer as load_model_tokenizer

    (tmp_path / "tokenizer.model").write_bytes(MODEL.read_bytes()[:100_000])
    with pytest.raises(ModelError, match=rf"model.path={tmp_path}: tokenizer.model is not a readable SentencePiece "
                                         "model .*copy it again"):
        load_model_tokenizer(tmp_path)
