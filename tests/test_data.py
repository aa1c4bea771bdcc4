"""ptune.data: reading and validating rows, prompt building, tokenization and masking, batching, batch plans."""

from __future__ import annotations

import json
import logging
import random
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ptune.data import (
    IGNORE,
    BatchPlan,
    balanced_bounds,
    Columns,
    DataError,
    Encoding,
    chatglm2_prompt,
    collate,
    encode_example,
    left_pad,
    load_examples,
    fit_prompt,
    prompt_ids,
    read_rows,
    tokenize,
    training_rows,
)

COLS = Columns(prompt="content", response="summary")
HCOLS = Columns(prompt="content", response="summary", history="history")


def write_jsonl(path, rows, newline="\n"):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + newline for r in rows), encoding="utf-8",
                    newline="")
    return path


def at(path, line):
    """Regex for the `file:line:` prefix of a DataError message."""
    return re.escape(f"{path}:{line}:")


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir("llama"))


def ids(tok, text):
    return tok.encode(text, add_special_tokens=False)


# --------------------------------------------------------------------------------------------------- read_rows


def test_read_rows_jsonl(tmp_path):
    rows = [{"a": 1}, {"a": "二", "b": [1, 2]}, {}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    assert read_rows(path) == [(1, rows[0]), (2, rows[1]), (3, rows[2])]
    assert read_rows(str(path)) == read_rows(path)


def test_read_rows_json_array(tmp_path):
    rows = [{"a": 1}, {"a": 2}, {"a": 3}]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    # Each row numbered by the line it starts on: "[", then three lines per row.
    assert read_rows(path) == [(2, rows[0]), (5, rows[1]), (8, rows[2])]
    path.write_text(json.dumps(rows), encoding="utf-8")
    assert read_rows(path) == [(1, rows[0]), (1, rows[1]), (1, rows[2])]
    # Leading whitespace before the bracket still means "array", not "JSON lines".
    path.write_text("\n\n  " + json.dumps(rows), encoding="utf-8")
    assert [r for _, r in read_rows(path)] == rows


def test_read_rows_missing_file(tmp_path):
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'nope.jsonl'}: no such file")):
        read_rows(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}: a folder, expected a data file (JSON lines or a "
                                                  "JSON array)")):
        read_rows(tmp_path)


def test_read_rows_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = ['{"a": 1}', '{"a": 2}', '{"a": 3,,}', '{"a": 4}', '{"a": 5}']
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=at(path, 3) + " invalid JSON") as e:
        read_rows(path)
    assert f"{path}:3:" in str(e.value)
    assert ":4:" not in str(e.value) and ":1:" not in str(e.value)


def test_rows_written_over_several_lines_without_brackets_are_named_as_such(tmp_path):
    """`json.dump(row, f, indent=2)` once per row gives objects over several lines, neither JSON lines nor an
    array; the parser's own account of line 1 ("Expecting property name ... column 2") did not say that."""
    rows = [{"content": "a", "summary": "b"}, {"content": "c", "summary": "d"}]
    path = tmp_path / "d.json"
    path.write_text("\n".join(json.dumps(r, indent=2) for r in rows) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=at(path, 1) + r" a row written over lines 1-4; JSON lines takes one whole "
                       r"row per line.*\[row, row, \.\.\.\]"):
        read_rows(path)
    # One good line before it: the place is still the line the spread-out row starts on.
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[1], indent=1), encoding="utf-8")
    with pytest.raises(DataError, match=at(path, 2) + " a row written over lines 2-5"):
        read_rows(path)
    # A line that is simply broken still gets the parser's account.
    path.write_text('{"content": "a",\n"summary": }\n', encoding="utf-8")
    with pytest.raises(DataError, match=at(path, 1) + " invalid JSON"):
        read_rows(path)


def test_read_rows_malformed_json_array_names_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"a": 1},\n  {"a": 2,,},\n  {"a": 3}\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=at(path, 3) + " invalid JSON"):
        read_rows(path)


@pytest.mark.parametrize("text, line, reason", [
    ('[\n{"a": 1},\n{"a": 2}\n{"a": 3}]', 4, "Expecting ',' delimiter"),
    ('[\n{"a": 1},\n]', 3, "Expecting value"),  # trailing comma
    ('[\n{"a": 1}\n]\n{"a": 2}\n', 4, "Extra data"),
    ('[\n{"a": 1},\n', 3, "Expecting value"),  # never closed
    ('[\n{"a": 1}', 2, "Expecting ',' delimiter"),
    ('[{"a": 1}, ,]', 1, "Expecting value"),
    ('[', 1, "Expecting value"),
])
def test_read_rows_json_array_that_is_not_well_formed(tmp_path, text, line, reason):
    path = tmp_path / "d.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=at(path, line) + " invalid JSON \\(" + re.escape(reason)):
        read_rows(path)
    with pytest.raises(json.JSONDecodeError):  # the parser agrees that the file is not JSON
        json.loads(text)


def test_rows_of_an_array_on_one_line_are_told_apart_by_their_place_in_the_array(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[{"content": "p", "summary": "r"}, {"content": 5, "summary": "r"}]', encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{path}:1 (array element 2): column 'content' must be")):
        load_examples(path, COLS)
    path.write_text('[{"content": "p", "summary": "r"},\n {"a": 1}, 7]', encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{path}:2 (array element 3): expected a JSON object")):
        read_rows(path)


def test_json_array_row_errors_name_the_rows_line(tmp_path):
    """A row of a pretty-printed array is reported at its line in the file, not at its position in the array."""
    rows = [{"content": "p", "summary": "r"}, {"content": 5, "summary": "r"}]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows, indent=2), encoding="utf-8")  # the second row starts on line 6
    with pytest.raises(DataError, match=at(path, 6) + " column 'content' must be a string, got int"):
        load_examples(path, COLS)


@pytest.mark.parametrize("array", [False, True], ids=["json-lines", "json-array"])
def test_read_rows_integer_too_long_for_python_names_line(tmp_path, array):
    huge = "9" * 5000
    lines = ['{"content": "p", "summary": "r"}', '{"content": "p", "summary": "r", "id": ' + huge + "}"]
    path = tmp_path / "d.json"
    path.write_text("[\n" + ",\n".join(lines) + "\n]" if array else "\n".join(lines), encoding="utf-8")
    line = 3 if array else 2
    with pytest.raises(DataError, match=at(path, line) + " an integer with more than 4300 digits, more than Python "
                                        "reads; write such a value as a string"):
        read_rows(path)


def test_read_rows_non_object_row(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n[1, 2]\n{"a": 3}\n', encoding="utf-8")
    with pytest.raises(DataError, match=at(path, 2) + " expected a JSON object per row, got list"):
        read_rows(path)
    path.write_text('{"a": 1}\n{"a": 2}\n"text"\n', encoding="utf-8")
    with pytest.raises(DataError, match=at(path, 3) + ".*got str"):
        read_rows(path)
    arr = tmp_path / "d.json"
    arr.write_text('[{"a": 1},\n\n 5]', encoding="utf-8")
    with pytest.raises(DataError, match=at(arr, 3) + ".*got int"):
        read_rows(arr)


@pytest.mark.parametrize("content", ["", "\n\n", "   \n\t\n", "[]", " [ ] \n"])
def test_read_rows_empty(tmp_path, content):
    path = tmp_path / "d.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{path}: no rows")):
        read_rows(path)


