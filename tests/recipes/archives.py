"""Tiny datasets in the real on-disk formats: CIFAR python pickles and ImageNet32 batches."""

import pickle
from pathlib import Path

import numpy as np


def learnable_images(n: int, classes: int, seed: int = 0):
    """uint8 N x 3072 rows (channel planes, as CIFAR stores them) whose colour tells the class."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    palette = rng.integers(30, 225, (classes, 3))
    images = palette[labels][:, :, None] + rng.normal(0, 12, (n, 3, 1024))
    return np.clip(images, 0, 255).astype(np.uint8).reshape(n, 3072), labels


def _dump(path: Path, batch: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)


def write_cifar10(folder: Path, per_batch: int = 64, test: int = 64) -> Path:
    root = folder / "cifar-10-batches-py"
    root.mkdir(parents=True)
    for i in range(1, 6):
        data, labels = learnable_images(per_batch, 10, seed=i)
        _dump(root / f"data_batch_{i}", {b"batch_label": f"training batch {i} of 5".encode(), b"labels": labels.tolist(),
                                         b"data": data, b"filenames": [b"x.png"] * per_batch})
    data, labels = learnable_images(test, 10, seed=99)
    _dump(root / "test_batch", {b"batch_label": b"testing batch 1 of 1", b"labels": labels.tolist(), b"data": data,
                                b"filenames": [b"x.png"] * test})
    return folder


def write_cifar100(folder: Path, train: int = 40, test: int = 20) -> Path:
    root = folder / "cifar-100-python"
    root.mkdir(parents=True)
    for name, n, seed in (("train", train, 1), ("test", test, 2)):
        data, labels = learnable_images(n, 100, seed=seed)
        _dump(root / name, {b"filenames": [b"x.png"] * n, b"batch_label": name.encode(), b"fine_labels": labels.tolist(),
                            b"coarse_labels": (labels // 5).tolist(), b"data": data})
    return folder


def write_imagenet32(folder: Path, per_batch: int = 8, val: int = 16) -> Path:
    """train_data_batch_1..10 and val_data: 'data' N x 3072 uint8, 'labels' 1..1000."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(1, 11):
        data, labels = learnable_images(per_batch, 1000, seed=i)
        _dump(folder / f"train_data_batch_{i}", {"data": data, "labels": (labels + 1).tolist(), "mean": data.mean(0)})
    data, labels = learnable_images(val, 1000, seed=0)
    _dump(folder / "val_data", {"data": data, "labels": (labels + 1).tolist()})
    return folder
