"""Rows in, token ids and loss labels out: read, validate, build prompts, tokenize, mask, batch.

Files are read and checked here line by line (rather than handed straight to a JSON parser) so that a
bad row is reported as `file:line` with what is wrong; the validated rows then become a `datasets`
table for tokenization.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ptune.errors import DataError
from ptune.settings import TEMPLATES, data_file

log = logging.getLogger(__name__)
IGNORE = -100


@dataclass(frozen=True)
class Columns:
    prompt: str
    response: str
    history: str | None = None


# Archives and binary formats, known by their first bytes: AdvertiseGen itself ships as a .tar.gz.
_PACKED = ((b"\x1f\x8b", "gzip-compressed"), (b"PK\x03\x04", "zip"), (b"BZh", "bzip2-compressed"),
           (b"\xfd7zXZ\x00", "xz-compressed"), (b"\x28\xb5\x2f\xfd", "zstd-compressed"), (b"PAR1", "Parquet"),
           (b"7z\xbc\xaf\x27\x1c", "7-Zip"))


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    # Drop a byte-order mark (Windows editors add one) so error offsets count from the file's real start.
    bom = 3 if raw.startswith(b"\xef\xbb\xbf") else 0
    for magic, kind in _PACKED:
        if raw.startswith(magic):
            raise DataError(f"{path}: a {kind} file, not JSON text; unpack it and pass the JSON file inside")
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\x00" in raw[:4096]:
        # UTF-16 (Windows "Unicode"), with or without its mark: ASCII text then holds a NUL byte per character,
        # which is valid UTF-8 and would only surface as a puzzling JSON error.
        raise DataError(f"{path}: looks like UTF-16 (byte-order mark or NUL bytes), not UTF-8; save the file as "
                        "UTF-8")
    try:
        return raw[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        e.start += bom
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); save the file as UTF-8") from None


# JSON's own whitespace: str.strip would also skip characters a JSON parser rejects.
_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def _skip_space(text: str, pos: int) -> int:
    return _JSON_SPACE.match(text, pos).end()


def _parse_error(where: str, e: Exception) -> DataError:
    """The DataError for JSON that json.loads refused, at `where` (file:line)."""
    if isinstance(e, json.JSONDecodeError):
        return DataError(f"{where}: invalid JSON ({e.msg}, column {e.colno})")
    if isinstance(e, RecursionError):
        return DataError(f"{where}: JSON nested too deeply")
    if "integer string conversion" in str(e):
        # Python refuses to read integers this long (sys.get_int_max_str_digits, a guard against slow parsing).
        return DataError(f"{where}: an integer with more than {sys.get_int_max_str_digits()} digits, more than "
                         "Python reads; write such a value as a string")
    return DataError(f"{where}: invalid JSON ({e})")


def _spread_row(path: Path, text: str, start: int, lineno: int) -> DataError | None:
    """The error for a line that does not parse alone but starts a value ending on a later line: rows written
    with `json.dump(row, f, indent=2)`, which the parser's account of the first line would not make plain."""
    try:
        _, end = json.JSONDecoder().raw_decode(text, _skip_space(text, start))
    except (ValueError, RecursionError):
        return None
    last = lineno + text.count("\n", start, end)
    if last == lineno:
        return None
    return DataError(f"{path}:{lineno}: a row written over lines {lineno}-{last}; JSON lines takes one whole row per "
                     "line (write each with json.dumps and no indent), or make the file one JSON array: "
                     "[row, row, ...]")


def _line_rows(path: Path, text: str) -> list[tuple[int, object]]:
    numbered, start = [], 0
    # Split on newlines only: str.splitlines also breaks at U+2028/U+0085, which JSON keeps unescaped.
    for lineno, raw in enumerate(text.split("\n"), start=1):
        line, line_start, start = raw.rstrip("\r"), start, start + len(raw) + 1
        if not line.strip():
            continue
        try:
            numbered.append((lineno, json.loads(line)))
        except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
            raise _spread_row(path, text, line_start, lineno) or _parse_error(f"{path}:{lineno}", e) from None
    return numbered