def test_read_rows_utf8_bom(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + '{"a": "中"}\n{"a": 2}\n'.encode("utf-8"))
    assert read_rows(path) == [(1, {"a": "中"}), (2, {"a": 2})]
    arr = tmp_path / "d.json"
    arr.write_bytes(b"\xef\xbb\xbf" + b'[{"a": 1}]')
    assert read_rows(arr) == [(1, {"a": 1})]


def test_read_rows_crlf(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"a": "x"}\r\n\r\n{"a": "y"}\r\n{"a": 3,}\r\n')
    with pytest.raises(DataError, match=at(path, 4)):
        read_rows(path)
    path.write_bytes(b'{"a": "x"}\r\n\r\n{"a": "y"}\r\n')
    rows = read_rows(path)
    assert rows == [(1, {"a": "x"}), (3, {"a": "y"})]
    assert all("\r" not in r["a"] for _, r in rows)


def test_read_rows_blank_lines_keep_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('\n{"a": 1}\n\n   \n{"a": 2}\n\t\n', encoding="utf-8")
    assert read_rows(path) == [(2, {"a": 1}), (5, {"a": 2})]
    path.write_text('\n{"a": 1}\n\n   \n{"a": 2}\n\n{oops}\n', encoding="utf-8")
    with pytest.raises(DataError, match=at(path, 7)):
        read_rows(path)


def test_read_rows_non_utf8_names_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes('{"a": "ok"}\n'.encode("utf-8") + '{"a": "中文"}\n'.encode("gbk")
                     + '{"a": "x"}\n'.encode("utf-8"))
    with pytest.raises(DataError, match=at(path, 2) + " not UTF-8") as e:
        read_rows(path)
    assert "0xd6" in str(e.value)  # the first GBK byte of 中


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be"])
def test_a_utf16_file_is_named_as_such_with_or_without_its_byte_order_mark(tmp_path, encoding):
    """Without the mark, UTF-16 of ASCII text is valid UTF-8 with a NUL after each character: the JSON error it
    gave ("Expecting property name", column 2) did not say what was wrong."""
    path = tmp_path / "d.jsonl"
    path.write_bytes('{"content": "类型#裙", "summary": "红色"}\n'.encode(encoding))
    with pytest.raises(DataError, match=re.escape(f"{path}: looks like UTF-16 (byte-order mark or NUL bytes), not "
                                                  "UTF-8; save the file as UTF-8")):
        read_rows(path)


@pytest.mark.parametrize("packer, kind", [("gzip", "gzip-compressed"), ("zip", "zip")])
def test_a_compressed_data_file_is_named_as_such(tmp_path, packer, kind):
    """AdvertiseGen ships packed; the packed file's NUL bytes used to be reported as UTF-16."""
    import gzip
    import zipfile

    text = '{"content": "类型#裙", "summary": "红色"}\n'
    path = tmp_path / f"train.json.{'gz' if packer == 'gzip' else 'zip'}"
    if packer == "gzip":
        path.write_bytes(gzip.compress(text.encode("utf-8")))
    else:
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("train.json", text)
    with pytest.raises(DataError, match=re.escape(f"{path}: a {kind} file, not JSON text; unpack it and pass the "
                                                  "JSON file inside")):
        read_rows(path)


def test_read_rows_non_utf8_after_bom_names_line(tmp_path):
    path = tmp_path / "d.jsonl"
    # The bad byte sits right after the first newline: 3 bytes of BOM shift is enough to miss the newline.
    path.write_bytes(b"\xef\xbb\xbf" + b'{"a": "ok"}\n' + "中".encode("gbk") + b'\n')
    with pytest.raises(DataError, match=at(path, 2) + r" not UTF-8 \(byte 0xd6"):
        read_rows(path)


def test_read_rows_unicode_line_separator_inside_string(tmp_path):
    rows = [{"a": "one\u2028two"}, {"a": "three\u0085four"}, {"a": "five\u2029six"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    assert read_rows(path) == [(1, rows[0]), (2, rows[1]), (3, rows[2])]


# ----------------------------------------------------------------------------------------------- load_examples


def test_load_examples_basic(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"content": "p1", "summary": "r1", "extra": 1},
                                              {"content": "p2", "summary": "r2"}])
    ds = load_examples(path, COLS)
    assert ds.column_names == ["prompt", "response", "history"]
    assert ds["prompt"] == ["p1", "p2"]
    assert ds["response"] == ["r1", "r2"]
    assert ds["history"] == [[], []]


def test_load_examples_missing_column_names_it_and_present(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"content": "p", "title": "t"}, {"content": "q", "title": "u"}])
    with pytest.raises(DataError) as e:
        load_examples(path, COLS)
    msg = str(e.value)
    assert "'summary'" in msg and "not found" in msg
    assert "columns present" in msg and "'content'" in msg and "'title'" in msg


