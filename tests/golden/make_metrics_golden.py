"""Build the golden fixtures for tests/test_metrics.py.

The expected scores are computed here by following the metric recipe of
ChatGLM2-6B's ptuning/main.py line by line, deliberately without importing
ptune, so the test compares ptune.metrics against an independent rendering of
the recipe rather than against itself.  The only addition to the recipe is the
handling of texts rouge_chinese refuses (it raises "Hypothesis is empty." /
"Reference is empty."): those rows get ROUGE 0, which is the behaviour
ptune.metrics promises.  That case is detected here by catching the library's
error, not by predicting it, so a mismatch in the guard condition shows up.

Pairs are synthetic AdvertiseGen-style clothing ad copy written for this file
and perturbed with a seeded RNG, so the output is reproducible bit for bit
given the same jieba / rouge_chinese / nltk versions (recorded in the output).

Run from the repository root:  python tests/golden/make_metrics_golden.py
"""

from __future__ import annotations

import json
import logging
import random
from importlib.metadata import version
from pathlib import Path

import jieba
import numpy as np
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge

HERE = Path(__file__).resolve().parent
PAIRS_PATH = HERE / "metrics_pairs.jsonl"
EXPECTED_PATH = HERE / "metrics_expected.json"
SEED = 20230625
N_RANDOM_PAIRS = 190

# Ad-copy fragments in the style of AdvertiseGen targets (written for this
# fixture).  Some carry ASCII punctuation, digits and English on purpose.
PHRASES = [
    "这款裤子采用宽松版型，穿着舒适不紧绷",
    "直筒的裤腿设计修饰腿型，显得双腿更加笔直修长",
    "高腰的设计拉长了下半身比例，轻松打造大长腿",
    "精选纯棉面料，柔软亲肤又透气",
    "简约的纯色设计，百搭又不失时尚感",
    "领口采用经典的圆领设计，修饰脸型和颈部线条",
    "袖口的荷叶边设计增添了几分甜美气息",
    "腰间的系带设计既能调节松紧，又能勾勒出纤细腰身",
    "撞色的条纹元素让整体造型更加活泼",
    "衣身点缀精致的刺绣图案，尽显复古文艺范儿",
    "A字型的裙摆走起路来摇曳生姿，飘逸灵动",
    "这款连衣裙采用雪纺材质，轻盈垂坠，清凉一夏",
    "落肩袖的设计慵懒随性，不挑身材",
    "前襟的单排扣设计经典耐看，方便穿脱",
    "后背的拉链设计隐形又实用",
    "破洞的细节处理彰显个性，充满街头潮流感",
    "九分的裤长露出纤细的脚踝，显高又显瘦",
    "毛呢面料厚实保暖，冬天穿也不怕冷",
    "oversize的廓形，藏肉又减龄",
    "胸前的字母印花logo增添了潮酷气息",
    "含棉量95%以上，吸汗透气不起球",
    "搭配小白鞋或者马丁靴都很好看",
    "V领的设计露出锁骨，性感又优雅",
    "格纹元素经典不过时，英伦风十足",
    "侧边开衩的设计方便活动，行走更自如",
    "松紧腰头贴合腰部，适合各种身材",
    "蕾丝拼接的设计浪漫又温柔",
    "口袋的设计实用又美观，可以放手机等小物件",
    "牛仔面料耐磨耐穿，水洗后依然挺括",
    "泡泡袖的设计充满了法式复古的味道",
    "整体剪裁利落大方，通勤约会都合适",
    "这件T恤的尺码有S/M/L/XL四种可选",
    "适合身高160-175cm的女生穿着",
    "不规则的下摆设计打破沉闷，增添层次感",
    "立体的剪裁贴合身形，穿出精致感",
]