def _reject_array(path: Path, text: str):
    """Raise the JSON parser's own account of what is wrong with a file that is not one well-formed array."""
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        raise _parse_error(f"{path}:{e.lineno}", e) from None
    except (ValueError, RecursionError) as e:
        raise _parse_error(str(path), e) from None
    raise DataError(f"{path}: not a well-formed JSON array")


def _array_rows(path: Path, text: str) -> list[tuple[int, object]]:
    """(line, value) of each element of a JSON array file, the line being the one the element starts on.

    Read one element at a time (rather than json.loads of the whole file) to learn where each row is, so
    that an error names the row's line in the file, not its position in the array.
    """
    decoder, numbered = json.JSONDecoder(), []
    pos = _skip_space(text, _skip_space(text, 0) + 1)  # past the "[" read_rows found
    line, counted, want_value = 1, 0, False
    while want_value or not text.startswith("]", pos):
        line, counted = line + text.count("\n", counted, pos), pos
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise _parse_error(f"{path}:{e.lineno}", e) from None
        except (ValueError, RecursionError) as e:
            raise _parse_error(f"{path}:{line}", e) from None
        numbered.append((line, value))
        pos = _skip_space(text, pos)
        want_value = text.startswith(",", pos)  # a comma must be followed by a value, not by "]"
        if want_value:
            pos = _skip_space(text, pos + 1)
        elif not text.startswith("]", pos):
            _reject_array(path, text)
    if _skip_space(text, pos + 1) != len(text):
        _reject_array(path, text)  # something after the closing bracket
    return numbered


def row_places(path: Path, numbered: list[tuple[int, object]]) -> list[str]:
    """`file:line` of each row, for messages; where rows share a line (an array written on one line), also
    the row's place in the array, which the line alone would not tell apart."""
    per_line: dict[int, int] = {}
    for line, _ in numbered:
        per_line[line] = per_line.get(line, 0) + 1
    return [f"{path}:{line}" + (f" (array element {i})" if per_line[line] > 1 else "")
            for i, (line, _) in enumerate(numbered, start=1)]


