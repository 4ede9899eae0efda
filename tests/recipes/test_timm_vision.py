"""The timm vision recipe: real archive formats, the papers' architectures at 32x32, smoke training, learning
the real digits, DDP."""

import numpy as np
import pytest
import torch

from recipes import compare
from recipes import timm_vision
from koala_hf import KOALAPlusPlus
from koala_hf.vision import ARCHITECTURES, CIFAR_MEAN, CIFAR_STD, ImageClassifier, create_model
from tests.recipes.archives import learnable_images, write_cifar10, write_cifar100, write_imagenet32
from tests.helpers import run_two_processes


def test_cifar10_archives_read_as_written(tmp_path):
    write_cifar10(tmp_path, per_batch=12, test=7)
    splits = timm_vision.read_cifar(tmp_path, "cifar10")
    images, labels = splits["train"]
    assert images.shape == (60, 3, 32, 32) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    data, written = learnable_images(12, 10, seed=1)
    assert torch.equal(images[0], torch.from_numpy(data[0].reshape(3, 32, 32)))
    assert labels[:12].tolist() == written.tolist()
    assert splits["test"][0].shape == (7, 3, 32, 32)


def test_cifar100_archives_use_the_fine_labels(tmp_path):
    write_cifar100(tmp_path, train=30, test=10)
    images, labels = timm_vision.read_cifar(tmp_path, "cifar100")["train"]
    assert images.shape == (30, 3, 32, 32)
    assert labels.tolist() == learnable_images(30, 100, seed=1)[1].tolist() and labels.max() < 100


def test_imagenet32_batches_read_with_zero_based_labels(tmp_path):
    write_imagenet32(tmp_path, per_batch=5, val=6)
    splits = timm_vision.read_imagenet32(tmp_path)
    images, labels = splits["train"]
    assert images.shape == (50, 3, 32, 32)
    expected = np.concatenate([learnable_images(5, 1000, seed=i)[1] for i in range(1, 11)])
    assert labels.tolist() == expected.tolist() and labels.min() >= 0 and labels.max() <= 999
    assert splits["test"][1].tolist() == learnable_images(6, 1000, seed=0)[1].tolist()


def test_missing_archives_are_named(tmp_path):
    with pytest.raises(SystemExit, match="data_batch_1"):
        timm_vision.read_cifar(tmp_path, "cifar10")
    with pytest.raises(SystemExit, match="train_data_batch_1..10"):
        timm_vision.read_imagenet32(tmp_path)


def test_evaluation_images_are_normalised_with_the_papers_statistics():
    image = torch.full((3, 32, 32), 200, dtype=torch.uint8)
    out = timm_vision.transforms(False, (CIFAR_MEAN, CIFAR_STD), cutout=False)(image)
    expected = (200 / 255 - torch.tensor(CIFAR_MEAN)) / torch.tensor(CIFAR_STD)
    torch.testing.assert_close(out[:, 0, 0], expected)
    train = timm_vision.transforms(True, (CIFAR_MEAN, CIFAR_STD), cutout=True)(image)
    assert train.shape == (3, 32, 32) and (train == 0).sum() >= 3 * 8 * 8  # padding and the cutout square


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_every_architecture_builds_for_32x32_and_takes_the_first_koala_step_of_the_spec(name):
    """E10-E16's first step has a closed form per layer: theta_1 = theta_0 - lr L ((1-lam) c + q) / S H with
    c = sigma + q, lam = c H.H / (c H.H + R), S = ((1-lam) c + q) H.H + R and R = 0.9 + 0.1 L^2 (E2, no
    per-sample losses). Every layer of every architecture takes it (a layer without gradient signal: none)."""
    torch.manual_seed(0)
    model = ImageClassifier(create_model(name, num_classes=10))
    lr, sigma, q = 1.0, 0.1, 0.1
    optimizer = KOALAPlusPlus(model.parameters(), lr=lr, sigma=sigma, q=q)
    before = [p.detach().double().clone() for p in model.parameters()]
    outputs = model(torch.randn(2, 3, 32, 32), labels=torch.tensor([1, 7]))
    assert outputs["logits"].shape == (2, 10)
    outputs["loss"].backward()
    optimizer.observe(outputs["loss"])
    optimizer.step()
    L = outputs["loss"].detach().double()
    R, c = 0.9 + 0.1 * L**2, sigma + q
    moved = 0
    for theta0, p in zip(before, model.parameters()):
        H = p.grad.double()
        hh = H.reshape(-1).dot(H.reshape(-1))
        if hh < 1e-18:  # timm zero-initialises each residual block's last norm: no gradient signal yet
            assert torch.equal(p.detach().double(), theta0)
            continue
        lam = c * hh / (c * hh + R)
        S = ((1 - lam) * c + q) * hh + R
        expected = theta0 - lr * L * ((1 - lam) * c + q) / S * H
        torch.testing.assert_close(p.detach().double(), expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())
        moved += 1
    assert moved >= 10  # the check is not vacuous (many residual branches have no signal yet)
    assert model.model.pretrained_cfg["input_size"] == (3, 32, 32)


