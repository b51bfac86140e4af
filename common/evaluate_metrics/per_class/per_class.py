"""Per-class precision, recall, F1 and the confusion matrix, as a local `evaluate` module.

The confusion matrix is indexed [true class][predicted class]. A class with no predictions
(or no references) gets precision (or recall) 0.0, as scikit-learn's zero_division=0. The
macro averages are over the classes with references (`support` > 0): a class absent from
the evaluated set has no recall to average, and counting it as 0 would only say it is absent.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Per-class precision/recall/F1, their macro averages, and the confusion matrix."
_KWARGS = """
Args:
    predictions (list of int): predicted class indices.
    references (list of int): true class indices.
    num_classes (int): number of classes (rows/columns of the confusion matrix).
Returns:
    precision, recall, f1 (list of float, one per class), macro_precision, macro_recall,
    macro_f1 (float, over the classes with references), support (list of int: references
    per class), confusion_matrix (list of lists of int).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class PerClass(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}))

    def _compute(self, predictions, references, num_classes):
        cm = np.zeros((num_classes, num_classes), dtype=np.int64)
        np.add.at(cm, (np.asarray(references, dtype=np.int64),
                       np.asarray(predictions, dtype=np.int64)), 1)
        tp = np.diag(cm).astype(np.float64)
        predicted, actual = cm.sum(axis=0), cm.sum(axis=1)
        precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
        recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
        denom = precision + recall
        f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
        present = actual > 0

        def mean(values):
            return float(values[present].mean()) if present.any() else 0.0

        return {"precision": precision.tolist(), "recall": recall.tolist(), "f1": f1.tolist(),
                "macro_precision": mean(precision), "macro_recall": mean(recall),
                "macro_f1": mean(f1), "support": actual.tolist(),
                "confusion_matrix": cm.tolist()}
