"""Top-1 and top-5 classification error, in percent, as an ``evaluate`` metric.

    metric = evaluate.load(koala_hf.metrics.TOP_K_ERROR)
    metric.compute(predictions=top5_indices, references=labels)
    # {"top1_error": 5.41, "top5_error": 0.2}

``predictions`` holds each example's class indices ranked best first (at least
as many as the largest k; e.g. ``logits.topk(5).indices``), ``references`` the
true class.
"""

import datasets
import evaluate
import numpy as np

_CITATION = ""
_DESCRIPTION = "Top-k classification error in percent: 100 * the fraction of examples whose label is not among their k best classes."
_KWARGS_DESCRIPTION = """
Args:
    predictions: per example, class indices ranked best first (at least max(ks) of them).
    references: per example, the true class index.
    ks: the k values to report (default (1, 5)).
Returns:
    {"top1_error": float, "top5_error": float, ...} in percent.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TopKError(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("int64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, ks=(1, 5)):
        ranked = np.asarray(predictions)
        labels = np.asarray(references)
        if ranked.ndim != 2 or ranked.shape[1] < max(ks):
            raise ValueError(f"predictions must rank at least {max(ks)} classes per example, got shape {ranked.shape}")
        return {
            f"top{k}_error": float(100.0 * (1.0 - (ranked[:, :k] == labels[:, None]).any(axis=1).mean())) for k in ks
        }