@pytest.mark.parametrize("optimizer", ["koala++", "sgd"])
def test_smoke_preset_writes_its_results(optimizer, vision_smoke_run, cifar_dir, tmp_path):
    """The smoke preset on tiny synthetic archives: a run that writes its record and figure (that the recipe
    learns is test_the_papers_settings_learn_the_real_digits)."""
    if optimizer == "koala++":
        results, tmp_path = vision_smoke_run
    else:
        results = timm_vision.main([
            "--preset", "smoke", "--data_dir", str(cifar_dir), "--optimizer", optimizer, "--output_dir", str(tmp_path),
            "--logging_steps", "2", "--disable_tqdm", "true", "--measure_batches", "3",
        ])
    losses = [loss for _, loss in results["train_loss_curve"]]
    assert losses[-1] < losses[0], losses
    assert len(results["epochs"]) == 2 and 0 <= results["test_top1_error"] <= 100
    assert results["test_top5_error"] <= results["test_top1_error"]
    assert results["data_images_per_second"] > 0 and results["images_per_second"] > 0
    assert (tmp_path / "results.json").exists() and (tmp_path / "curves.png").exists()
    assert "--optimizer " + optimizer in compare.load(str(tmp_path))["command"]


# The digits benchmark's own curves (benchmarks/results/digits_cpu/mobilenetv3_large_100_cifar, the papers'
# CIFAR-10 settings, constant lr) after DIGITS_EPOCHS epochs: SGD 13.9% test error, KOALA++ at lr 3 (the best
# of the lrs the benchmark tried; at the papers' lr 1 it was still at 86% after 16 epochs) 36.9%. The thresholds
# leave about 25 points for another machine's rounding; chance is 90%.
DIGITS_EPOCHS = 16
DIGITS_RUNS = {"sgd": (None, 40.0), "koala++": ("3", 60.0)}  # optimizer: (lr, test error threshold in %)


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    from koala_hf.recipe_support.archives import write_digits

    return write_digits(tmp_path_factory.mktemp("digits"))


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", list(DIGITS_RUNS))
def test_the_papers_settings_learn_the_real_digits(optimizer, digits_dir, tmp_path):
    """scikit-learn's real digits as a CIFAR-10 archive, MobileNetV3-Large at 32x32 through the recipe with the
    papers' CIFAR-10 preset: test error well under chance, at what the benchmark's curve says."""
    lr, threshold = DIGITS_RUNS[optimizer]
    results = timm_vision.main([
        "--preset", "koala_cifar10", "--model", "mobilenetv3_large_100_cifar", "--data_dir", str(digits_dir),
        "--optimizer", optimizer, "--num_train_epochs", str(DIGITS_EPOCHS), "--save_strategy", "no",
        "--disable_tqdm", "true", "--report_to", "none", "--output_dir", str(tmp_path),
        *(["--learning_rate", lr] if lr else []),
    ])
    assert results["train_samples"] == 1437 and results["test_samples"] == 360
    assert len([e for e in results["epochs"] if "validation_top1_error" in e]) == DIGITS_EPOCHS
    assert results["test_top1_error"] < threshold, results["test_top1_error"]


@pytest.mark.slow
def test_two_process_smoke_ends_identical_on_both_ranks(cifar_dir, tmp_path):
    run_two_processes("ddp_vision.py", str(cifar_dir), str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["world_size"] == 2
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])
