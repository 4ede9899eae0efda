"""benchmarks/guidance_sweep.py: how a grid line goes on past its edge until its best lr is interior."""

import math
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SWEEP = runpy.run_path(str(ROOT / "benchmarks" / "guidance_sweep.py"), run_name="guidance_sweep")


def test_a_grid_line_extends_past_the_edge_its_best_lr_sits_on_and_stops_once_bracketed():
    next_lr = SWEEP["next_lr"]
    assert math.isclose(next_lr({0.1: 337.5, 0.3: 339.4, 1.0: 774.5, 3.0: 965.5}), 0.1 / 3)  # KOALA-V's LM line
    assert next_lr({1 / 30: 340.0, 0.1: 337.5, 0.3: 339.4}) is None  # bracketed
    assert next_lr({0.3: 400.0, 1.0: 380.0, 3.0: 360.0}) == 9.0
    assert next_lr({0.3: 400.0, 1.0: 380.0, 3.0: math.inf}) is None  # a diverged top run brackets the best
    assert next_lr({1e-3: 300.0}) is None  # a baseline's single tuned lr
    assert next_lr({0.01: 90.0, 0.03: 90.0, 0.1: math.inf}) is None  # an edge that ties an interior lr brackets
    assert math.isclose(next_lr({0.01: math.inf, 0.03: math.inf, 0.1: math.inf}), 0.01 / 3)  # all diverged: go down
    guessing = {0.01: 90.0, 0.03: 90.0, 0.1: math.inf}  # the digits' E1c line with linear decay: nothing learned
    assert math.isclose(next_lr(guessing, SWEEP["CHANCE"]["digits"]), 0.01 / 3) and next_lr(guessing) is None


def test_a_vision_run_with_a_nan_test_loss_scores_as_diverged_whatever_its_error():
    score = SWEEP["score"]
    assert score({"test_top1_error": 90.3, "test_loss": math.nan}, "digits") == math.inf
    assert score({"test_top1_error": 90.0, "test_loss": 1.4e5}, "digits") == 90.0  # finite: it learned nothing, but ran
    assert score({"test_top1_error": 2.8, "test_loss": 0.1}, "digits") == 2.8
    assert score({"best_validation_perplexity": math.inf}, "lm") == math.inf


def test_every_schedule_is_constant_linear_or_cosine_with_warm_up():
    assert SWEEP["SCHEDULES"]["cosine"] == ("--lr_scheduler_type", "cosine", "--warmup_steps", "0.05")
    assert set(SWEEP["SCHEDULES"]) == {"constant", "linear", "cosine"}


def test_a_seeded_settings_seed_42_run_is_its_grid_run_when_as_long_and_trained_again_when_longer(tmp_path):
    from types import SimpleNamespace

    args = SimpleNamespace(epochs=None, max_train_blocks=None)
    sweep = SWEEP["Sweep"]("digits", tmp_path, args)
    model = "mobilenetv3_large_100_cifar"
    grid_run = tmp_path / model / "linear" / "koala-v_lr1" / "results.json"
    grid_run.parent.mkdir(parents=True)
    grid_run.write_text("{}")
    epochs = SWEEP["EPOCHS"][model]
    assert sweep.reused("seeds", model, "linear", "koala-v", None, 1.0, {}, 42, epochs) == grid_run
    assert sweep.reused("seeds", model, "linear", "koala-v", None, 1.0, {}, 43, epochs) is None  # another seed
    assert sweep.reused("seeds", model, "linear", "koala-v", None, 1.0, {}, 42, epochs + 10) is None  # longer
    assert sweep.reused("seeds", model, "cosine", "koala-v", None, 1.0, {}, 42, epochs) is None  # not run
    assert sweep.reused("grid", model, "linear", "koala-v", None, 1.0, {}, 42, epochs) is None  # only repeats reuse
    lm = SWEEP["Sweep"]("lm", tmp_path, args)  # the LM's repeats are 12 epochs against the grid's 4: trained
    (tmp_path / "gpt" / "linear" / "koala-v_lr0.3").mkdir(parents=True)
    (tmp_path / "gpt" / "linear" / "koala-v_lr0.3" / "results.json").write_text("{}")
    assert lm.reused("seeds", "gpt", "linear", "koala-v", None, 0.3, {}, 42, SWEEP["LONG_EPOCHS"]["gpt"]) is None
