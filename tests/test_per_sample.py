"""Per-sample losses: their mean is the model's own loss, family by family (E1)."""

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertForTokenClassification,
    ViTConfig,
    ViTForImageClassification,
)
from transformers.trainer_pt_utils import LabelSmoother

from koala_hf import per_sample_losses
from tests.helpers import tiny_gpt2

BERT = dict(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=16)


def token_labels(shape, classes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, shape, generator=generator)
    labels[..., ::3] = -100
    return labels


def hand_cross_entropy(logits, labels):
    """Cross-entropy term by term, in the same (row-major) order, skipping -100."""
    terms = []
    for row_logits, row_labels in zip(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)):
        if row_labels != -100:
            terms.append(-torch.log_softmax(row_logits.double(), -1)[row_labels])
    return torch.stack(terms)


def test_causal_lm_losses_are_per_shifted_token():
    model = tiny_gpt2()
    ids = torch.randint(0, 32, (3, 16))
    labels = token_labels((3, 16), 32)
    outputs = model(input_ids=ids, labels=labels)
    losses = per_sample_losses(outputs, labels, shift_labels=True)
    expected = hand_cross_entropy(outputs.logits[:, :-1], labels[:, 1:])
    torch.testing.assert_close(losses.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses.mean(), outputs.loss.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [BertForMaskedLM, BertForTokenClassification])
def test_masked_lm_and_token_classification_losses_are_per_token(cls):
    torch.manual_seed(0)
    model = cls(BertConfig(num_labels=5, **BERT))
    classes = 40 if cls is BertForMaskedLM else 5
    ids = torch.randint(0, 40, (3, 12))
    labels = token_labels((3, 12), classes)
    outputs = model(input_ids=ids, labels=labels)
    losses = per_sample_losses(outputs, labels)
    torch.testing.assert_close(losses.double(), hand_cross_entropy(outputs.logits, labels), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses.mean(), outputs.loss.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "num_labels, problem_type, make_labels",
    [
        (3, None, lambda: torch.tensor([0, 2, 1, 2])),
        (1, None, lambda: torch.tensor([0.5, -1.0, 2.0, 0.1])),
        (2, "regression", lambda: torch.randn(4, 2)),
        (3, "multi_label_classification", lambda: torch.tensor([[1.0, 0, 1], [0, 0, 1], [1, 1, 1], [0, 0, 0]])),
    ],
    ids=["single-label", "regression-1", "regression-2", "multi-label"],
)
def test_sequence_classification_and_regression_losses_are_per_example(num_labels, problem_type, make_labels):
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(num_labels=num_labels, problem_type=problem_type, **BERT))
    labels = make_labels()
    outputs = model(input_ids=torch.randint(0, 40, (4, 10)), labels=labels)
    losses = per_sample_losses(outputs, labels, problem_type=model.config.problem_type)
    assert losses.shape == (4,)
    torch.testing.assert_close(losses.mean(), outputs.loss.detach(), rtol=1e-5, atol=1e-6)


def test_image_classification_losses_are_per_example():
    torch.manual_seed(0)
    config = ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=32, num_labels=4)
    model = ViTForImageClassification(config)
    labels = torch.tensor([0, 3, 1])
    outputs = model(pixel_values=torch.randn(3, 3, 8, 8), labels=labels)
    losses = per_sample_losses(outputs, labels)
    expected = F.cross_entropy(outputs.logits.detach(), labels, reduction="none")
    torch.testing.assert_close(losses, expected)
    torch.testing.assert_close(losses.mean(), outputs.loss.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shift", [True, False])
def test_label_smoothing_matches_the_trainers_label_smoother(shift):
    model = tiny_gpt2()
    ids = torch.randint(0, 32, (3, 16))
    labels = token_labels((3, 16), 32)
    outputs = model(input_ids=ids)
    losses = per_sample_losses(outputs, labels, shift_labels=shift, label_smoothing=0.1)
    smoothed = LabelSmoother(epsilon=0.1)(outputs, labels, shift_labels=shift)
    torch.testing.assert_close(losses.mean(), smoothed.detach(), rtol=1e-5, atol=1e-6)


def test_without_logits_or_labels_there_is_nothing_to_derive():
    assert per_sample_losses({"loss": torch.tensor(1.0)}, torch.tensor([1])) is None
    assert per_sample_losses({"logits": torch.zeros(2, 3)}, None) is None
