"""The tokenizer test strings, built from the AdvertiseGen slice in ../shared.

Shared by the golden-fixture script and the tokenizer test, so the committed fixture holds only
hashes and token ids -- none of the data set's text -- and the test rebuilds the strings from the
reference data when it is there.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

SEED = 1234


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def load_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def chatglm2_prompt(query: str, history: list[tuple[str, str]]) -> str:
    """ChatGLM2-6B's multi-round prompt: rounds numbered from 1."""
    prompt = ""
    for i, (q, a) in enumerate(history, start=1):
        prompt += f"[Round {i}]\n\n问：{q}\n\n答：{a}\n\n"
    prompt += f"[Round {len(history) + 1}]\n\n问：{query}\n\n答："
    return prompt


def tokenizer_strings(rows: list[dict]) -> tuple[list[str], list[dict]]:
    rng = random.Random(SEED)
    texts: list[str] = []
    for row in rows[:200]:
        texts.append(row["content"])
        texts.append(row["summary"])
    # rows carrying the literal <UNK> of the original data set
    unk_rows = [r["summary"] for r in rows[200:] if "<UNK>" in r["summary"]][:20]
    texts.extend(unk_rows)

    prompts = []
    for k in range(40):
        n_hist = k % 4
        picks = rng.sample(rows[200:1200], n_hist + 1)
        history = [(p["content"], p["summary"][: rng.randint(5, 60)]) for p in picks[:-1]]
        query = picks[-1]["content"]
        if k % 5 == 0:
            query = rng.choice(["你好", "Hello!", "写一首关于秋天的诗", "1+1=?", "  spaces around  "])
        prompt = chatglm2_prompt(query, history)
        prompts.append({"query": query, "history": [list(h) for h in history], "prompt": prompt})
        texts.append(prompt)

    specials = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>",
                "<|assistant|>", "<|observation|>", "<s>", "</s>", "<unk>", "<pad>", "<bos>", "<eos>"]
    for s in specials:
        texts += [s, f"前{s}后", f"a {s} b", f"{s}{s}", f" {s}"]
    texts += [
        "", " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "a\tb\tc", "a\n\nb", "line1\nline2\n",
        "  leading", "trailing  ", "  both  ", "many        spaces", "mixed \t\n whitespace",
        "\u3000全角空格\u3000", "tab\tsep\tvalues\t", "\n\n\n\n", "x" * 300, "哈" * 200,
        "😀", "😀👍🏽", "emoji 🎉 in text 🚀", "👨‍👩‍👧‍👦 family", "🇨🇳🇺🇸", "❤️", "✨宽松✨",
        "ＡＢＣａｂｃ１２３", "，。！？；：“”‘’（）【】《》", "全角：Ｈｅｌｌｏ，Ｗｏｒｌｄ！",
        "Hello, world!", "The quick brown fox jumps over the lazy dog.", "1234567890",
        "3.1415926535", "2023-10-01 12:34:56", "price: $19.99 (20% off)", "CamelCaseWord snake_case_word",
        "https://example.com/path?q=1&r=2", "user@example.com", "C++ / C# / F#", "#include <stdio.h>",
        "def f(x):\n    return x * 2\n", "{\"key\": [1, 2, 3]}", "a<b>c</b>d", "<|endoftext|>",
        "Ⅳ ① ⑵ ㈠", "é à ü ñ ç", "Ελληνικά", "Русский текст", "日本語のテキスト", "한국어 텍스트",
        "العربية", "עברית", "हिन्दी", "ไทย", "Ωmega µ ∑ ∫ √ ∞", "½ ¼ ¾", "©®™", "\u200b零宽\u200b",
        "\u00a0nbsp\u00a0", "control\x01char", "\x7f", "𠀀𠀁 rare ideographs", "龘靐齉", "丶丿乀",
        "ChatGLM2-6B 是一个开源的中英双语对话模型。", "类型#裙*颜色#红色*风格#复古",
        "<UNK>", "a<UNK>b", "<<>>", "[Round 1]", "问：", "答：", "[Round 1]\n\n问：你好\n\n答：",
    ]
    for _ in range(40):  # random mixtures of the pieces above
        parts = rng.sample(texts[-120:], 3)
        texts.append(rng.choice(["", " ", "\n"]).join(parts))
    return texts, prompts
