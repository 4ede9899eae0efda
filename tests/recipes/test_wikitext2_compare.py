"""The README's main job (recipes/wikitext2_compare.py) and the checkpoint it and the frozen-embedding commands
start from (benchmarks/results/wikitext2_paper_protocol_cpu/pretrain, kept in the repository)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from recipes import wikitext2_compare, wikitext2_gpt
from tests.conftest import ROOT

PRETRAIN = ROOT / "benchmarks" / "results" / "wikitext2_paper_protocol_cpu" / "pretrain"


def test_the_main_job_reads_the_hub_where_it_can_and_the_copy_in_the_repository_otherwise(monkeypatch, capsys):
    monkeypatch.setattr(wikitext2_compare, "hub_unreachable", lambda: "huggingface.co cannot be reached (test)")
    assert wikitext2_compare.data_source([]) == ["--data_dir", "recipes/data/wikitext-2"]
    assert "copy kept in recipes/data/wikitext-2" in capsys.readouterr().out
    assert (ROOT / "recipes/data/wikitext-2/valid.txt").exists() and (ROOT / "recipes/data/wikitext-2/test.txt").exists()
    assert wikitext2_compare.data_source(["--data_dir", "elsewhere"]) == []  # the user's folder wins
    monkeypatch.setattr(wikitext2_compare, "hub_unreachable", lambda: None)
    assert wikitext2_compare.data_source([]) == []  # the recipe's default: the Hub's WikiText-2


@pytest.mark.slow
def test_the_main_job_trains_every_optimizer_the_same_way_and_compares_them(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the protocol's paths are the repository's
    monkeypatch.setattr(wikitext2_compare, "hub_unreachable", lambda: "offline (test)")  # CI has no Hub
    text = wikitext2_compare.main(["--output_dir", str(tmp_path), "--max_train_blocks", "32", "--max_eval_blocks", "8",
                                   "--num_train_epochs", "1", "--runs", *wikitext2_compare.RUNS])
    runs = [json.loads((tmp_path / name / "results.json").read_text()) for name in wikitext2_compare.RUNS]
    assert [r["optimizer"] for r in runs] == ["koala++", "adamw", "adamw"]
    assert [r["learning_rate"] for r in runs] == [1e-3, 1e-3, 1e-5]
    for run in runs:  # the same protocol, data, seed and length
        assert (run["data"], run["seed"], run["num_epochs"], run["preset"]) == (runs[0]["data"], 42, 1, "paper_cpu")
        assert run["model"]["frozen_embeddings"] and run["model"]["embeddings_from"].endswith("pretrain")
        assert run["command"].count("--num_train_epochs") == 1 and run["lr_scheduler"] == "constant"
    assert text.startswith("WikiText-2, CPU") and "`python recipes/wikitext2_compare.py --output_dir" in text.splitlines()[0]
    for label in wikitext2_compare.LABELS.values():
        assert f"| {label} |" in text
    assert (tmp_path / "compare.png").stat().st_size > 10_000 and (tmp_path / "compare.md").read_text().startswith(text)


@pytest.mark.slow
def test_the_kept_checkpoint_is_the_pretrain_runs_model(wikitext_dir):
    """Its weights give back the test loss its run recorded, computed here from the text and the logits."""
    results = json.loads((PRETRAIN / "results.json").read_text())
    model, tokenizer = AutoModelForCausalLM.from_pretrained(PRETRAIN).eval(), AutoTokenizer.from_pretrained(PRETRAIN)
    splits = wikitext2_gpt.read_splits(wikitext2_gpt.DataArguments(data_dir=str(wikitext_dir), train_split="validation",
                                                                   halve_test_split=True))
    test = wikitext2_gpt.paper_chunks(splits["test"], tokenizer, results["model"]["block_size"], 600)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(test), 64):
            batch = test[start:start + 64]
            logits = model(input_ids=torch.tensor(batch["input_ids"]), attention_mask=torch.tensor(batch["attention_mask"])).logits
            targets = torch.tensor(batch["shift_labels"])
            losses = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), targets.reshape(-1),
                                                       reduction="sum", ignore_index=-100)
            total, count = total + losses.item(), count + (targets != -100).sum().item()
    assert total / count == pytest.approx(results["test_loss"], rel=1e-4)