def test_load_examples_column_missing_in_one_row(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"content": "p", "summary": "s"}, {"content": "q"},
                                              {"content": "r", "summary": "t"}])
    with pytest.raises(DataError, match=at(path, 2) + " missing column 'summary'"):
        load_examples(path, COLS)


@pytest.mark.parametrize("bad,typename", [(5, "int"), (1.5, "float"), (["a"], "list"), ({"x": 1}, "dict"),
                                          (True, "bool")])
def test_load_examples_wrong_type_names_line_and_column(tmp_path, bad, typename):
    path = write_jsonl(tmp_path / "d.jsonl", [{"content": "p", "summary": "s"}, {"content": bad, "summary": "s"}])
    with pytest.raises(DataError, match=at(path, 2) + f" column 'content' must be a string, got {typename}"):
        load_examples(path, COLS)
    path = write_jsonl(tmp_path / "e.jsonl", [{"content": "p", "summary": bad}])
    with pytest.raises(DataError, match=at(path, 1) + " column 'summary'"):
        load_examples(path, COLS)


def test_load_examples_skips_empty_and_logs_count(tmp_path, caplog):
    rows = [
        {"content": "p1", "summary": "r1"},
        {"content": "", "summary": "r"},
        {"content": "p3", "summary": "   \n"},
        {"content": None, "summary": "r"},
        {"content": "p5", "summary": "r5"},
        {"content": " \t", "summary": "r"},
        {"content": "p7", "summary": "r7"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="ptune.data"):
        ds = load_examples(path, COLS)
    assert ds["prompt"] == ["p1", "p5", "p7"]
    assert ds["response"] == ["r1", "r5", "r7"]
    msgs = [r.getMessage() for r in caplog.records if r.name == "ptune.data"]
    assert any("skipped 4 of 7" in m and str(path) in m for m in msgs), msgs


def test_load_examples_nothing_skipped_logs_nothing(tmp_path, caplog):
    path = write_jsonl(tmp_path / "d.jsonl", [{"content": "p", "summary": "r"}])
    with caplog.at_level(logging.WARNING, logger="ptune.data"):
        load_examples(path, COLS)
    assert not [r for r in caplog.records if "skipped" in r.getMessage()]


def test_load_examples_all_empty_raises(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"content": "", "summary": "r"}, {"content": "p", "summary": " "}])
    with pytest.raises(DataError, match="every row has an empty prompt or response"):
        load_examples(path, COLS)


def test_load_examples_history_valid(tmp_path):
    rows = [
        {"content": "q3", "summary": "a3", "history": [["q1", "a1"], ["q2", "a2"]]},
        {"content": "p", "summary": "r", "history": []},
        {"content": "p", "summary": "r"},  # absent history: no earlier turns
        {"content": "p", "summary": "r", "history": None},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    ds = load_examples(path, HCOLS)
    assert ds["history"] == [[["q1", "a1"], ["q2", "a2"]], [], [], []]
    assert ds["prompt"][0] == "q3"


def test_load_examples_history_column_absent_everywhere_is_refused_for_training(tmp_path):
    # data.history_column=histroy while the rows say "history": training would drop every history.
    path = write_jsonl(tmp_path / "d.jsonl", [{"content": "p", "summary": "r", "history": [["q", "a"]]},
                                              {"content": "p", "summary": "r"}])
    cols = Columns("content", "summary", "histroy")
    with pytest.raises(DataError, match=re.escape(f"{path}: column 'histroy' not found; columns present: "
                                                  "['content', 'history', 'summary']")):
        load_examples(path, cols, require_history=True)
    cfg = OmegaConf.create({"train_file": str(path), "prompt_column": "content", "response_column": "summary",
                            "history_column": "histroy", "max_source_length": 8, "max_target_length": 8,
                            "truncate_source_from": "right"})
    with pytest.raises(DataError, match="column 'histroy' not found"):
        training_rows(cfg, "plain", None)


def test_load_examples_history_column_absent_everywhere_warns_for_evaluation(tmp_path, caplog):
    # Evaluation inherits the checkpoint's history column and cannot clear it: a dev file without history
    # is scored, with a warning.
    path = write_jsonl(tmp_path / "d.jsonl", [{"content": "p", "summary": "r"}])
    with caplog.at_level(logging.WARNING, logger="ptune.data"):
        assert load_examples(path, HCOLS)["history"] == [[]]
    assert f"{path}: no row has the history column 'history'" in caplog.text


def test_load_examples_history_column_in_some_rows_is_enough(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"content": "p", "summary": "r"},
                                              {"content": "p", "summary": "r", "history": [["q", "a"]]}])
    assert load_examples(path, HCOLS, require_history=True)["history"] == [[], [["q", "a"]]]


@pytest.mark.parametrize("bad", ["q a", [["q"]], [["q", "a", "b"]], [["q", 1]], ["qa"], [[None, "a"]], {"q": "a"}])
def test_load_examples_history_malformed_names_line(tmp_path, bad):
    rows = [{"content": "p", "summary": "r", "history": [["q", "a"]]},
            {"content": "p", "summary": "r"},
            {"content": "p", "summary": "r", "history": bad}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=at(path, 3) + " history must be a list of"):
        load_examples(path, HCOLS)


def test_load_examples_ignores_history_without_history_column(tmp_path):
    # Without a history column configured, a stray "history" field is not validated or used.
    path = write_jsonl(tmp_path / "d.jsonl", [{"content": "p", "summary": "r", "history": "garbage"}])
    assert load_examples(path, COLS)["history"] == [[]]


# --------------------------------------------------------------------------------------------- chatglm2_prompt


def test_chatglm2_prompt_no_history():
    assert chatglm2_prompt("q", []) == "[Round 1]\n\n问：q\n\n答："


def test_chatglm2_prompt_two_turns():
    expected = ("[Round 1]\n\n问：q1\n\n答：a1\n\n[Round 2]\n\n问：q2\n\n答：a2\n\n"
                "[Round 3]\n\n问：q\n\n答：")
    assert chatglm2_prompt("q", [["q1", "a1"], ("q2", "a2")]) == expected


