"""Per-sample losses from model outputs and labels: the noise measurement's raw material (E1).

The loss a Hugging Face model returns is a mean over tokens or examples; KOALA
also needs the individual terms of that mean. :func:`per_sample_losses`
recomputes them from the logits and labels, the same way the models and the
Trainer's label smoother compute the mean, for these families:

* causal LM: per token, labels shifted by one, ``-100`` ignored;
* masked LM and token classification: per token, ``-100`` ignored;
* sequence and image classification: per example (cross-entropy, or binary
  cross-entropy averaged over the labels for multi-label problems);
* regression: per example, squared error averaged over the outputs;
* TRL's fused LM head (``FusedCausalLMOutput``: ``log_probs`` and ``label_mask`` instead of logits): per token,
  ``-log_probs`` where ``label_mask`` is set (the negative log-likelihood; TRL's other loss types are
  KoalaSFTTrainer's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _logits(outputs) -> torch.Tensor | None:
    if isinstance(outputs, dict):
        return outputs.get("logits")
    if isinstance(outputs, (tuple, list)) and len(outputs) > 1:
        return outputs[1]
    return None


def fused_negative_log_likelihood(outputs) -> torch.Tensor | None:
    """Per-token NLL of TRL's fused LM head outputs (``log_probs``, ``label_mask``: already shifted), or ``None``."""
    if not isinstance(outputs, dict) or outputs.get("log_probs") is None or outputs.get("label_mask") is None:
        return None
    log_probs = outputs["log_probs"].detach()
    return -log_probs.to(torch.promote_types(log_probs.dtype, torch.float32))[outputs["label_mask"]]


@torch.no_grad()
def per_sample_losses(
    outputs,
    labels: torch.Tensor | None,
    *,
    shift_labels: bool = False,
    problem_type: str | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor | None:
    """The losses whose mean is the model's loss, one per token or example (float32 or wider).

    Returns ``None`` when they cannot be derived (no logits or no labels).
    ``shift_labels``: causal LM (position ``i`` predicts label ``i + 1``).
    ``problem_type``: the config's ``problem_type``; float labels also mean
    regression. ``label_smoothing``: the Trainer's ``label_smoothing_factor``.
    """
    fused = fused_negative_log_likelihood(outputs)
    if fused is not None:
        return fused
    logits = _logits(outputs)
    if logits is None or labels is None:
        return None
    logits = logits.detach()
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    labels = labels.to(logits.device)
    if shift_labels:
        logits, labels = logits[..., :-1, :], labels[..., 1:]

    if problem_type == "regression" or labels.is_floating_point() and problem_type != "multi_label_classification":
        predictions = logits.reshape(labels.shape) if logits.numel() == labels.numel() else logits
        errors = (predictions - labels.to(logits.dtype)) ** 2
        return errors.reshape(errors.shape[0], -1).mean(dim=1)
    if problem_type == "multi_label_classification":
        losses = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")
        return losses.reshape(losses.shape[0], -1).mean(dim=1)

    # Cross-entropy per token (labels shaped like the logits without the class axis) or per example.
    # With smoothing eps, (1 - eps) nll + eps * mean over classes of -log p: the Trainer's LabelSmoother.
    labels = labels.reshape(-1)
    losses = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels, reduction="none",
        ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing,
    )
    return losses[labels != IGNORE_INDEX]