# Words for insertions and for fully unrelated predictions.
FILLER = [
    "非常", "超级", "特别", "时尚", "百搭", "显瘦", "舒适", "宽松", "修身", "复古",
    "潮流", "简约", "优雅", "甜美", "个性", "经典", "面料", "设计", "版型", "细节",
    "the", "style", "fashion", "cool", "2023", "100%", "<UNK>", "，", "。", "！",
    ",", ".", "!", "?", "、", "；",
]
UNRELATED = [
    "今天天气晴朗，适合去公园散步",
    "这道红烧肉肥而不腻，入口即化",
    "股市收盘上涨了3.5个百分点",
    "请在下一个路口左转然后直行",
    "The quick brown fox jumps over the lazy dog.",
    "服务器在凌晨两点重启完毕",
    "猫咪喜欢在阳光下睡觉",
    "1234567890",
]

ROUGE_KEYS = ("rouge-1", "rouge-2", "rouge-l")
# The messages rouge_chinese uses when it refuses an empty text.
EMPTY_TEXT_ERRORS = {
    "Hypothesis is empty.",
    "Reference is empty.",
    "Collections must contain at least 1 sentence.",
}


def make_label(rng: random.Random, n_min: int = 2, n_max: int = 5) -> str:
    picked = rng.sample(PHRASES, rng.randint(n_min, n_max))
    return "，".join(picked) + rng.choice(["。", "！", "~", "", "."])


def perturb(rng: random.Random, text: str) -> str:
    """Apply a few random word-level edits (drop / swap / insert / replace)."""
    words = jieba.lcut(text)
    for _ in range(rng.randint(1, 6)):
        if not words:
            break
        op = rng.choice(["drop", "swap", "insert", "replace"])
        i = rng.randrange(len(words))
        if op == "drop":
            del words[i]
        elif op == "swap" and len(words) > 1:
            j = rng.randrange(len(words))
            words[i], words[j] = words[j], words[i]
        elif op == "insert":
            words.insert(i, rng.choice(FILLER))
        else:
            words[i] = rng.choice(FILLER)
    return "".join(words)


def build_pairs() -> list[dict]:
    rng = random.Random(SEED)
    pairs: list[tuple[str, str]] = []

    # Hand-picked edge cases first, so their positions are stable.
    base = make_label(rng)
    long_label = "，".join(rng.sample(PHRASES, 14)) + "。"
    assert len(long_label) >= 200, len(long_label)
    pairs += [
        ("", base),                                   # empty prediction
        (" ", base),                                  # whitespace-only predictions
        ("\n", base),
        ("  \t \n ", base),
        ("\u3000", base),                             # ideographic space
        ("", ""),                                     # both empty
        (base, ""),                                   # empty label
        (base, "   "),                                # whitespace-only label
        (base, base),                                 # identical
        (long_label, long_label),                     # identical, long
        ("好", "好"),                                 # 1 char, identical
        ("裤", "裙"),                                 # 1 char, different
        ("裤", base),                                 # 1 char vs long
        (base, "裙"),
        ("宽松", "宽松版型"),
        ("好的呀呀", "好的呀呀"),                     # identical, exactly 4 chars
        ("。。。", "。。。"),                         # punctuation only
        ("！？", "。"),
        ("，,.!?；;:：", "。.!！"),
        ("<UNK>", "<UNK>"),
        ("<UNK><UNK><UNK>", base),
        ("这款<UNK>采用<UNK>版型，穿着<UNK>", "这款裤子采用宽松版型，穿着舒适不紧绷"),
        ("oversize的T恤 fits well, size M.", "oversize的廓形，藏肉又减龄，尺码S/M/L"),
        ("含棉量95%以上", "含棉量100%"),
        ("2023 2024 2025", "2023年新款"),
        ("今天天气晴朗，适合去公园散步", "这款裤子采用宽松版型，穿着舒适不紧绷"),  # disjoint
        ("The quick brown fox.", "精选纯棉面料，柔软亲肤又透气"),
        ("好。\n好", "好。\n好"),                     # line breaks (sentence split)
        ("好。\n好", "坏。\n坏"),
        ("宽松\n \n显瘦", "修身\n \n百搭"),           # whitespace-only middle line
        ("宽松 宽松 宽松", "宽松"),                   # repeated words
        (long_label + long_label, base),              # 400+ chars
        (perturb(rng, long_label), long_label),
    ]

    for _ in range(N_RANDOM_PAIRS):
        label = make_label(rng)
        kind = rng.random()
        if kind < 0.06:
            pred = label                                         # identical
        elif kind < 0.12:
            pred = rng.choice(UNRELATED)                         # disjoint
        elif kind < 0.16:
            pred = rng.choice(["", " ", "\n", " \u3000 "])       # blank
        elif kind < 0.22:
            pred = label[: rng.randint(1, 3)]                    # very short
        elif kind < 0.30:
            pred = perturb(rng, label) + "<UNK>" * rng.randint(1, 3)
        elif kind < 0.36:
            pred = perturb(rng, "，".join(rng.sample(PHRASES, 12)))  # long
        elif kind < 0.40:
            pred = perturb(rng, label).replace("，", "\n", 1)     # multi-line
        else:
            pred = perturb(rng, label)
        pairs.append((pred, label))

    return [{"predict": p, "label": l} for p, l in pairs]