def read_rows(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, row) pairs from a JSON-lines file or a JSON array file."""
    path = data_file(path)
    text = _decode(path)
    is_array = text.startswith("[", _skip_space(text, 0))
    numbered = _array_rows(path, text) if is_array else _line_rows(path, text)
    for where, (_, row) in zip(row_places(path, numbered), numbered):
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object per row, got {type(row).__name__}")
    if not numbered:
        raise DataError(f"{path}: no rows")
    return numbered


def _check_history(value, where: str) -> list[tuple[str, str]]:
    if value is None:
        return []
    ok = isinstance(value, list) and all(
        isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn) for turn in value
    )
    if not ok:
        raise DataError(f"{where}: history must be a list of [question, answer] string pairs")
    return [tuple(turn) for turn in value]


def encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_columns(path, numbered: list[tuple[int, dict]], columns: Columns, require_history: bool) -> None:
    """Every configured column must be in some row: a misspelt name would otherwise read as empty everywhere."""
    present = sorted({k for _, row in numbered for k in row})
    for name, setting in ((columns.prompt, "data.prompt_column"), (columns.response, "data.response_column")):
        if all(name not in row for _, row in numbered):
            raise DataError(f"{path}: column {name!r} not found; columns present: {present} (set {setting}= to the "
                            "one that holds it)")
    # A row may lack the history column (no earlier turns), but a file where none has it was most likely
    # given a misspelt name, and training on it would silently drop every history.
    if columns.history and all(columns.history not in row for _, row in numbered):
        if require_history:
            raise DataError(f"{path}: column {columns.history!r} not found; columns present: {present} (set "
                            "data.history_column= to the one that holds it, or null)")
        log.warning("%s: no row has the history column %r (columns present: %s); every prompt is built without "
                    "history", path, columns.history, present)


def load_examples(path: str | Path, columns: Columns, require_history: bool = False):
    """Validated rows as a table of prompt / response / history; rows with an empty side are skipped.

    require_history: refuse a file where no row has `columns.history` (training). Evaluation and sweeps only
    warn: they inherit the checkpoint's history column, which `null` cannot clear for a file without history.
    """
    numbered = read_rows(path)
    _check_columns(path, numbered, columns, require_history)
    prompts, responses, histories, skipped = [], [], [], 0
    for where, (_, row) in zip(row_places(path, numbered), numbered):
        for name in (columns.prompt, columns.response):
            if name not in row:
                raise DataError(f"{where}: missing column {name!r}; this row has {sorted(row)}")
            if row[name] is not None and not isinstance(row[name], str):
                raise DataError(f"{where}: column {name!r} must be a string, got {type(row[name]).__name__}")
        prompt, response = row[columns.prompt], row[columns.response]
        history = _check_history(row.get(columns.history), where) if columns.history else []
        for name, text in [(columns.prompt, prompt), (columns.response, response)] + [
                (columns.history, t) for turn in history for t in turn]:
            if text and not encodable(text):
                raise DataError(f"{where}: column {name!r} holds an unpaired surrogate escape (\\ud800-\\udfff), "
                                "which is not text")
        if not prompt or not prompt.strip() or not response or not response.strip():
            skipped += 1
            continue
        prompts.append(prompt)
        responses.append(response)
        histories.append([list(t) for t in history])
    if skipped:
        log.warning("%s: skipped %d of %d rows with an empty prompt or response", path, skipped, len(numbered))
    if not prompts:
        raise DataError(f"{path}: every row has an empty prompt or response")
    from datasets import Dataset  # imported here: the benchmark and inference paths do not need it

    return Dataset.from_dict({"prompt": prompts, "response": responses, "history": histories})


def chatglm2_prompt(query: str, history) -> str:
    """ChatGLM2's round format: earlier turns, then the open question."""
    text = ""
    for i, (q, a) in enumerate(history, start=1):
        text += f"[Round {i}]\n\n问：{q}\n\n答：{a}\n\n"
    return text + f"[Round {len(history) + 1}]\n\n问：{query}\n\n答："


def whole_characters(text: str) -> str:
    """Text decoded from tokens that stop part-way through a character (a byte-level tokenizer's UTF-8 sequence
    cut by a length limit or a stream), without that character: it decodes as U+FFFD, which the text never had."""
    return text.rstrip("\ufffd")


def decode_text(tokenizer, tokens: list[int]) -> str:
    """The text of tokens as ptune shows and scores it everywhere (evaluate's predictions and references, chat,
    serve): special tokens left out, and without the tokenizer's space cleanup, which rewrites text already
    streamed ('a ' then 'a ,' becomes 'a,') and so would part a streamed reply from the same reply sent whole."""
    return tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def decode_reply(tokenizer, tokens: list[int]) -> str:
    """The text of a reply's tokens (decode_text), without a last character the tokens end part-way through
    (:func:`whole_characters`): a stream shows it once the next token completes it, a reply cut by its token
    limit never."""
    return whole_characters(decode_text(tokenizer, tokens))


def text_ids(tokenizer, text: str, add_special_tokens: bool = False) -> list[int]:
    """Ids of `text` read as text: a special token's spelling in it ("</s>", "<|im_end|>") stays those
    characters instead of becoming the control token, which would end a training target early or let a
    data row or a chat user write the template's own markers. (ChatGLM2's tokenizer never looks for them.)"""
    return tokenizer.encode(text, add_special_tokens=add_special_tokens, split_special_tokens=True)


def _special_spellings(tokenizer) -> set[str]:
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_tokens) | {str(t) for t in decoder.values() if getattr(t, "special", False)}