# ---------------------------------------------------------------------------------------------- encode_example


def test_tokenizer_fixture_assumptions(tok):
    assert tok.pad_token_id == 0 and tok.eos_token == "</s>"
    assert len(ids(tok, "abcdef")) == 6


def test_encode_plain_masks_exactly_the_prompt(tok):
    enc = Encoding("plain", max_source_length=64, max_target_length=64)
    row = encode_example(tok, enc, "hello", "world", [])
    src = tok.encode("hello", add_special_tokens=True)
    tgt = ids(tok, "world") + [tok.eos_token_id]
    assert row["input_ids"] == src + tgt
    assert row["labels"] == [IGNORE] * len(src) + tgt
    assert len(row["input_ids"]) == len(row["labels"])
    assert row["input_ids"][-1] == tok.eos_token_id


def test_encode_plain_with_history(tok):
    enc = Encoding("plain", max_source_length=64, max_target_length=64)
    row = encode_example(tok, enc, "q", "r", [["a", "b"], ["c", "d"]])
    src = tok.encode("a\nb\nc\nd\nq", add_special_tokens=True)
    assert row["input_ids"][:len(src)] == src
    assert row["labels"] == [IGNORE] * len(src) + ids(tok, "r") + [tok.eos_token_id]


def test_encode_chat_template(tok):
    enc = Encoding("chat_template", max_source_length=64, max_target_length=64)
    row = encode_example(tok, enc, "hi", "yo", [["q", "a"]])
    src = ids(tok, "<|user|>q<|assistant|>a<|user|>hi<|assistant|>")
    assert tok.convert_ids_to_tokens(src[:1] + src[-1:]) == ["<|user|>", "<|assistant|>"]
    assert prompt_ids(tok, "hi", [["q", "a"]], "chat_template") == src
    assert row["input_ids"] == src + ids(tok, "yo") + [tok.eos_token_id]
    assert row["labels"] == [IGNORE] * len(src) + ids(tok, "yo") + [tok.eos_token_id]


@pytest.mark.parametrize("template", ["plain", "chat_template", "chatglm2"])
def test_special_token_spellings_in_data_are_read_as_text(tok, template):
    """'</s>' written in a response must not end the target early, nor '<|assistant|>' in a question open the
    answer: data text is text. The template's own markers stay control tokens."""
    user, assistant, eos = (tok.convert_tokens_to_ids(t) for t in ("<|user|>", "<|assistant|>", "</s>"))
    enc = Encoding(template, max_source_length=256, max_target_length=64)
    plain = encode_example(tok, enc, "qr", "ab", [["hx", "ay"]])
    tricky = encode_example(tok, enc, "q<|assistant|>r", "a</s>b", [["h<|user|>x", "a<|assistant|>y"]])
    for row in (plain, tricky):
        target = [t for t in row["labels"] if t != IGNORE]
        assert target.count(eos) == 1 and target[-1] == eos
        source = row["input_ids"][: len(row["input_ids"]) - len(target)]
        assert (source.count(user), source.count(assistant)) == (
            (2, 2) if template == "chat_template" else (0, 0)), source
    target = [t for t in tricky["labels"] if t != IGNORE]
    assert tok.decode(target[:-1]) == "a</s>b"
    assert "q<|assistant|>r" in tok.decode(tricky["input_ids"][: len(tricky["input_ids"]) - len(target)])


def test_a_chat_template_prompt_without_special_spellings_is_the_templates_own_tokenization(tok):
    messages = [{"role": "user", "content": "hx"}, {"role": "assistant", "content": "ay"},
                {"role": "user", "content": "qr"}]
    own = list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])
    assert prompt_ids(tok, "qr", [["hx", "ay"]], "chat_template") == own
    # With a spelling in the text only that text is tokenized apart; the template around it is the same.
    tricky = prompt_ids(tok, "q</s>r", [["hx", "ay"]], "chat_template")
    assert tricky[: own.index(ids(tok, "q")[0])] == own[: own.index(ids(tok, "q")[0])]
    assert tricky[-1] == own[-1] == tok.convert_tokens_to_ids("<|assistant|>")


def test_a_system_message_is_a_system_turn_or_goes_before_the_first_question(tok):
    assert prompt_ids(tok, "q", [("h", "a")], "plain", "s") == prompt_ids(tok, "q", [("s\n\nh", "a")], "plain")
    assert prompt_ids(tok, "q", [], "chatglm2", "s") == prompt_ids(tok, "s\n\nq", [], "chatglm2")
    messages = [{"role": "system", "content": "s</s>"}, {"role": "user", "content": "q"}]
    tricky = prompt_ids(tok, "q", [], "chat_template", "s</s>")
    assert tok.eos_token_id not in tricky and tok.decode(tricky).endswith("s</s><|user|>q<|assistant|>")
    messages[0]["content"] = "s"
    own = list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])
    assert prompt_ids(tok, "q", [], "chat_template", "s") == own


def test_encode_chatglm2_template_on_plain_tokenizer(tok):
    enc = Encoding("chatglm2", max_source_length=256, max_target_length=64)
    history = [["q1", "a1"]]
    row = encode_example(tok, enc, "q", "ans", history)
    src = tok.encode(chatglm2_prompt("q", history), add_special_tokens=True)
    assert src[:9] == ids(tok, "[Round 1]") and prompt_ids(tok, "q", history, "chatglm2") == src
    assert row["input_ids"] == src + ids(tok, "ans") + [tok.eos_token_id]
    assert row["labels"] == [IGNORE] * len(src) + ids(tok, "ans") + [tok.eos_token_id]


def test_encode_source_truncation_right_keeps_start(tok):
    enc = Encoding("plain", max_source_length=3, max_target_length=64)
    row = encode_example(tok, enc, "abcdefg", "xy", [])
    assert row["input_ids"] == ids(tok, "abc") + ids(tok, "xy") + [tok.eos_token_id]
    assert row["labels"][:3] == [IGNORE] * 3 and IGNORE not in row["labels"][3:]


