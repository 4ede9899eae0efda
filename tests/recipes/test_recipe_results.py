"""What the recipes write is true: losses recomputed independently, resumed and --max_steps runs, launch records."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from recipes import timm_vision
from recipes import wikitext2_gpt
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

TIMINGS = ("seconds", "tokens_per_second", "images_per_second", "training_seconds", "seconds_per_epoch",
           "data_images_per_second", "data_pipeline_headroom", "command", "date")


def lm_smoke(wikitext_dir, output_dir, *extra):
    return wikitext2_gpt.main([
        "--preset", "smoke", "--data_dir", str(wikitext_dir), "--train_split", "validation", "--halve_test_split",
        "--output_dir", str(output_dir), "--disable_tqdm", "true", "--report_to", "none", "--learning_rate", "1.0", *extra,
    ])


def second_half_test_blocks(wikitext_dir, tokenizer, block_size: int, limit: int) -> torch.Tensor:
    """The test blocks rebuilt from the text with the saved tokenizer, without the recipe's code."""
    lines = (wikitext_dir / "test.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    eos = tokenizer.convert_tokens_to_ids("<eos>")
    ids = []
    for line in lines[len(lines) // 2:]:
        if line.strip():
            ids += tokenizer.convert_tokens_to_ids(line.split()) + [eos]
    count = min(len(ids) // block_size, limit)
    return torch.tensor(ids[: count * block_size]).view(count, block_size)


def test_reported_test_loss_is_the_mean_next_token_nll_over_the_predicted_tokens(lm_smoke_run, wikitext_dir):
    results, output = lm_smoke_run
    model = AutoModelForCausalLM.from_pretrained(output).eval()
    tokenizer = AutoTokenizer.from_pretrained(output)
    blocks = second_half_test_blocks(wikitext_dir, tokenizer, results["model"]["block_size"], results["data"]["test_blocks"])
    assert len(blocks) == results["data"]["test_blocks"]
    with torch.no_grad():
        logits = model(blocks).logits
    # Position i predicts token i + 1: block_size - 1 predictions per block, averaged over all of them.
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1))
    assert results["test_loss"] == pytest.approx(nll.item(), rel=1e-4)
    assert results["test_perplexity"] == pytest.approx(math.exp(nll.item()), rel=1e-4)


def test_training_back_propagates_the_same_mean(lm_smoke_run):
    """The loss the Trainer trains on (with its token-count normalisation) equals the plain shifted mean."""
    from koala_hf import KoalaTrainer, KoalaTrainingArguments

    _, output = lm_smoke_run
    model = AutoModelForCausalLM.from_pretrained(output)
    model.loss_type = None  # as GPT2LMHeadModel(config) builds it
    ids = torch.randint(0, model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    args = KoalaTrainingArguments(output_dir=str(output / "unused"), report_to="none", use_cpu=True)
    trainer = KoalaTrainer(model=model, args=args)
    items = trainer._get_num_items_in_batch([batch], torch.device("cpu"))
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=items)
    with torch.no_grad():
        logits = model(ids).logits
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert int(items) == 3 * 15
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def without_timings(results: dict) -> dict:
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in TIMINGS}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(results)


def test_a_resumed_run_writes_the_uninterrupted_runs_results(lm_smoke_run, wikitext_dir, tmp_path):
    full, full_dir = lm_smoke_run
    checkpoint = full_dir / "checkpoint-20"  # the end of epoch 1 of 2
    assert checkpoint.is_dir()
    resumed = lm_smoke(wikitext_dir, tmp_path / "resumed", "--optimizer", "koala++", "--resume_from_checkpoint", str(checkpoint))
    assert [e["epoch"] for e in resumed["epochs"]] == [0, 1, 2]
    assert resumed["best_epoch"] == full["best_epoch"] == 2
    assert without_timings(resumed) == without_timings(full)
    written = json.loads((tmp_path / "resumed" / "results.json").read_text())
    assert written["num_epochs"] == 2 and written["steps"] == 40


def test_max_steps_reports_what_was_trained_in_the_lm_recipe(wikitext_dir, tmp_path):
    # 20 steps make an epoch of the smoke preset: 30 steps are 1.5 epochs.
    results = lm_smoke(wikitext_dir, tmp_path / "lm", "--max_steps", "30", "--save_strategy", "no")
    assert results["steps"] == 30 and results["num_epochs"] == 1.5 and results["max_steps"] == 30
    assert [e["epoch"] for e in results["epochs"]] == [0, 1, 1.5]
    tokens = 30 * 16 * 64
    assert results["tokens_per_second"] * results["training_seconds"] == pytest.approx(tokens, rel=1e-6)
    partial = results["epochs"][-1]
    assert partial["tokens_per_second"] * partial["seconds"] == pytest.approx(10 * 16 * 64, rel=1e-6)
    # --save_strategy no: the final model is the one saved and tested.
    assert results["evaluated_model"] == "final"
    assert results["test_loss"] > 0 and (tmp_path / "lm" / "model.safetensors").exists()


def test_max_steps_reports_what_was_trained_in_the_vision_recipe(cifar_dir, tmp_path):
    # The smoke preset has 128 images at batch 32: 4 steps an epoch, so 6 steps are 1.5 epochs.
    results = timm_vision.main([
        "--preset", "smoke", "--data_dir", str(cifar_dir), "--optimizer", "sgd", "--output_dir", str(tmp_path),
        "--disable_tqdm", "true", "--max_steps", "6", "--save_strategy", "no", "--measure_batches", "2",
    ])
    assert results["steps"] == 6 and results["num_epochs"] == 1.5
    assert [e["epoch"] for e in results["epochs"]] == [1, 1.5]
    assert results["images_per_second"] * results["training_seconds"] == pytest.approx(6 * 32, rel=1e-6)


def test_accelerate_launch_on_cpu_uses_every_core_records_the_launch_and_prints_no_warnings(wikitext_dir, tmp_path):
    output = tmp_path / "launched"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(ROOT / "recipes/accelerate_configs/single_gpu.yaml"), str(ROOT / "recipes/wikitext2_gpt.py"),
        "--preset", "smoke", "--max_steps", "6", "--learning_rate", "1.0", "--data_dir", str(wikitext_dir),
        "--train_split", "validation", "--halve_test_split", "--output_dir", str(output), "--disable_tqdm", "true",
        "--report_to", "none",
    ]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((output / "results.json").read_text())
    assert results["launcher"] == "accelerate launch" and results["mixed_precision"] == "bf16"
    assert results["cpu_threads"] == os.cpu_count() and results["processes"] == 1
    log = done.stdout + done.stderr
    for warning in ("pin_memory", "loss_type=None", "attention_mask", "missing keys"):
        assert warning not in log, warning