# Stand-ins for the messages' text while the chat template is rendered (Unicode private-use characters,
# which no template adds or removes), so that the text can be tokenized apart from the template.
_SLOT = "\ue000{}\ue001"
_SLOTS = re.compile("\ue000(\\d+)\ue001")
_WARNED_TEMPLATES: set = set()


def check_template_fits(tokenizer, template: str) -> None:
    """model.template=chat_template needs a tokenizer that has one: base models (GPT-2, most checkpoints that were
    not tuned for chat) do not."""
    if template == "chat_template" and not getattr(tokenizer, "chat_template", None):
        from ptune.errors import ConfigError

        raise ConfigError(f"model.template=chat_template: the tokenizer of {tokenizer.name_or_path} has no chat "
                          "template (a base model, not a chat one?); pass model.template=plain, or chatglm2 for "
                          "ChatGLM2's round format")


def _apply_chat_template(tokenizer, messages: list[dict], tokenize: bool):
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=tokenize)
    except TemplateError as e:
        if type(e) is not TemplateError:  # a syntax error, an undefined name: the template is broken, not the input
            raise
        # the template's own raise_exception: Gemma-2's has no system role, say
        raise DataError(f"the model's chat template refuses these messages: {e}") from None


def chat_template_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Ids of `messages` under the tokenizer's chat template, generation prompt included. The template's
    markers are control tokens; the messages' text is read as text (:func:`text_ids`)."""
    check_template_fits(tokenizer, "chat_template")
    ids = _apply_chat_template(tokenizer, messages, tokenize=True)
    ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    spellings = _special_spellings(tokenizer)
    if not any(s and s in m["content"] for m in messages for s in spellings):
        return ids  # the common case, tokenized as the template's own code does it
    slotted = [{**m, "content": _SLOT.format(i)} for i, m in enumerate(messages)]
    rendered = _apply_chat_template(tokenizer, slotted, tokenize=False)
    pieces = _SLOTS.split(rendered)  # template, slot number, template, slot number, ..., template
    if [int(n) for n in pieces[1::2]] != list(range(len(messages))):
        if tokenizer.chat_template not in _WARNED_TEMPLATES:
            _WARNED_TEMPLATES.add(tokenizer.chat_template)
            log.warning("this chat template moves or repeats the message text, so the spelling of a special "
                        "token in a message is read as that token")
        return ids
    out = []
    for i, piece in enumerate(pieces):
        out += (text_ids(tokenizer, messages[int(piece)]["content"]) if i % 2
                else tokenizer.encode(piece, add_special_tokens=False))
    return out


def prompt_ids(tokenizer, query: str, history, template: str, system: str | None = None) -> list[int]:
    """Token ids of the prompt, special tokens included, ready for the response to follow.

    `system` (chat and serve): the chat_template template passes it as a system turn; chatglm2 and plain
    have no such turn, so it goes in front of the first question, separated by a blank line."""
    if system and template != "chat_template":
        if history:
            history = [(f"{system}\n\n{history[0][0]}", history[0][1]), *history[1:]]
        else:
            query = f"{system}\n\n{query}"
    if template == "chatglm2":
        return text_ids(tokenizer, chatglm2_prompt(query, history), add_special_tokens=True)
    if template == "chat_template":
        messages = [{"role": "system", "content": system}] if system else []
        for q, a in history:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        messages.append({"role": "user", "content": query})
        return chat_template_ids(tokenizer, messages)
    if template == "plain":
        context = "".join(f"{q}\n{a}\n" for q, a in history)
        return text_ids(tokenizer, context + query, add_special_tokens=True)
    raise ValueError(f"unknown prompt template {template!r}; expected one of {', '.join(TEMPLATES)}")


@dataclass(frozen=True)
class Encoding:
    template: str
    max_source_length: int
    max_target_length: int
    truncate_source_from: str = "right"