def test_encode_source_truncation_left_keeps_end(tok):
    enc = Encoding("plain", max_source_length=3, max_target_length=64, truncate_source_from="left")
    row = encode_example(tok, enc, "abcdefg", "xy", [])
    assert row["input_ids"] == ids(tok, "efg") + ids(tok, "xy") + [tok.eos_token_id]
    assert row["labels"] == [IGNORE] * 3 + ids(tok, "xy") + [tok.eos_token_id]


def cut_prompt(tok, query, history, template, max_length, side):
    return fit_prompt(tok, prompt_ids(tok, query, history, template), template, max_length, side)


@pytest.fixture(scope="module")
def bos_tok(tok):
    """The fixture tokenizer with a BOS token in front of every encoded text, as Llama's adds one."""
    import copy

    from tokenizers import processors

    with_bos = copy.deepcopy(tok)
    with_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    assert with_bos.encode("ab") == [tok.bos_token_id] + ids(tok, "ab")
    return with_bos


def test_left_truncation_keeps_bos(bos_tok):
    enc = Encoding("plain", max_source_length=4, max_target_length=64, truncate_source_from="left")
    row = encode_example(bos_tok, enc, "abcdefg", "xy", [])
    assert row["input_ids"][:4] == [bos_tok.bos_token_id] + ids(bos_tok, "efg")
    assert row["labels"] == [IGNORE] * 4 + ids(bos_tok, "xy") + [bos_tok.eos_token_id]


def test_left_truncation_keeps_chat_template_head_and_assistant_header(tok):
    enc = Encoding("chat_template", max_source_length=6, max_target_length=64, truncate_source_from="left")
    row = encode_example(tok, enc, "abcdefg", "xy", [])
    assert row["input_ids"][:6] == ids(tok, "<|user|>defg<|assistant|>")


def test_left_truncation_cuts_oldest_history_first(tok):
    src = cut_prompt(tok, "hi", [["q1", "a1"], ["q2", "a2"]], "chat_template", 8, "left")
    assert src == ids(tok, "<|user|>") + ids(tok, "<|assistant|>a2<|user|>hi<|assistant|>")


def test_left_truncation_of_a_query_that_starts_like_the_template_around_it(tok):
    # "<|assistant|>" follows the query in the template: an empty stand-in query alone would count this
    # query's first token as the template's and keep it.
    query = "<|assistant|>" + "abcdefgh"
    src = cut_prompt(tok, query, [], "chat_template", 5, "left")
    assert src == ids(tok, "<|user|>fgh<|assistant|>")


def test_left_truncation_when_the_template_alone_does_not_fit(tok):
    # The answer cue is kept first, then the template's start.
    assert cut_prompt(tok, "abc", [], "chat_template", 1, "left") == ids(tok, "<|assistant|>")
    assert cut_prompt(tok, "abc", [], "chat_template", 2, "left") == ids(tok, "<|user|><|assistant|>")


def test_right_truncation_is_a_plain_cut(bos_tok):
    full = prompt_ids(bos_tok, "abcdefg", [["q", "a"]], "chat_template")
    assert cut_prompt(bos_tok, "abcdefg", [["q", "a"]], "chat_template", 5, "right") == full[:5]


CHATGLM_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "chatglm"


@pytest.mark.skipif(not (CHATGLM_TOKENIZER / "tokenizer.model").is_file(),
                    reason=f"needs the real ChatGLM tokenizer at {CHATGLM_TOKENIZER}")
def test_left_truncation_keeps_chatglm2_gmask_sop_and_answer_cue():
    from ptune.models import load_tokenizer

    t = load_tokenizer(CHATGLM_TOKENIZER)
    query = "类型#裙*颜色#红色*风格#性感*图案#条纹"
    full = prompt_ids(t, query, [], "chatglm2")
    right = cut_prompt(t, query, [], "chatglm2", 16, "right")
    assert right == full[:16] and t.convert_ids_to_tokens(right[:2]) == ["[gMASK]", "sop"]
    left = cut_prompt(t, query, [], "chatglm2", 20, "left")
    # [gMASK] sop [Round 1]\n\n问： (12 ids), the query's last 4 ids, \n\n答： (4 ids)
    assert left == full[:12] + full[-8:]
    assert t.convert_ids_to_tokens(left[:2]) == ["[gMASK]", "sop"]
    assert t.decode(left[12:16]) == "图案#条纹" and t.convert_ids_to_tokens(left[-2:]) == ["答", "："]


def test_encode_source_at_limit_is_untouched(tok):
    for side in ("left", "right"):
        enc = Encoding("plain", max_source_length=4, max_target_length=4, truncate_source_from=side)
        row = encode_example(tok, enc, "abcd", "wxyz", [])
        assert row["input_ids"] == ids(tok, "abcdwxyz") + [tok.eos_token_id]


def test_encode_target_truncated_before_eos(tok):
    enc = Encoding("plain", max_source_length=64, max_target_length=3)
    row = encode_example(tok, enc, "p", "abcdefg", [])
    target = [t for t in row["labels"] if t != IGNORE]
    assert len(target) == enc.max_target_length + 1
    assert target == ids(tok, "abc") + [tok.eos_token_id]
    assert row["input_ids"][-4:] == target


def test_encode_unknown_template_raises(tok):
    with pytest.raises(ValueError, match="unknown prompt template 'alpaca'"):
        encode_example(tok, Encoding("alpaca", 8, 8), "p", "r", [])


def test_tokenize_dataset_matches_encode_example(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"content": "abcdef", "summary": "xyz", "history": [["q", "a"]]},
                                              {"content": "hi", "summary": "there"}])
    ds = load_examples(path, HCOLS)
    enc = Encoding("plain", max_source_length=5, max_target_length=2, truncate_source_from="left")
    out = tokenize(ds, tok, enc)
    assert out.column_names == ["input_ids", "labels", "prompt_tokens", "response_tokens"]
    for i in range(len(ds)):
        want = encode_example(tok, enc, ds[i]["prompt"], ds[i]["response"], ds[i]["history"])
        assert out[i]["input_ids"] == want["input_ids"]
        assert out[i]["labels"] == want["labels"]


