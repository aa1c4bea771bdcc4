"""ChatGLM2-6B / ChatGLM3-6B tokenizer on plain sentencepiece, without trust_remote_code.

Both models share one SentencePiece model (64,789 pieces).  Nine command tokens follow the
pieces, in this order: ``[MASK] [gMASK] [sMASK] sop eop`` and ChatGLM3's role tokens
``<|system|> <|user|> <|assistant|> <|observation|>`` (ids 64789 .. 64797).  Every encoded
sequence starts with ``[gMASK] sop``.  Ordinary text is pure sentencepiece: a command token's
spelling inside user text (``"<|user|>"``, ``"[gMASK]"``, ``"</s>"``) stays text and is never
turned into the command id, which is also what the original tokenizer does.  ``pad`` is the
sentencepiece ``<unk>`` (id 0), ``eos`` is ``</s>`` (id 2).  Padding is on the left by default,
as generation needs; ``padding_side="right"`` works too.

The ids are checked against the original ChatGLM3 tokenizer by tests/test_chatglm_tokenizer.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from sentencepiece import SentencePieceProcessor
from transformers import PreTrainedTokenizer
from transformers.tokenization_utils_base import BatchEncoding

__all__ = ["ChatGLMTokenizer", "load_tokenizer", "COMMAND_TOKENS", "ROLE_TOKENS", "ROLES"]

MODEL_FILE = "tokenizer.model"
COMMAND_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
ROLES = ("system", "user", "assistant", "observation")
ROLE_TOKENS = tuple(f"<|{r}|>" for r in ROLES)


class ChatGLMTokenizer(PreTrainedTokenizer):
    """Tokenizer for ChatGLM2-6B and ChatGLM3-6B (a ``transformers`` slow tokenizer).

    Args:
        vocab_file: path of ``tokenizer.model``.
        padding_side: ``"left"`` (default, for generation) or ``"right"``.
        encode_special_tokens: when true, role-token spellings in text (``<|user|>`` ...) are encoded
            as the role ids instead of as text.  Off by default, as in the original.
    """

    vocab_files_names = {"vocab_file": MODEL_FILE}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str,
        padding_side: str = "left",
        clean_up_tokenization_spaces: bool = False,
        encode_special_tokens: bool = False,
        **kwargs,
    ):
        if not os.path.isfile(vocab_file):
            raise FileNotFoundError(f"ChatGLM tokenizer model not found: {vocab_file}")
        self.vocab_file = str(vocab_file)
        self.sp = SentencePieceProcessor(model_file=self.vocab_file)
        self.n_pieces = self.sp.get_piece_size()
        self.command_ids = {tok: self.n_pieces + i for i, tok in enumerate(COMMAND_TOKENS + ROLE_TOKENS)}
        self.command_tokens = {i: tok for tok, i in self.command_ids.items()}
        self.encode_special_tokens = encode_special_tokens
        self._role_pattern = re.compile("|".join(re.escape(t) for t in ROLE_TOKENS))
        # Ids that decode to nothing in the original (sentencepiece's unk/pad, bos, eos).
        self._silent_ids = {self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id()}
        # The special-token strings are never searched for in text (see the module docstring), so
        # transformers' added-token splitting is switched off.
        kwargs["split_special_tokens"] = True
        for key in ("unk_token", "pad_token", "eos_token", "bos_token", "extra_special_tokens",
                    "additional_special_tokens", "added_tokens_decoder"):
            kwargs.pop(key, None)  # fixed by the model, whatever a saved config says
        super().__init__(
            padding_side=padding_side,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            unk_token="<unk>",
            pad_token="<unk>",
            eos_token="</s>",
            extra_special_tokens=list(COMMAND_TOKENS + ROLE_TOKENS),
            encode_special_tokens=encode_special_tokens,
            **kwargs,
        )

    # ------------------------------------------------------------------ vocabulary

    @property
    def vocab_size(self) -> int:
        return self.n_pieces + len(self.command_ids)

    def get_vocab(self) -> dict[str, int]:
        if getattr(self, "_vocab", None) is None:
            self._vocab = {piece: i for i, piece in enumerate(self.sp.id_to_piece(list(range(self.n_pieces))))}
            self._vocab.update(self.command_ids)
        return dict(self._vocab)

    def get_command(self, token: str) -> int:
        """Id of a command/role token (``"[gMASK]"``, ``"sop"``, ``"<|user|>"`` ...)."""
        if token not in self.command_ids:
            raise KeyError(f"{token!r} is not a ChatGLM command token; known: {list(self.command_ids)}")
        return self.command_ids[token]

    @property
    def chat_stop_token_ids(self) -> list[int]:
        """Ids that end an assistant turn in ChatGLM3 chat: eos, ``<|user|>``, ``<|observation|>``."""
        return [self.eos_token_id, self.command_ids["<|user|>"], self.command_ids["<|observation|>"]]

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        if not self.encode_special_tokens:
            return self.sp.encode_as_pieces(text)
        pieces: list[str] = []
        start = 0
        for m in self._role_pattern.finditer(text):
            if m.start() > start:
                pieces.extend(self.sp.encode_as_pieces(text[start:m.start()]))
            pieces.append(m.group(0))
            start = m.end()
        if start < len(text):
            pieces.extend(self.sp.encode_as_pieces(text[start:]))
        return pieces

    def _convert_token_to_id(self, token: str) -> int:
        if token in self.command_ids:
            return self.command_ids[token]
        return self.sp.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        if index in self.command_tokens:
            return self.command_tokens[index]
        if index in self._silent_ids or index < 0:
            return ""
        return self.sp.id_to_piece(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.sp.decode_pieces(list(tokens))

    def _decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces=None,
                **kwargs) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        pieces = []
        for i in token_ids:
            i = int(i)
            if skip_special_tokens and (i in self.command_tokens or i in self._silent_ids):
                continue
            pieces.append(self._convert_id_to_token(i))
        text = self.convert_tokens_to_string(pieces)
        clean = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        return self.clean_up_tokenization(text) if clean else text

    # ------------------------------------------------------------------ special tokens

    @property
    def prefix_tokens(self) -> list[int]:
        return [self.command_ids["[gMASK]"], self.command_ids["sop"]]

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: list[int] | None = None) -> list[int]:
        ids = self.prefix_tokens + list(token_ids_0)
        if token_ids_1 is not None:
            ids += list(token_ids_1) + [self.eos_token_id]
        return ids

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False) -> list[int]:
        if already_has_special_tokens:
            special = set(self.command_tokens) | self._silent_ids
            return [1 if int(i) in special else 0 for i in token_ids_0]
        mask = [1, 1] + [0] * len(token_ids_0)
        if token_ids_1 is not None:
            mask += [0] * len(token_ids_1) + [1]
        return mask

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return 3 if pair else 2

    # ------------------------------------------------------------------ prompts

    @staticmethod
    def build_prompt(query: str, history: list | None = None) -> str:
        """ChatGLM2-6B's multi-round prompt; ``history`` is a list of ``(query, response)`` pairs."""
        parts = []
        history = list(history or [])
        for n, (old_query, response) in enumerate(history, start=1):
            parts.append(f"[Round {n}]\n\n问：{old_query}\n\n答：{response}\n\n")
        parts.append(f"[Round {len(history) + 1}]\n\n问：{query}\n\n答：")
        return "".join(parts)

    def build_single_message(self, role: str, metadata: str, message: str) -> list[int]:
        """One ChatGLM3 turn: role token, ``metadata + "\\n"``, then the message (no ``[gMASK] sop``)."""
        if role not in ROLES:
            raise ValueError(f"unknown ChatGLM3 role {role!r}; expected one of {ROLES}")
        return [self.command_ids[f"<|{role}|>"]] + self.sp.encode(f"{metadata}\n") + self.sp.encode(message)

    def chat_input_ids(self, query: str, history: list[dict] | None = None, role: str = "user") -> list[int]:
        """Ids of a ChatGLM3 chat input: ``[gMASK] sop``, every history turn, the query, ``<|assistant|>``.

        ``history`` holds ``{"role", "content"}`` dicts with optional ``"metadata"``; a system turn may
        carry ``"tools"``, appended to its content as indented JSON.
        """
        ids = list(self.prefix_tokens)
        for item in history or []:
            content = item["content"]
            if item["role"] == "system" and "tools" in item:
                content = content + "\n" + json.dumps(item["tools"], indent=4, ensure_ascii=False)
            ids += self.build_single_message(item["role"], item.get("metadata", ""), content)
        ids += self.build_single_message(role, "", query)
        ids.append(self.command_ids["<|assistant|>"])
        return ids

    def build_chat_input(self, query: str, history: list[dict] | None = None, role: str = "user",
                         return_tensors: str | None = "pt") -> BatchEncoding:
        """ChatGLM3's ``build_chat_input``: a batch of one, ``input_ids`` and ``attention_mask``."""
        ids = self.chat_input_ids(query, history, role)
        return BatchEncoding({"input_ids": [ids], "attention_mask": [[1] * len(ids)]}, tensor_type=return_tensors)

    # ------------------------------------------------------------------ saving

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        name = (filename_prefix + "-" if filename_prefix else "") + MODEL_FILE
        target = Path(save_directory) / name if os.path.isdir(save_directory) else Path(save_directory)
        if Path(self.vocab_file).resolve() != target.resolve():
            shutil.copyfile(self.vocab_file, target)
        return (str(target),)


def load_tokenizer(path: str | os.PathLike, **kwargs) -> ChatGLMTokenizer:
    """The ChatGLM tokenizer of a model folder (or of a ``tokenizer.model`` file itself).

    Only ``tokenizer.model`` is needed; ``padding_side`` and ``encode_special_tokens`` are taken from
    a ``tokenizer_config.json`` beside it when present, everything else there is ignored (it names
    remote code that is never run).  Keyword arguments override both.
    """
    p = Path(path)
    model_file = p if p.is_file() else p / MODEL_FILE
    if not model_file.is_file():
        raise FileNotFoundError(
            f"no {MODEL_FILE} in {p}: a ChatGLM2/3 model folder must hold the SentencePiece model file"
        )
    options = {}
    cfg_file = model_file.parent / "tokenizer_config.json"
    if cfg_file.is_file():
        try:
            saved = json.loads(cfg_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            saved = {}
        for key in ("padding_side", "encode_special_tokens"):
            if key in saved:
                options[key] = saved[key]
    options.update(kwargs)
    return ChatGLMTokenizer(str(model_file), **options)
