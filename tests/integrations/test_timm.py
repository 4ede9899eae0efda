"""timm's train.py with koala_hf.integrations.timm (the launcher, or the one added line): each step measures
its micro-batches' losses as timm's task computed them, per sample for timm's cross-entropy criteria, checked
against an independent computation from the logits (a stand-in loop with timm's real task, criteria and
optimizer factory, and gradient accumulation)."""

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("timm")

from tests.helpers import ROOT  # noqa: E402

SCRIPT = ROOT / "tests" / "scripts" / "timm_style_train.py"


LAUNCHER = ("-m", "koala_hf.integrations.timm")


def run(tmp_path, *launcher, opt="koalapp", extra=()):
    out = tmp_path / f"{opt}.json"
    done = subprocess.run([sys.executable, *launcher, str(SCRIPT), "--opt", opt, "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    return done, (json.loads(out.read_text()) if out.exists() else None)


def assert_each_step_measures_its_micro_batches(seen):
    losses = seen["micro_batch_losses"]
    expected = [(a + b) / 2 for a, b in zip(losses[::2], losses[1::2])]  # two micro-batches per step
    assert seen["measured"] == pytest.approx(expected, rel=1e-6) and len(expected) == 3
    assert seen["handed_in_training"] == len(seen["handed"]) == 6  # nothing from the validation forwards


@pytest.mark.slow
@pytest.mark.parametrize("opt", ["koalapp", "koalam"])
def test_the_launcher_feeds_each_micro_batchs_per_sample_losses(opt, tmp_path):
    done, seen = run(tmp_path, *LAUNCHER, opt=opt)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_each_step_measures_its_micro_batches(seen)
    for handed, independent in zip(seen["handed"], seen["per_sample"], strict=True):
        assert handed == pytest.approx(independent, rel=1e-4)
    assert seen["optimizer"] == {"koalapp": "KOALAPlusPlus", "koalam": "KOALAM"}[opt]
    assert "falls back to loss**2" not in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("criterion", ["smoothing", "torch_smoothing", "soft"])
def test_the_one_added_line_feeds_the_per_sample_losses_of_timms_criteria(criterion, tmp_path):
    """timm's LabelSmoothingCrossEntropy, torch's CrossEntropyLoss(label_smoothing=...) and
    SoftTargetCrossEntropy (Mixup-style targets), through ``feed_losses(task, optimizer)`` in the script."""
    done, seen = run(tmp_path, extra=("--feed", "line", "--criterion", criterion))
    assert done.returncode == 0, done.stderr[-3000:]
    assert_each_step_measures_its_micro_batches(seen)
    for handed, independent in zip(seen["handed"], seen["per_sample"], strict=True):
        assert handed == pytest.approx(independent, rel=1e-4)


@pytest.mark.slow
def test_another_criterion_is_measured_by_its_mean_and_says_why_once(tmp_path):
    done, seen = run(tmp_path, *LAUNCHER, extra=("--criterion", "bce"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert_each_step_measures_its_micro_batches(seen)
    assert seen["handed"] == [None] * 6
    assert done.stderr.count("falls back to loss**2") == 1 and "BinaryCrossEntropy" in done.stderr


def test_feed_losses_says_what_it_takes():
    import timm
    from timm.task import ClassificationTask

    from koala_hf.integrations.timm import feed_losses

    model = timm.create_model("resnet10t", num_classes=3)
    with pytest.raises(TypeError, match="timm.task.TrainingTask"):
        feed_losses(model, None)
    with pytest.raises(TypeError, match="opt='koalapp'"):
        feed_losses(ClassificationTask(model, verbose=False), torch.optim.SGD(model.parameters(), lr=0.1))


@pytest.mark.slow
def test_without_the_launcher_the_first_step_says_what_to_do(tmp_path):
    done, _ = run(tmp_path, "-c", "import koala_hf, runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    assert done.returncode != 0 and "needs the loss" in done.stderr
    assert "koala_hf.integrations.timm.feed_losses(task, optimizer)" in done.stderr  # the fix, in this context
    assert "python -m koala_hf.integrations.timm train.py" in done.stderr


def test_a_step_without_the_loss_names_the_fixes_for_timms_train_py_where_timm_is_loaded():
    import timm  # noqa: F401

    from koala_hf import KOALAPlusPlus

    weight = torch.nn.Parameter(torch.ones(3))
    weight.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match=r"needs the loss.*feed_losses\(task, optimizer\).*-m koala_hf.integrations.timm"):
        KOALAPlusPlus([weight]).step()


def test_the_registry_docstring_holds_after_import_koala_hf_and_timm_optim():
    import koala_hf  # noqa: F401
    from timm.optim import create_optimizer_v2

    optimizer = create_optimizer_v2(torch.nn.Linear(2, 2), opt="koalapp", lr=0.5)
    assert type(optimizer).__name__ == "KOALAPlusPlus"


def test_the_launcher_says_how_to_call_it():
    from koala_hf.integrations.timm import main

    with pytest.raises(SystemExit, match="python -m koala_hf.integrations.timm path/to/train.py"):
        main([])


def test_a_later_micro_batch_without_per_sample_losses_is_said_once_and_the_feed_falls_back():
    """Targets that CrossEntropyLoss ignores appear only in the second micro-batch: the feed says so once and
    measures the mean from then on, instead of silently mixing per-sample and mean micro-batches."""
    from timm.task import ClassificationTask

    from koala_hf import KOALAPlusPlus
    from koala_hf.integrations.timm import TimmLossFeed

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = KOALAPlusPlus(model.parameters())
    handed = []
    optimizer.observe = lambda loss, per_sample=None: handed.append(per_sample)
    task = ClassificationTask(model, verbose=False)
    task.register_forward_hook(TimmLossFeed(optimizer))
    x = torch.randn(4, 4)
    with pytest.warns(UserWarning, match="ignores some targets") as said:
        for targets in ([0, 1, 2, 1], [0, -100, 2, 1], [0, 1, 2, 1]):
            task(x, torch.tensor(targets))
    assert len([w for w in said if "falls back" in str(w.message)]) == 1
    expected = torch.nn.functional.cross_entropy(model(x).detach(), torch.tensor([0, 1, 2, 1]), reduction="none")
    torch.testing.assert_close(handed[0], expected, rtol=1e-4, atol=0)
    assert handed[1:] == [None, None]