@pytest.mark.parametrize("template, side, level, said", [
    ("chat_template", "right", logging.WARNING, "the template's end (its answer cue) with them; "
                                                "data.truncate_source_from=left keeps the template whole"),
    ("chat_template", "left", logging.INFO, "cut from the left"),
    ("plain", "right", logging.INFO, "cut from the right"),
])
def test_training_rows_say_how_many_prompts_were_cut_and_warn_where_the_answer_cue_goes(tmp_path, tok, caplog,
                                                                                       template, side, level, said):
    path = write_jsonl(tmp_path / "d.jsonl", [{"content": "abcdefghijklmnop", "summary": "x"},
                                              {"content": "ab", "summary": "y"}, {"content": "q" * 30, "summary": "z"}])
    cfg = OmegaConf.create({"train_file": str(path), "prompt_column": "content", "response_column": "summary",
                            "history_column": None, "max_source_length": 12, "max_target_length": 8,
                            "truncate_source_from": side})
    with caplog.at_level(logging.INFO, logger="ptune.data"):
        rows = training_rows(cfg, template, tok)
    assert rows.column_names == ["input_ids", "labels"]
    (record,) = [r for r in caplog.records if "were cut" in r.getMessage()]
    assert record.levelno == level
    assert record.getMessage().startswith(f"{path}: 2 of 3 prompts are longer than data.max_source_length=12 tokens "
                                          f"and were cut from the {side}")
    assert said in record.getMessage()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ptune.data"):
        training_rows(OmegaConf.merge(cfg, {"max_source_length": 64}), template, tok)
    assert not [r for r in caplog.records if "were cut" in r.getMessage()]


