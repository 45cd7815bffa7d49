"""Classification metrics for the four-class task: per-class F1, macro-F1, COVID sensitivity/specificity.

Examples:
    >>> report = classification_report([0, 1, 2, 3], [0, 1, 2, 2])
    >>> report["macro_f1"], report["per_class"]["normal"]["f1"]
    (0.6666666666666666, 0.0)
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..labels import CLASSES
from .calibration import expected_calibration_error

__all__ = ["COHEN", "classification_report", "covid_auc", "fraction_predicted", "jaccard_dice",
           "ranking_report", "score"]


def classification_report(y_true: Sequence[int], y_pred: Sequence[int], classes: Sequence[str] = CLASSES,
                          positive: str = "covid") -> dict:
    """Per-class precision/recall/F1 (one-vs-rest), macro-F1 over ``classes``, accuracy, confusion
    matrix (rows = truth), and sensitivity/specificity of ``positive`` against the rest.

    Classes absent from ``y_true`` still count in macro-F1 (as sklearn's ``labels=``); use
    `fraction_predicted` for sets that hold only one class.
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    y_true, y_pred = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    labels = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    pos = list(classes).index(positive)
    tp, fn = cm[pos, pos], cm[pos].sum() - cm[pos, pos]
    fp = cm[:, pos].sum() - cm[pos, pos]
    tn = cm.sum() - tp - fn - fp
    present = support > 0
    return {
        "n": len(y_true),
        "accuracy": float((y_true == y_pred).mean()) if len(y_true) else float("nan"),
        "macro_f1": float(f1.mean()),
        "macro_f1_present": float(f1[present].mean()) if present.any() else float("nan"),
        "per_class": {c: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                          "support": int(support[i])} for i, c in enumerate(classes)},
        f"{positive}_sensitivity": float(tp / (tp + fn)) if tp + fn else float("nan"),
        f"{positive}_specificity": float(tn / (tn + fp)) if tn + fp else float("nan"),
        "confusion_matrix": cm.tolist(),
        "classes": list(classes),
    }


def ranking_report(y_true: Sequence[int], scores, classes: Sequence[str] = CLASSES) -> dict:
    """Per-class one-vs-rest ROC-AUC and PR-AUC (average precision) of ``scores`` ``(N, C)``;
    NaN for a class with no positive or no negative example."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    y_true, scores = np.asarray(y_true, dtype=int), np.asarray(scores, dtype=float)
    out = {}
    for i, c in enumerate(classes):
        positive = y_true == i
        if positive.all() or not positive.any():
            out[c] = {"roc_auc": float("nan"), "pr_auc": float("nan")}
        else:
            out[c] = {"roc_auc": float(roc_auc_score(positive, scores[:, i])),
                      "pr_auc": float(average_precision_score(positive, scores[:, i]))}
    return out


def fraction_predicted(y_pred: Sequence[int], classes: Sequence[str] = CLASSES) -> dict[str, float]:
    """Fraction of predictions per class (e.g. how many adult normal films were called covid)."""
    y_pred = np.asarray(y_pred, dtype=int)
    n = max(len(y_pred), 1)
    return {c: float((y_pred == i).sum() / n) for i, c in enumerate(classes)}


def jaccard_dice(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Jaccard and Dice of two bool masks (1, 1 when both are empty)."""
    inter = np.logical_and(pred, truth).sum()
    total = pred.sum() + truth.sum()
    if total == 0:
        return 1.0, 1.0
    return float(inter / (total - inter)), float(2 * inter / total)


COHEN = "cohen"


def covid_auc(truth: np.ndarray, probs: np.ndarray) -> float | None:
    """ROC-AUC of p(covid) for covid films against all others (``None`` without both)."""
    from sklearn.metrics import roc_auc_score

    is_covid = np.asarray(truth) == CLASSES.index("covid")
    if is_covid.all() or not is_covid.any():
        return None
    return float(roc_auc_score(is_covid, np.asarray(probs)[:, CLASSES.index("covid")]))


def score(rows: list[dict], probs: np.ndarray, external_probs: np.ndarray | None = None) -> dict:
    """One model's report on labelled ``rows`` from its ``(N, C)`` probabilities: the
    `classification_report`, per-class ROC-/PR-AUC, the same split by ``source``, the
    fraction of adult (NIH) normal films called each class, and of ``external_probs`` (films
    outside the four classes, e.g. adult ``other_pneumonia``)."""
    truth = np.asarray([CLASSES.index(r["label"]) for r in rows])
    pred = probs.argmax(-1)
    entry = classification_report(truth, pred)
    entry["ranking"] = ranking_report(truth, probs)
    entry["ece"] = expected_calibration_error(probs, truth)
    entry["by_source"] = {}
    for s in sorted({r["source"] for r in rows}):
        idx = [i for i, r in enumerate(rows) if r["source"] == s]
        entry["by_source"][s] = classification_report(truth[idx], pred[idx])
    adult_normal = [i for i, r in enumerate(rows) if r["label"] == "normal" and r["source"] == "nih"]
    entry["adult_normal_called"] = fraction_predicted(pred[adult_normal]) if adult_normal else None
    # Cohen's films are all adults from the same collection: covid against the rest there is
    # the one comparison that age and hospital style cannot answer.
    cohen = np.asarray([i for i, r in enumerate(rows) if r["source"] == COHEN], dtype=int)
    cohen_other = cohen[truth[cohen] != CLASSES.index("covid")] if len(cohen) else cohen
    entry["cohen_noncovid_called"] = fraction_predicted(pred[cohen_other]) if len(cohen_other) else None
    entry["cohen_covid_auc"] = covid_auc(truth[cohen], probs[cohen]) if len(cohen) else None
    entry["external_other_pneumonia_called"] = (fraction_predicted(external_probs.argmax(-1))
                                                if external_probs is not None and len(external_probs) else None)
    return entry
