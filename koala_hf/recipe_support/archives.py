"""Image datasets written in CIFAR-10's on-disk format, which ``recipes/timm_vision.py --data_dir`` reads.

The format (the original ``cifar-10-python.tar.gz``, unpacked): a ``cifar-10-batches-py`` folder with
``data_batch_1`` ... ``data_batch_5`` and ``test_batch``, each a pickled dict with ``b"data"`` (``uint8``,
``N x 3072``: the red, green and blue 32 x 32 planes, row-major) and ``b"labels"`` (``N`` ints in 0..9).

:func:`write_digits` writes scikit-learn's handwritten digits (1,797 real 8 x 8 grey images of 10 classes,
shipped inside the scikit-learn wheel, so no download) upsampled to 32 x 32 RGB, with a fixed stratified split
of 1,437 training and 360 test images::

    python -m koala_hf.recipe_support.archives digits data/digits    # then --data_dir data/digits
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import numpy as np

FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = 5
DIGITS_TEST_IMAGES = 360
DIGITS_SPLIT_SEED = 0


def write_cifar10(folder: str | Path, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]) -> Path:
    """Write ``(images, labels)`` pairs (``uint8 N x 3072`` rows, int labels 0..9) as CIFAR-10 archives in
    ``folder/cifar-10-batches-py``; the training images are spread over the five training batches in order."""
    root = Path(folder) / FOLDER
    root.mkdir(parents=True, exist_ok=True)
    for images, labels in (train, test):
        if images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3072:
            raise ValueError(f"images must be uint8 N x 3072 rows, got {images.dtype} {images.shape}")
        if len(images) != len(labels) or (len(labels) and not 0 <= int(np.min(labels)) <= int(np.max(labels)) <= 9):
            raise ValueError("labels must be one int in 0..9 per image")
    images, labels = train
    for index, part in enumerate(np.array_split(np.arange(len(labels)), TRAIN_BATCHES), start=1):
        _dump(root / f"data_batch_{index}", f"training batch {index} of {TRAIN_BATCHES}", images[part], labels[part])
    _dump(root / "test_batch", "testing batch 1 of 1", *test)
    return Path(folder)


def _dump(path: Path, name: str, images: np.ndarray, labels: np.ndarray) -> None:
    batch = {b"batch_label": name.encode(), b"labels": [int(label) for label in labels], b"data": images,
             b"filenames": [f"{path.name}_{i}.png".encode() for i in range(len(labels))]}
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)


def digits_as_cifar_rows() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's digits as CIFAR rows: each 8 x 8 image (values 0..16) bilinearly upsampled to 32 x 32,
    scaled to 0..255 and repeated over the three colour planes; a stratified split of 360 test images."""
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().unsqueeze(1)  # N x 1 x 8 x 8
    upsampled = torch.nn.functional.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    grey = (upsampled * (255.0 / 16.0)).round().clamp(0, 255).to(torch.uint8).reshape(len(images), 1024)
    rows = grey.repeat(1, 3).numpy()  # the same plane for red, green and blue
    train_x, test_x, train_y, test_y = train_test_split(
        rows, digits.target, test_size=DIGITS_TEST_IMAGES, random_state=DIGITS_SPLIT_SEED, stratify=digits.target)
    return (train_x, train_y), (test_x, test_y)


def write_digits(folder: str | Path) -> Path:
    """scikit-learn's digits as a CIFAR-10 archive folder (:func:`digits_as_cifar_rows`); returns ``folder``."""
    try:
        train, test = digits_as_cifar_rows()
    except ImportError as error:
        raise SystemExit(f"writing the digits needs scikit-learn ({error}): pip install scikit-learn") from None
    return write_cifar10(folder, train, test)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=["digits"])
    parser.add_argument("folder", help="where to write cifar-10-batches-py/")
    args = parser.parse_args(argv)
    print(write_digits(args.folder) / FOLDER)


if __name__ == "__main__":
    main()