def test_training_rows_warn_how_many_responses_were_cut(tmp_path, tok, caplog):
    path = write_jsonl(tmp_path / "d.jsonl", [{"content": "a", "summary": "s" * 20}, {"content": "b", "summary": "t"},
                                              {"content": "c", "summary": "u" * 9}])
    cfg = OmegaConf.create({"train_file": str(path), "prompt_column": "content", "response_column": "summary",
                            "history_column": None, "max_source_length": 12, "max_target_length": 8,
                            "truncate_source_from": "right"})
    with caplog.at_level(logging.INFO, logger="ptune.data"):
        rows = training_rows(cfg, "plain", tok)
    (record,) = [r for r in caplog.records if "responses are longer" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith(f"{path}: 2 of 3 responses are longer than data.max_target_length=8 tokens "
                                          "and were cut")
    assert rows.column_names == ["input_ids", "labels"]
    assert rows[0]["labels"][-9:] == ids(tok, "s" * 8) + [tok.eos_token_id]  # the cut reply, then EOS
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ptune.data"):
        training_rows(OmegaConf.merge(cfg, {"max_target_length": 20}), "plain", tok)
    assert not [r for r in caplog.records if "responses are longer" in r.getMessage()]


# ----------------------------------------------------------------------------------------------------- collate


def _rows(*lengths):
    return [{"input_ids": list(range(10, 10 + n)), "labels": [IGNORE] + list(range(20, 20 + n - 1))} for n in lengths]


def test_collate_pads_to_batch_longest():
    rows = _rows(3, 5, 2)
    b = collate(rows, pad_token_id=7)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape == (3, 5)
    assert b["input_ids"].dtype == b["labels"].dtype == b["attention_mask"].dtype == torch.long
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        assert b["input_ids"][i, :n].tolist() == r["input_ids"]
        assert b["labels"][i, :n].tolist() == r["labels"]
        assert b["attention_mask"][i].tolist() == [1] * n + [0] * (5 - n)
        assert b["input_ids"][i, n:].tolist() == [7] * (5 - n)
        assert b["labels"][i, n:].tolist() == [IGNORE] * (5 - n)
    # Another batch gets its own length, not a fixed one.
    assert collate(_rows(2, 1), pad_token_id=0)["input_ids"].shape == (2, 2)


@pytest.mark.parametrize("lengths,multiple,width", [((3, 5), 4, 8), ((8, 2), 8, 8), ((9,), 8, 16), ((5,), 1, 5)])
def test_collate_rounds_up_to_multiple(lengths, multiple, width):
    b = collate(_rows(*lengths), pad_token_id=0, pad_to_multiple_of=multiple)
    assert b["input_ids"].shape == (len(lengths), width)
    assert b["attention_mask"].sum(1).tolist() == list(lengths)
    assert (b["labels"][b["attention_mask"] == 0] == IGNORE).all()
    assert (b["input_ids"][b["attention_mask"] == 0] == 0).all()


def test_left_pad():
    b = left_pad([[1, 2], [3, 4, 5], [6]], pad_token_id=9)
    assert b["input_ids"].tolist() == [[9, 1, 2], [3, 4, 5], [9, 9, 6]]
    assert b["attention_mask"].tolist() == [[0, 1, 1], [1, 1, 1], [0, 0, 1]]
    assert b["input_ids"].dtype == torch.long


# --------------------------------------------------------------------------------------------------- BatchPlan


def make_plan(n=24, micro=2, acc=2, world=2, seed=0, sort=True):
    g = torch.Generator().manual_seed(1234)
    lengths = (torch.randperm(n * 3, generator=g)[:n] + 1).tolist()  # distinct lengths: no ties when sorting
    targets = [(ln * 7) % 11 + 1 for ln in lengths]
    return BatchPlan(lengths, targets, micro_batch=micro, accumulation=acc, world_size=world, seed=seed,
                     sort_by_length=sort)


def test_batchplan_global_batch():
    assert make_plan(micro=3, acc=2, world=4).global_batch == 24


def test_batchplan_deterministic_per_seed():
    a, b, c = make_plan(seed=5), make_plan(seed=5), make_plan(seed=6)
    steps = range(8)
    assert [a.global_rows(s) for s in steps] == [b.global_rows(s) for s in steps]
    assert [a.micro_batches(s, 1) for s in steps] == [b.micro_batches(s, 1) for s in steps]
    assert [a.global_rows(s) for s in steps] != [c.global_rows(s) for s in steps]


def test_batchplan_random_access_matches_sequential():
    # Resuming at step N needs only N: a fresh plan asked for step N out of order agrees with one that walked there.
    walked = make_plan(n=10, micro=1, acc=4, world=1, sort=False)
    seq = [walked.global_rows(s) for s in range(12)]
    fresh = make_plan(n=10, micro=1, acc=4, world=1, sort=False)
    for s in [11, 3, 7, 0, 10, 5, 2]:
        assert fresh.global_rows(s) == seq[s]


@pytest.mark.parametrize("sort", [True, False])
def test_batchplan_epoch_covers_every_row_once(sort):
    plan = make_plan(n=24, micro=2, acc=2, world=2, sort=sort)  # global batch 8 divides 24
    for epoch in range(3):
        rows = [r for s in range(epoch * 3, epoch * 3 + 3) for r in plan.global_rows(s)]
        assert sorted(rows) == list(range(24))
    unsorted = make_plan(n=24, micro=2, acc=2, world=2, sort=False)
    e0 = [r for s in range(3) for r in unsorted.global_rows(s)]
    e1 = [r for s in range(3, 6) for r in unsorted.global_rows(s)]
    assert e0 != e1  # each epoch is reshuffled


@pytest.mark.parametrize("sort", [True, False])
def test_batchplan_micro_batches_partition_global_batch(sort):
    multi = make_plan(n=30, micro=2, acc=3, world=2, seed=3, sort=sort)
    single = make_plan(n=30, micro=4, acc=3, world=1, seed=3, sort=sort)
    assert multi.global_batch == single.global_batch == 12
    for step in range(6):
        per_rank = [multi.micro_batches(step, r) for r in range(2)]
        for mbs in per_rank:
            assert len(mbs) == 3 and all(mbs)
            if not sort:
                assert all(len(mb) == 2 for mb in mbs)
        got = [row for mbs in per_rank for mb in mbs for row in mb]
        assert Counter(got) == Counter(multi.global_rows(step))
        assert Counter(got) == Counter(r for mb in single.micro_batches(step, 0) for r in mb)


def test_batchplan_micro_batch_ids_name_the_same_rows_whatever_the_world_size():
    # 1 rank x 4 micro-batches and 2 ranks x 2 and 4 ranks x 1: id i is always the same rows.
    plans = {w: make_plan(n=30, micro=2, acc=4 // w, world=w, seed=3) for w in (1, 2, 4)}
    for step in range(5):
        by_id = {}
        for world, plan in plans.items():
            for rank in range(world):
                ids, mbs = plan.micro_batch_ids(rank), plan.micro_batches(step, rank)
                assert len(ids) == len(mbs)
                for i, mb in zip(ids, mbs):
                    assert by_id.setdefault(i, mb) == mb
        assert sorted(by_id) == [0, 1, 2, 3]


def test_balanced_bounds_cut_contiguous_runs_of_even_padded_size():
    g = random.Random(0)
    for _ in range(500):
        n = g.randint(1, 48)
        parts = g.randint(1, n)
        lengths = sorted(g.randint(1, 200) for _ in range(n))
        bounds = balanced_bounds(lengths, parts)
        assert bounds[0] == 0 and bounds[-1] == n and len(bounds) == parts + 1
        assert all(a < b for a, b in zip(bounds, bounds[1:]))
        padded = [(b - a) * lengths[b - 1] for a, b in zip(bounds, bounds[1:])]
        if n % parts == 0:  # never worse than equal row counts, the memory a micro-batch setting promises
            equal = [(n // parts) * lengths[(i + 1) * (n // parts) - 1] for i in range(parts)]
            assert max(padded) <= max(equal)


def test_sorted_micro_batches_stay_within_the_micro_batch_setting_once_padded_to_a_multiple():
    """collate rounds a micro-batch's length up to pad_to_multiple_of: the cut must weigh rows at that length, or a
    run of 5 rows x 144 padded tokens passes for 5 x 133 and outgrows 4 x 176 (AdvertiseGen at 4 x 4, padding 16)."""
    from ptune.data import collate

    g = random.Random(3)
    for _ in range(200):
        micro, acc, multiple = g.randint(2, 6), g.randint(1, 4), g.choice([1, 8, 16, 64])
        lengths = [g.randint(20, 193) for _ in range(micro * acc * 3)]
        plan = BatchPlan(lengths, [1] * len(lengths), micro_batch=micro, accumulation=acc, world_size=1, seed=0,
                         pad_to_multiple_of=multiple)
        for step in range(3):
            rows = [{"input_ids": [5] * lengths[r], "labels": [5] * lengths[r]} for r in plan.global_rows(step)]
            promised = micro * collate(rows, 0, multiple)["input_ids"].shape[1]
            for run in plan.micro_batches(step, 0):
                padded = collate([{"input_ids": [5] * lengths[r], "labels": [5] * lengths[r]} for r in run], 0,
                                 multiple)["input_ids"].numel()
                assert padded <= promised, (micro, acc, multiple, step, run)


def test_balanced_bounds_evens_out_two_ranks():
    g = random.Random(1)
    lengths = sorted(g.randint(100, 193) for _ in range(32))
    halves = [16 * lengths[15], 16 * lengths[31]]
    bounds = balanced_bounds(lengths, 2)
    padded = [(b - a) * lengths[b - 1] for a, b in zip(bounds, bounds[1:])]
    assert max(padded) < max(halves)
    assert max(padded) / min(padded) < max(halves) / min(halves)
    assert max(padded) - min(padded) <= lengths[-1]  # within one row of even


def grouped_plan(n=100, group=5, seed=0, micro=4, acc=2):
    g = random.Random(7)
    lengths = [g.randint(20, 200) for _ in range(n)]
    return BatchPlan(lengths, [1] * n, micro_batch=micro, accumulation=acc, world_size=1, seed=seed,
                     group_by_length=group)


@pytest.mark.parametrize("n", [96, 100])  # global batch 8 divides 96, not 100
def test_group_by_length_keeps_epochs_whole_and_shrinks_padding(n):
    grouped, plain = grouped_plan(n, group=5), grouped_plan(n, group=0)
    steps = n // 8
    rows = [r for s in range(steps) for r in grouped.global_rows(s)]
    assert len(set(rows)) == len(rows) == steps * 8  # no row twice within the epoch's full batches
    if n % 8 == 0:
        assert sorted(rows) == list(range(n))

    def padded(plan):
        return sum(8 * max(plan.lengths[r] for r in plan.global_rows(s)) for s in range(steps))

    assert padded(grouped) < 0.8 * padded(plain)
    # Batches still come in random order, not shortest first.
    firsts = [min(grouped.lengths[r] for r in grouped.global_rows(s)) for s in range(steps)]
    assert firsts != sorted(firsts)


def test_group_by_length_keeps_its_effect_in_later_epochs_when_batches_straddle_epochs():
    """100 rows, global batch 8: each later epoch starts part-way into a batch. Its grouped batches must still
    line up with the steps (they were cut at the epoch's start, so every step mixed two groups)."""
    grouped, plain = grouped_plan(100, group=5), grouped_plan(100, group=0)

    def padded(plan, steps):
        return sum(8 * max(plan.lengths[r] for r in plan.global_rows(s)) for s in steps)

    for epoch in range(1, 4):
        steps = range(epoch * 100 // 8 + 1, (epoch + 1) * 100 // 8)  # the steps wholly inside the epoch
        assert padded(grouped, steps) < 0.8 * padded(plain, steps), epoch
    rows = [r for s in range(100) for r in grouped.global_rows(s)]  # 8 epochs: every row 8 times
    assert sorted(rows) == sorted(list(range(100)) * 8)


def test_group_by_length_is_a_pure_function_of_seed_and_step():
    walked = grouped_plan(n=50, group=3, seed=4)
    seq = [walked.global_rows(s) for s in range(20)]  # crosses three epochs (50 rows, 8 a step)
    fresh = grouped_plan(n=50, group=3, seed=4)
    for s in [19, 2, 13, 7, 0, 6]:
        assert fresh.global_rows(s) == seq[s]
    assert [grouped_plan(n=50, group=3, seed=5).global_rows(s) for s in range(20)] != seq


def test_batchplan_sorted_by_length_within_global_batch():
    plan = make_plan(n=40, micro=2, acc=2, world=2, sort=True)
    raw = make_plan(n=40, micro=2, acc=2, world=2, sort=False)
    unsorted_seen = False
    for step in range(10):
        lens = [plan.lengths[r] for r in plan.global_rows(step)]
        assert lens == sorted(lens)
        assert sorted(plan.global_rows(step)) == sorted(raw.global_rows(step))
        raw_lens = [raw.lengths[r] for r in raw.global_rows(step)]
        unsorted_seen |= raw_lens != sorted(raw_lens)
    assert unsorted_seen


def test_batchplan_target_tokens():
    plan = make_plan(n=17, micro=3, acc=2, world=1)
    for step in range(8):
        assert plan.target_tokens(step) == sum(plan.targets[r] for r in plan.global_rows(step))
    assert plan.target_tokens(0) > 0


def test_batchplan_crosses_epoch_boundary():
    plan = make_plan(n=10, micro=2, acc=2, world=1, sort=False)  # global batch 4 does not divide 10
    stream = []
    for step in range(5):  # 20 positions = exactly two epochs; step 2 spans both
        rows = plan.global_rows(step)
        assert len(rows) == plan.global_batch
        stream += rows
    assert sorted(stream[:10]) == list(range(10))
    assert sorted(stream[10:]) == list(range(10))
    sorted_plan = make_plan(n=10, micro=2, acc=2, world=1, sort=True)
    assert len(sorted_plan.global_rows(2)) == 4
    assert Counter(sorted_plan.global_rows(2)) == Counter(plan.global_rows(2))
    assert sum(len(mb) for mb in sorted_plan.micro_batches(2, 0)) == 4


def test_batchplan_global_batch_larger_than_dataset():
    plan = make_plan(n=3, micro=4, acc=2, world=1)  # 8 rows a step from 3 rows: spans three epochs
    counts = Counter(r for s in range(3) for r in plan.global_rows(s))
    assert counts == Counter({0: 8, 1: 8, 2: 8})


def _byte_level_tokenizer():
    """A byte-level BPE with no merges: every byte of a Chinese character is a token of its own."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"</s>": 0, **{c: i + 1 for i, c in enumerate(sorted(alphabet))}}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>")


@pytest.mark.parametrize("keep", range(4, 12))
def test_a_left_cut_never_keeps_part_of_a_character(keep):
    """Cut from the left at any byte, the kept text starts at a whole character: 类型#裤 is 3 bytes a character
    but for the #, and a cut inside one used to keep its last bytes, decoding to U+FFFD."""
    bt = _byte_level_tokenizer()
    text = "类型#裤*材质"
    whole = bt.encode(text, add_special_tokens=False)
    assert len(whole) == 3 * 5 + 2
    kept = fit_prompt(bt, whole, "plain", keep, "left")
    decoded = bt.decode(kept)
    assert "\ufffd" not in decoded and text.endswith(decoded) and keep - 2 <= len(kept) <= keep, (kept, decoded)


def test_a_template_that_refuses_messages_is_a_data_error_a_broken_one_is_not(tok):
    """The template's own raise_exception (Gemma-2 on a system message) is the messages' fault; a syntax error
    in the template is the model folder's, and must not be told to a client as a problem with its messages."""
    from jinja2 import TemplateSyntaxError

    from ptune.data import chat_template_ids
    from ptune.errors import DataError

    refusing = tok.__class__.from_pretrained(tok.name_or_path)
    refusing.chat_template = "{{ raise_exception('System role not supported') }}"
    with pytest.raises(DataError, match="^the model's chat template refuses these messages: System role not supported$"):
        chat_template_ids(refusing, [{"role": "user", "content": "hi"}])
    refusing.chat_template = "{{ messages[0].content }"
    with pytest.raises(TemplateSyntaxError):
        chat_template_ids(refusing, [{"role": "user", "content": "hi"}])
