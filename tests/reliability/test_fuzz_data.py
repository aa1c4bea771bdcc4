"""Property: whatever a data file holds, loading it either gives rows or raises DataError, nothing else.

Arbitrary JSON values (in rows shaped like the real ones, and anywhere else), random bytes, BOMs, CRLF
line ends and JSON-array files; hypothesis shrinks any other exception to a minimal file.
Two known inputs that escape as other exceptions are tested in test_hostile_input.py (xfail): JSON
nested ~100k deep (RecursionError) and a JSON-escaped lone surrogate (UnicodeEncodeError); hypothesis's
text strategy draws neither, so they do not make this property flaky.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ptune.data import Columns, DataError, load_examples, read_rows

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) |
                      st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
pairs = st.lists(st.tuples(st.text(max_size=10), st.text(max_size=10)).map(list), max_size=3)
good_rows = st.fixed_dictionaries({"content": st.text(min_size=1, max_size=30),
                                   "summary": st.text(min_size=1, max_size=30)}, optional={"history": pairs})
odd_rows = st.fixed_dictionaries({}, optional={"content": st.text(max_size=30) | values,
                                               "summary": st.text(max_size=30) | values,
                                               "history": pairs | values, "other": values})


def dump(value) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode("utf-8")


odd_line = st.one_of(odd_rows.map(dump), values.map(dump), st.binary(max_size=40),
                     st.sampled_from([b"", b"   ", b"\xef\xbb\xbf{}", b'{"content": "a", "summary": "b"',
                                      b'{"content": "a", "summary": "b", "id": ' + b"9" * 5000 + b"}"]))


@st.composite
def files(draw) -> bytes:
    """Mostly good rows with a few odd lines among them, or odd lines alone."""
    lines = draw(st.lists(good_rows.map(dump), max_size=4))
    for _ in range(draw(st.integers(0, 3))):
        lines.insert(draw(st.integers(0, len(lines))), draw(odd_line))
    newline = draw(st.sampled_from([b"\n", b"\r\n"]))
    body = newline.join(lines) + draw(st.sampled_from([b"", newline]))
    if lines and draw(st.integers(0, 3)) == 0:  # a JSON array file instead of JSON lines, sometimes broken
        body = b"[" + b",".join(lines) + draw(st.sampled_from([b"]", b"]", b""]))
    return draw(st.sampled_from([b"", b"\xef\xbb\xbf"])) + body


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=files(), with_history=st.booleans(), require_history=st.booleans())
def test_any_file_loads_or_raises_data_error(content, with_history, require_history):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.jsonl"
        path.write_bytes(content)
        columns = Columns("content", "summary", "history" if with_history else None)
        try:
            table = load_examples(path, columns, require_history=require_history)
        except DataError as e:
            event("DataError: " + str(e).split(": ", 1)[1].split(" (")[0].split(";")[0][:40])
            assert str(e) and "\n" not in str(e)  # one line, for the CLI
            assert str(path) in str(e)
            return
        event("loaded")
        assert len(table) >= 1
        for row in table:
            assert row["prompt"].strip() and row["response"].strip()


@st.composite
def arrays(draw) -> str:
    """JSON array text with random spacing, sometimes damaged by deleting or inserting a character."""
    items = draw(st.lists(st.dictionaries(st.text(max_size=5), values, max_size=3) | values, max_size=4))
    space = st.sampled_from(["", " ", "\n", "\r\n", "\t", "\n\n  "])
    text = draw(space) + "[" + draw(space)
    text += ",".join(draw(space) + json.dumps(v, indent=draw(st.sampled_from([None, 1]))) + draw(space)
                     for v in items)
    text += "]" + draw(space)
    if text and draw(st.integers(0, 2)) == 0:
        at = draw(st.integers(0, len(text) - 1))
        text = text[:at] + draw(st.sampled_from(["", ",", "]", "[", "x", "\n"])) + text[at + 1:]
    return text


@settings(max_examples=200, deadline=None, database=None)
@given(text=arrays())
def test_json_array_reads_as_the_json_parser_reads_it(text):
    """read_rows reads an array file element by element, to number rows by line: it must accept exactly what
    json.loads accepts, give the same values, and number each row by the line it starts on."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.json"
        path.write_text(text, encoding="utf-8", newline="")
        try:
            expected = json.loads(text)
        except ValueError:
            expected = None
        if not (isinstance(expected, list) and expected and all(isinstance(v, dict) for v in expected)):
            if text.lstrip(" \t\r\n").startswith("["):
                try:
                    read_rows(path)
                except DataError:
                    return
                raise AssertionError(f"read_rows accepted {text!r}")
            return
        numbered = read_rows(path)
        event("read")
        assert json.dumps([row for _, row in numbered]) == json.dumps(expected)  # by text: NaN != NaN
        lines = [line for line, _ in numbered]
        assert lines == sorted(lines) and 1 <= lines[0] and lines[-1] <= text.count("\n") + 1