def score_reference(pairs: list[dict]) -> dict:
    """The ChatGLM2-6B recipe, written out straightforwardly."""
    score_dict = {"rouge-1": [], "rouge-2": [], "rouge-l": [], "bleu-4": []}
    per_sample = []
    num_empty_predictions = 0
    num_empty_labels = 0
    for pair in pairs:
        pred, label = pair["predict"], pair["label"]
        hypothesis = list(jieba.cut(pred))
        reference = list(jieba.cut(label))
        rouge = Rouge()
        row = {}
        try:
            scores = rouge.get_scores(" ".join(hypothesis), " ".join(reference))
            result = scores[0]
            for k, v in result.items():
                row[k] = round(v["f"] * 100, 4)
        except ValueError as err:
            if str(err) not in EMPTY_TEXT_ERRORS:
                raise
            for k in ROUGE_KEYS:
                row[k] = 0.0
        bleu_score = sentence_bleu(
            [list(label)], list(pred), smoothing_function=SmoothingFunction().method3
        )
        row["bleu-4"] = round(bleu_score * 100, 4)
        for k, v in row.items():
            score_dict[k].append(v)
        per_sample.append(row)
        num_empty_predictions += int(pred.strip() == "")
        num_empty_labels += int(label.strip() == "")

    aggregate = {k: float(np.mean(v)) for k, v in score_dict.items()}
    aggregate["num_samples"] = len(pairs)
    aggregate["num_empty_predictions"] = num_empty_predictions
    aggregate["num_empty_labels"] = num_empty_labels
    return {
        "recipe": "ChatGLM2-6B ptuning/main.py compute_metrics; blank texts score ROUGE 0",
        "versions": {pkg: version(pkg) for pkg in ("jieba", "rouge-chinese", "nltk")},
        "seed": SEED,
        "aggregate": aggregate,
        "per_sample": per_sample,
    }


def main() -> None:
    jieba.setLogLevel(logging.WARNING)
    pairs = build_pairs()
    expected = score_reference(pairs)
    with PAIRS_PATH.open("w", encoding="utf-8") as f:
        for pair in pairs:
            f.write(json.dumps(pair, ensure_ascii=False) + "\n")
    with EXPECTED_PATH.open("w", encoding="utf-8") as f:
        json.dump(expected, f, ensure_ascii=False, indent=1)
        f.write("\n")
    agg = expected["aggregate"]
    print(f"wrote {len(pairs)} pairs to {PAIRS_PATH.name}; aggregate: {agg}")


if __name__ == "__main__":
    main()
