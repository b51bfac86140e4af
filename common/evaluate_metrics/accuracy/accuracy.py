"""Accuracy as an `evaluate` module that loads from this folder, offline.

`evaluate.load("accuracy")` fetches its script from the Hub; this local module computes the
same number (fraction of predictions equal to references) with numpy only.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Accuracy: the fraction of predictions that equal their reference label."
_KWARGS = """
Args:
    predictions (list of int): predicted class indices.
    references (list of int): true class indices.
Returns:
    accuracy (float): in [0, 1]; 0.0 for no samples.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}))

    def _compute(self, predictions, references):
        p, r = np.asarray(predictions), np.asarray(references)
        return {"accuracy": float((p == r).mean()) if len(p) else 0.0}
