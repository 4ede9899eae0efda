"""koala_hf.recipe_support.archives: CIFAR-10's on-disk format, and scikit-learn's real digits written in it."""

import numpy as np
import pytest
import torch

from koala_hf.recipe_support.archives import write_cifar10, write_digits
from recipes import timm_vision


def test_what_is_written_reads_back_through_the_recipe(tmp_path):
    rows = np.arange(7 * 3072, dtype=np.int64).reshape(7, 3072).astype(np.uint8)
    labels = np.array([0, 1, 2, 3, 4, 5, 9])
    write_cifar10(tmp_path, (rows, labels), (rows[:2], labels[:2]))
    splits = timm_vision.read_cifar(tmp_path, "cifar10")
    images, read_labels = splits["train"]
    assert images.shape == (7, 3, 32, 32) and read_labels.tolist() == labels.tolist()
    assert torch.equal(images[3], torch.from_numpy(rows[3].reshape(3, 32, 32)))  # red, green, blue planes
    assert splits["test"][0].shape == (2, 3, 32, 32)


def test_bad_rows_or_labels_are_refused(tmp_path):
    with pytest.raises(ValueError, match="uint8 N x 3072"):
        write_cifar10(tmp_path, (np.zeros((2, 100), np.uint8), np.zeros(2)), (np.zeros((1, 3072), np.uint8), np.zeros(1)))
    with pytest.raises(ValueError, match="one int in 0..9"):
        write_cifar10(tmp_path, (np.zeros((2, 3072), np.uint8), np.array([0, 10])), (np.zeros((1, 3072), np.uint8), np.zeros(1)))


def test_the_digits_are_the_real_images_upsampled_with_a_fixed_stratified_split(tmp_path):
    from sklearn.datasets import load_digits

    write_digits(tmp_path)
    splits = timm_vision.read_cifar(tmp_path, "cifar10")
    (train, train_labels), (test, test_labels) = splits["train"], splits["test"]
    assert len(train) == 1437 and len(test) == 360
    assert torch.bincount(test_labels, minlength=10).min() >= 35  # stratified: every digit in the test split
    assert torch.equal(train[:, 0], train[:, 2])  # grey: the same plane three times
    digits = load_digits()
    # Each image, shrunk back to 8 x 8 (0..16), is nearest to a real digit of its own label: images and labels agree.
    both = torch.cat([train, test])[:, :1].float()
    shrunk = torch.nn.functional.avg_pool2d(both, 4).reshape(len(both), 64) * 16 / 255
    nearest = torch.cdist(shrunk, torch.from_numpy(digits.data).float()).argmin(1)
    assert torch.equal(torch.from_numpy(digits.target)[nearest], torch.cat([train_labels, test_labels]))
    assert write_digits(tmp_path / "again") and torch.equal(timm_vision.read_cifar(tmp_path / "again", "cifar10")["test"][0], test)
