"""Generation metrics with the exact recipe of ChatGLM2-6B's P-Tuning v2 evaluation.

Scores produced here are meant to be comparable with numbers reported by the
reference ``ptuning/main.py``: word-level ROUGE F1 over jieba segmentation
(computed by ``rouge_chinese``) and character-level smoothed sentence BLEU-4
(computed by ``nltk``), each scaled to 0-100, rounded to 4 decimals per sample
and then averaged without weighting.  Any deviation from that recipe -- corpus
BLEU instead of mean sentence BLEU, a different tokenizer, rounding after the
mean -- would make our numbers incomparable, so the recipe is followed
literally, quirks included (see ``per_sample_scores``).

The one place where we deliberately differ is robustness: the reference script
crashes on an empty prediction (``rouge_chinese`` raises "Hypothesis is
empty."), which a model that immediately emits EOS can easily trigger.  Such
rows score 0 on ROUGE here and are counted so the caller can see how often it
happened.
"""

from __future__ import annotations

import functools
import logging
from typing import Sequence

__all__ = ["compute_metrics", "per_sample_scores", "ROUGE_KEYS", "SCORE_KEYS"]

ROUGE_KEYS = ("rouge-1", "rouge-2", "rouge-l")
SCORE_KEYS = ROUGE_KEYS + ("bleu-4",)


@functools.lru_cache(maxsize=1)
def _tools():
    """Import and warm up the scorers on first use only.

    jieba loads a ~30 MB dictionary (about a second) and logs "Building prefix
    dict" lines to stderr; importing this module for its constants, or running
    a training job that never evaluates, should pay neither cost.
    """
    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    jieba.setLogLevel(logging.WARNING)
    jieba.initialize()
    return jieba, Rouge(), sentence_bleu, SmoothingFunction().method3


def _is_blank(words: list[str]) -> bool:
    """Mirror the condition under which rouge_chinese gives up on a text.

    rouge_chinese strips trailing whitespace and drops empty sentences, so a
    text made only of whitespace (spaces, newlines, U+3000 ...) leaves it with
    no sentences and it raises instead of scoring.
    """
    return not " ".join(words).strip()


def _score_pair(prediction: str, label: str) -> tuple[dict[str, float], bool, bool]:
    jieba, rouge, sentence_bleu, smoothing = _tools()
    hyp_words = list(jieba.cut(prediction))
    ref_words = list(jieba.cut(label))
    pred_blank = _is_blank(hyp_words)
    label_blank = _is_blank(ref_words)

    scores: dict[str, float] = {}
    if pred_blank or label_blank:
        for key in ROUGE_KEYS:
            scores[key] = 0.0
    else:
        result = rouge.get_scores(" ".join(hyp_words), " ".join(ref_words))[0]
        for key in ROUGE_KEYS:
            scores[key] = float(round(result[key]["f"] * 100, 4))

    # BLEU is computed even for blank rows: nltk copes with empty sequences
    # (it returns the int 0, hence the float()), and whitespace-only texts are
    # real characters to it.
    bleu = sentence_bleu([list(label)], list(prediction), smoothing_function=smoothing)
    scores["bleu-4"] = float(round(bleu * 100, 4))
    return scores, pred_blank, label_blank


def _check_text(value: object, what: str, index: int | None = None) -> None:
    """Fail loudly on non-strings: jieba would silently decode bytes and
    ``list(None)`` would raise far from the cause."""
    if not isinstance(value, str):
        where = f"{what}[{index}]" if index is not None else what
        raise TypeError(f"{where} must be str, got {type(value).__name__}")


def per_sample_scores(prediction: str, label: str) -> dict[str, float]:
    """Score one row, for callers that write per-example results.

    The values are exactly the ones ``compute_metrics`` averages, so a per-row
    file can be re-aggregated offline and match the reported numbers.

    Inherited quirks worth knowing when reading per-row scores:

    * ROUGE-N counts *distinct* n-grams (rouge_chinese uses sets), so repeated
      words neither help nor hurt ROUGE-1/2.
    * A 1-word text has no bigrams, so its ROUGE-2 is 0 even against itself;
      likewise BLEU-4 of an identical text shorter than 4 characters is below
      100 because the smoothed higher-order precisions are not 1.
    * rouge_chinese splits sentences on line breaks; a whitespace-only line in
      the middle of a text becomes an empty-string "word", which can match the
      same artefact in the other text.
    """
    _check_text(prediction, "prediction")
    _check_text(label, "label")
    scores, _, _ = _score_pair(prediction, label)
    return scores


def compute_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict:
    """Aggregate scores over a decoded evaluation set.

    Returns ``rouge-1``, ``rouge-2``, ``rouge-l`` and ``bleu-4`` as the plain
    mean of the per-sample scores, plus ``num_samples``,
    ``num_empty_predictions`` and ``num_empty_labels``.  Blank rows are kept
    in the mean (with ROUGE 0) rather than dropped, because dropping them
    would reward a model for producing nothing on hard inputs.
    """
    n_pred, n_label = len(predictions), len(labels)
    if n_pred != n_label:
        raise ValueError(
            f"predictions and labels differ in length: {n_pred} predictions vs {n_label} labels"
        )
    if n_pred == 0:
        raise ValueError("cannot compute metrics on an empty evaluation set (0 predictions, 0 labels)")

    totals = {key: 0.0 for key in SCORE_KEYS}
    empty_predictions = 0
    empty_labels = 0
    for i, (prediction, label) in enumerate(zip(predictions, labels)):
        _check_text(prediction, "predictions", i)
        _check_text(label, "labels", i)
        scores, pred_blank, label_blank = _score_pair(prediction, label)
        empty_predictions += pred_blank
        empty_labels += label_blank
        for key in SCORE_KEYS:
            totals[key] += scores[key]

    out: dict = {key: float(totals[key] / n_pred) for key in SCORE_KEYS}
    out["num_samples"] = n_pred
    out["num_empty_predictions"] = empty_predictions
    out["num_empty_labels"] = empty_labels
    return out