def _shared_start(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def template_frame(tokenizer, ids: list[int], template: str) -> tuple[int, int]:
    """(head, tail): how many of a prompt's first and last tokens are the template's, not the user's text.

    The head holds what the model needs before any text (BOS, ChatGLM2's [gMASK] sop, a chat template's
    system and user header), the tail what cues the answer ("答：", an assistant header). Both are read off
    the prompt itself by comparing it with the template built around stand-in queries and no history:
    tokens are only counted as the template's where they are the same ids, so a tokenizer that merges text
    across the boundary shortens the frame rather than moving it into the text. Two different stand-ins, so
    that a query which happens to start (or end) like the template around it is not taken for the template.
    """
    head = tail = len(ids)
    for stand_in in ("", "0"):
        frame = prompt_ids(tokenizer, stand_in, [], template)
        h = _shared_start(ids, frame)
        head = min(head, h)
        # Matched from the end over what the head left, so head and tail never overlap.
        tail = min(tail, _shared_start(ids[h:][::-1], frame[h:][::-1]))
    return head, tail


def fit_prompt(tokenizer, ids: list[int], template: str, max_length: int, truncate_from: str) -> list[int]:
    """A whole prompt's ids (prompt_ids) cut to `max_length`; training (encode_example) and evaluate both cut
    their prompts here.

    right: the first `max_length` ids, as ChatGLM2's ptuning main.py cuts them (tests/golden pins it).
    left: the end of the text is kept, but not at the cost of the template: its head and tail stay and
    the cut falls inside the text (history first, oldest turns first). Cutting the plain id list from the
    left would drop BOS or [gMASK] sop, which the model cannot do without. Should the template alone not
    fit, its tail (the answer cue) is kept first, then as much of its head as fits, from the start.
    """
    if len(ids) <= max_length:
        return ids
    if truncate_from == "right":
        return ids[:max_length]
    head, tail = template_frame(tokenizer, ids, template)
    tail = min(tail, max_length)
    head = min(head, max_length - tail)
    start, end = len(ids) - max_length + head, len(ids) - tail
    # A byte-level tokenizer spreads a character over several tokens; a cut between them would keep its last
    # bytes, which decode to U+FFFD, no text at all. The kept text starts at the next whole character instead.
    for _ in range(3):  # a UTF-8 character has at most 3 bytes after its first
        if start >= end or not tokenizer.decode(ids[start:end]).startswith("\ufffd"):
            break
        start += 1
    return ids[:head] + ids[start:]


def report_cut_prompts(where, prompt_lengths: list[int], template: str, max_length: int, truncate_from: str) -> None:
    """Say how many prompts were longer than data.max_source_length, and, where the cut from the right took the
    template's answer cue with it, that the model is then trained or scored on prompts chat never sends."""
    cut = sum(n > max_length for n in prompt_lengths)
    if not cut:
        return
    said = (f"{where}: {cut} of {len(prompt_lengths)} prompts are longer than data.max_source_length={max_length} "
            f"tokens and were cut from the {truncate_from}")
    if truncate_from == "right" and template != "plain":
        log.warning("%s, the template's end (its answer cue) with them; data.truncate_source_from=left keeps the "
                    "template whole and cuts inside the text", said)
    else:
        log.info(said)


def encode_example(tokenizer, enc: Encoding, prompt: str, response: str, history) -> dict:
    """input_ids = prompt + response + EOS, labels = -100 over the prompt; prompt_tokens and response_tokens: the
    lengths before they were cut."""
    whole = prompt_ids(tokenizer, prompt, history, enc.template)
    source = fit_prompt(tokenizer, whole, enc.template, enc.max_source_length, enc.truncate_source_from)
    reply = text_ids(tokenizer, response)
    target = reply[: enc.max_target_length] + [tokenizer.eos_token_id]  # EOS after a cut too, as the reference
    return {"input_ids": source + target, "labels": [IGNORE] * len(source) + target, "prompt_tokens": len(whole),
            "response_tokens": len(reply)}


def tokenize(dataset, tokenizer, enc: Encoding):
    def fn(batch):
        out = {"input_ids": [], "labels": [], "prompt_tokens": [], "response_tokens": []}
        for p, r, h in zip(batch["prompt"], batch["response"], batch["history"]):
            for key, value in encode_example(tokenizer, enc, p, r, h).items():
                out[key].append(value)
        return out

    return dataset.map(fn, batched=True, remove_columns=dataset.column_names, desc="tokenize")


def training_rows(data_cfg, template: str, tokenizer, limit: int | None = None):
    """`data_cfg.train_file` validated, cut to its first `limit` rows, and tokenized for training."""
    examples = load_examples(data_cfg.train_file, Columns(data_cfg.prompt_column, data_cfg.response_column,
                                                          data_cfg.history_column), require_history=True)
    if limit is not None:
        examples = examples.select(range(min(limit, len(examples))))
    encoding = Encoding(template, data_cfg.max_source_length, data_cfg.max_target_length,
                        data_cfg.truncate_source_from)
    rows = tokenize(examples, tokenizer, encoding)
    report_cut_prompts(data_cfg.train_file, rows["prompt_tokens"], template, data_cfg.max_source_length,
                       data_cfg.truncate_source_from)
    cut = sum(n > data_cfg.max_target_length for n in rows["response_tokens"])
    if cut:  # each is learnt as a reply that ends there
        log.warning("%s: %d of %d responses are longer than data.max_target_length=%d tokens and were cut, the rest "
                    "of each left out of training and EOS put after the cut (the model learns to stop there); raise "
                    "data.max_target_length to keep them whole", data_cfg.train_file, cut, len(rows),
                    data_cfg.max_target_length)
    return rows.remove_columns(["prompt_tokens", "response_tokens"])


def collate(rows: list[dict], pad_token_id: int, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Right-pad a training batch to its own longest row (rounded up to a multiple, for tensor cores)."""
    longest = max(len(r["input_ids"]) for r in rows)
    longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((len(rows), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def left_pad(prompts: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-pad prompts for generation so every row's next token sits in the last column."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, longest - len(p):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def balanced_bounds(sorted_lengths: list[int], parts: int) -> list[int]:
    """Cut ascending lengths into `parts` contiguous runs minimising the largest rows x longest-row product.

    Returns the cut positions [0, ..., len]. Greedy from the longest end under a padded-size budget,
    with the smallest budget that needs no more than `parts` runs found by bisection.
    """
    n = len(sorted_lengths)

    def cut(budget: int) -> list[int]:
        ends, end = [n], n
        while end > 0:
            end -= max(1, min(end, budget // sorted_lengths[end - 1]))
            ends.append(end)
        return ends[::-1]

    lo, hi = sorted_lengths[-1], n * sorted_lengths[-1]
    while lo < hi:
        mid = (lo + hi) // 2
        if len(cut(mid)) - 1 <= parts:
            hi = mid
        else:
            lo = mid + 1
    bounds = cut(lo)
    while len(bounds) - 1 < parts:  # fewer runs than asked: halve the one with the most rows
        i = max(range(len(bounds) - 1), key=lambda j: bounds[j + 1] - bounds[j])
        bounds.insert(i + 1, (bounds[i] + bounds[i + 1]) // 2)
    return bounds


class BatchPlan:
    """Which rows make up each optimizer step, as a pure function of (seed, step).

    The order is an endless stream of seeded epoch permutations, so resuming at step N needs nothing
    but N; each global batch is split into micro-batches per rank and per accumulation step. Sorting a
    global batch by length before splitting it changes nothing mathematically (the loss is normalised
    by the global batch's target tokens) but removes most of the padding.
    """

    def __init__(self, lengths: list[int], num_target_tokens: list[int], micro_batch: int, accumulation: int,
                 world_size: int, seed: int, sort_by_length: bool = True, group_by_length: int = 0,
                 pad_to_multiple_of: int = 1):
        self.lengths = lengths
        self.targets = num_target_tokens
        self.micro_batch = micro_batch
        self.accumulation = accumulation
        self.world_size = world_size
        self.seed = seed
        self.sort_by_length = sort_by_length
        self.group_by_length = group_by_length
        self.pad_to_multiple_of = pad_to_multiple_of  # collate's rounding: the micro-batches are cut at padded lengths
        self.global_batch = micro_batch * accumulation * world_size
        self._epochs: dict[int, list[int]] = {}

    def _epoch(self, epoch: int) -> list[int]:
        if epoch not in self._epochs:
            # Seed and epoch mixed so that seed s+1 is not seed s shifted by one epoch.
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            # A global batch spans at most two epochs; older permutations are never asked for again.
            self._epochs = {e: p for e, p in self._epochs.items() if e == epoch - 1}
            order = torch.randperm(len(self.lengths), generator=g).tolist()
            if self.group_by_length > 1:
                # Where this epoch's first full global batch begins in the endless stream: the rows before it
                # finish the batch that the previous epoch's last rows began.
                head = min((-epoch * len(order)) % self.global_batch, len(order))
                order = order[:head] + self._grouped(order[head:], g)
            self._epochs[epoch] = order
        return self._epochs[epoch]

    def _grouped(self, order: list[int], g: torch.Generator) -> list[int]:
        """Sort each run of `group_by_length` global batches by length, then shuffle the batches.

        Every global batch then holds rows of similar length (little padding) while the batches still
        come in random order; `order` starts on a batch boundary, and a trailing partial batch stays last,
        to be finished by the next epoch's first rows.
        """
        size, n = self.group_by_length * self.global_batch, len(order)
        order = [r for i in range(0, n, size) for r in sorted(order[i:i + size], key=lambda r: self.lengths[r])]
        full = n // self.global_batch
        batches = [order[i * self.global_batch:(i + 1) * self.global_batch] for i in range(full)]
        shuffled = [r for b in torch.randperm(full, generator=g).tolist() for r in batches[b]]
        return shuffled + order[full * self.global_batch:]

    def global_rows(self, step: int) -> list[int]:
        n = len(self.lengths)
        start = step * self.global_batch
        rows = [self._epoch((start + i) // n)[(start + i) % n] for i in range(self.global_batch)]
        if self.sort_by_length:
            rows.sort(key=lambda r: self.lengths[r])
        return rows

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """This rank's micro-batches for one optimizer step.

        Unsorted: `micro_batch` rows each. Sorted by length: runs of similar length whose padded size
        (rows x longest row) is as even as it can be, so a run of short rows holds more of them and
        ranks stepping together finish together. No micro-batch pads to more than `micro_batch` of the
        step's longest rows would, each rounded up to `pad_to_multiple_of` as collate pads it, so memory stays
        within what the setting promises.
        """
        rows = self.global_rows(step)
        if self.sort_by_length and self.micro_batch > 1:
            multiple = self.pad_to_multiple_of
            bounds = balanced_bounds([-(-self.lengths[r] // multiple) * multiple for r in rows],
                                     self.accumulation * self.world_size)
        else:
            bounds = list(range(0, len(rows) + 1, self.micro_batch))
        micro = [rows[a:b] for a, b in zip(bounds, bounds[1:])]
        # Interleave ranks so each accumulation step hands neighbouring (similar) runs to the ranks.
        return micro[rank::self.world_size]

    def micro_batch_ids(self, rank: int) -> list[int]:
        """Position of each of this rank's micro-batches in the step's global batch (same order as micro_batches).

        The same micro-batch has the same id whatever the number of ranks, so anything seeded by it (dropout)
        is drawn alike on 1 GPU x 2 accumulation steps and on 2 GPUs x 1.
        """
        return list(range(rank, self.accumulation * self.world_size, self.world_size))

    def target_tokens(self, step: int) -> int:
        # Every target token counts once, shifted: labels[1:] of each row are the predicted positions.
        return sum(self.targets[r] for r in self.global_rows(step))
