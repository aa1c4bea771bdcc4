"""ptune.metrics must reproduce ChatGLM2-6B's evaluation numbers.

The golden fixtures are produced by tests/golden/make_metrics_golden.py, which
implements the reference recipe independently of ptune; regenerate them with
that script if jieba / rouge_chinese / nltk are upgraded on purpose.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
try:
    from ptune.metrics import SCORE_KEYS, compute_metrics, per_sample_scores
except ModuleNotFoundError:  # running from a checkout that is not pip-installed
    sys.path.insert(0, str(REPO_ROOT))
    from ptune.metrics import SCORE_KEYS, compute_metrics, per_sample_scores

GOLDEN = Path(__file__).resolve().parent / "golden"
TOL = 1e-4


@pytest.fixture(scope="module")
def golden():
    with (GOLDEN / "metrics_pairs.jsonl").open(encoding="utf-8") as f:
        pairs = [json.loads(line) for line in f if line.strip()]
    with (GOLDEN / "metrics_expected.json").open(encoding="utf-8") as f:
        expected = json.load(f)
    assert len(pairs) == len(expected["per_sample"]) >= 200
    return pairs, expected


def test_golden_aggregate_matches_reference_recipe(golden):
    pairs, expected = golden
    result = compute_metrics([p["predict"] for p in pairs], [p["label"] for p in pairs])
    agg = expected["aggregate"]
    for key in SCORE_KEYS:
        assert result[key] == pytest.approx(agg[key], abs=TOL), key
        assert isinstance(result[key], float)
    assert result["num_samples"] == agg["num_samples"] == len(pairs)
    assert result["num_empty_predictions"] == agg["num_empty_predictions"]
    assert result["num_empty_labels"] == agg["num_empty_labels"]
    # The fixture must actually exercise the blank-text guard.
    assert agg["num_empty_predictions"] > 0 and agg["num_empty_labels"] > 0


def test_golden_per_sample_scores(golden):
    pairs, expected = golden
    mismatches = []
    for i, (pair, want) in enumerate(zip(pairs, expected["per_sample"])):
        got = per_sample_scores(pair["predict"], pair["label"])
        assert set(got) == set(SCORE_KEYS)
        for key in SCORE_KEYS:
            if abs(got[key] - want[key]) > TOL:
                mismatches.append((i, key, got[key], want[key], pair))
    assert not mismatches, mismatches[:5]


def test_result_keys():
    result = compute_metrics(["这款裤子很宽松"], ["这款裤子采用宽松版型"])
    assert set(result) == {
        "rouge-1", "rouge-2", "rouge-l", "bleu-4",
        "num_samples", "num_empty_predictions", "num_empty_labels",
    }
    assert result["num_samples"] == 1
    assert result["num_empty_predictions"] == 0


def test_identical_texts_score_100():
    text = "这款裤子采用宽松版型，穿着舒适不紧绷。"
    scores = per_sample_scores(text, text)
    assert scores == {"rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0, "bleu-4": 100.0}
    result = compute_metrics([text, text], [text, text])
    for key in SCORE_KEYS:
        assert result[key] == 100.0


@pytest.mark.parametrize("blank", ["", " ", "\n\t ", "\u3000"])
def test_blank_prediction_scores_zero_rouge_and_is_counted(blank):
    label = "精选纯棉面料，柔软亲肤又透气"
    scores = per_sample_scores(blank, label)
    assert scores["rouge-1"] == scores["rouge-2"] == scores["rouge-l"] == 0.0
    assert scores["bleu-4"] == 0.0

    result = compute_metrics([blank, label], [label, label])
    assert result["num_empty_predictions"] == 1
    assert result["num_empty_labels"] == 0
    # The blank row stays in the mean rather than being dropped.
    assert result["rouge-1"] == pytest.approx(50.0, abs=TOL)


def test_blank_label_scores_zero_rouge_and_is_counted():
    pred = "精选纯棉面料，柔软亲肤又透气"
    result = compute_metrics([pred, ""], ["  ", ""])
    assert result["rouge-1"] == result["rouge-2"] == result["rouge-l"] == 0.0
    assert result["num_empty_labels"] == 2
    assert result["num_empty_predictions"] == 1


def test_length_mismatch_names_both_lengths():
    with pytest.raises(ValueError) as err:
        compute_metrics(["a", "b", "c"], ["a", "b"])
    message = str(err.value)
    assert "3" in message and "2" in message


def test_empty_inputs_rejected():
    with pytest.raises(ValueError):
        compute_metrics([], [])


def test_non_string_rejected():
    with pytest.raises(TypeError, match=r"predictions\[1\]"):
        compute_metrics(["好", None], ["好", "好"])
