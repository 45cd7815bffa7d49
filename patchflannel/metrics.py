"""Classification metrics for the four-class task: per-class F1, macro-F1, COVID sensitivity/specificity.

Example:
    >>> report = classification_report([0, 1, 2, 3], [0, 1, 2, 2])
    >>> report["macro_f1"], report["per_class"]["normal"]["f1"]
    (0.6666666666666666, 0.0)
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .learners.registry import CLASSES


def classification_report(y_true: Sequence[int], y_pred: Sequence[int], classes: Sequence[str] = CLASSES,
                          positive: str = "covid") -> dict:
    """Per-class precision/recall/F1 (one-vs-rest), macro-F1 over ``classes``, accuracy, confusion
    matrix (rows = truth), and sensitivity/specificity of ``positive`` against the rest.

    Classes absent from ``y_true`` still count in macro-F1 (as sklearn's ``labels=``); use
    :func:`fraction_predicted` for sets that hold only one class.
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
