"""Sharing runs: the push folder loads with the libraries users use, the card parses, pushing stops at the network."""

import json

import pytest
import timm
import torch
from huggingface_hub import HfApi, ModelCard
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import koala_hf.vision  # noqa: F401  (registers the 32x32 architectures)
from koala_hf import hub
from tests.conftest import ROOT


def card_metrics(card: ModelCard) -> dict:
    return {(r.metric_type, r.metric_name): r.metric_value for r in card.data.eval_results}


def test_the_language_model_folder_loads_and_its_card_says_how_it_was_trained(lm_smoke_run, tmp_path):
    results, run_dir = lm_smoke_run
    folder = hub.prepare(run_dir, tmp_path / "hub", repo_id="someone/gpt-koala")
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    out = model.generate(**tokenizer("The lobster", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert out.shape[1] > 2
    written = json.loads((folder / "results.json").read_text())
    assert written["test_perplexity"] == results["test_perplexity"]
    assert (folder / "curves.png").exists()

    card = ModelCard.load(folder / "README.md")
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    # Trained on local files: the card names them and claims no Hub dataset.
    assert "koala++" in data.tags and "koala-hf" in data.tags and not data.datasets
    assert {r.dataset_split for r in data.eval_results} == {"test (second half of test.txt)", "test (first half of test.txt)"}
    assert all("local files" in r.dataset_name for r in data.eval_results)
    metrics = card_metrics(card)
    assert metrics[("perplexity", "Test perplexity")] == results["test_perplexity"]
    assert metrics[("perplexity", "Best validation perplexity")] == results["best_validation_perplexity"]
    text = card.text
    for expected in (written["command"], "| `sigma` | 0.1 |", "| `lr` | 1.0 |", "| `weight_decay` | 0.0001 |",
                     "| `alpha_r` | 0.9 |", "| `r` | None |", "| `symmetric` | True |", "1 layer,", "| epochs | 2 (40 optimizer steps) |",
                     "`smoke`", "AutoModelForCausalLM.from_pretrained(\"someone/gpt-koala\")", "## Limitations",
                     "xia2025koalapp", "davtyan2022koala", written["device"], "python, 1 process, mixed precision: no"):
        assert expected in text, expected
    assert "1 layers" not in text and "pip install koala_hf\n" + written["command"] not in text
    assert "not on PyPI yet" in text
    assert "python recipe/wikitext2_gpt.py --preset smoke" in text


def test_the_timm_folder_loads_with_timm_and_its_card_parses(vision_smoke_run, tmp_path):
    results, run_dir = vision_smoke_run
    folder = hub.prepare(run_dir, tmp_path / "hub", repo_id="someone/resnet18-cifar10-koala")
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "resnet18_cifar" and config["num_classes"] == 10
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]

    trained = {k.removeprefix("model."): v for k, v in load_file(run_dir / "model.safetensors").items()}
    for model in (
        timm.create_model(f"local-dir:{folder}", pretrained=True),  # what hf-hub:<id> does, from a folder
        timm.create_model("resnet18_cifar", pretrained=True, num_classes=10,
                          pretrained_cfg_overlay={"file": str(folder / "model.safetensors")}),
    ):
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, trained[name]), name
        assert timm.data.resolve_data_config({}, model=model)["input_size"] == (3, 32, 32)

    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "timm" and "koala++" in card.data.tags and not card.data.datasets
    assert all(r.dataset_name.startswith("CIFAR-10 format, local files (--data_dir") for r in card.data.eval_results)
    metrics = card_metrics(card)
    assert metrics[("top1_error", "Top-1 error (%)")] == results["test_top1_error"]
    assert metrics[("top5_error", "Top-5 error (%)")] == results["test_top5_error"]
    assert 'timm.create_model("hf-hub:someone/resnet18-cifar10-koala", pretrained=True)' in card.text


class RecordingHub:
    """Stands in for the two network calls of a push and records them."""

    def __init__(self, monkeypatch):
        self.calls = []
        monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: self.calls.append(("create", repo_id, kw, api.token)))
        monkeypatch.setattr(HfApi, "upload_folder", lambda api, **kw: self.upload(api, **kw))

    def upload(self, api, **kwargs):
        from pathlib import Path

        self.calls.append(("upload", kwargs["repo_id"], sorted(p.name for p in Path(kwargs["folder_path"]).iterdir()), api.token))
        return "https://huggingface.co/fake/commit"


def test_the_push_command_prepares_and_uploads(lm_smoke_run, monkeypatch):
    _, run_dir = lm_smoke_run
    recorder = RecordingHub(monkeypatch)
    hub.main(["push", str(run_dir), "--hub_model_id", "someone/gpt-koala", "--hub_private_repo", "--hub_token", "hf_x"])
    (create, repo, options, token), (upload, repo2, files, token2) = recorder.calls
    assert (create, repo, options["private"], options["exist_ok"], token) == ("create", "someone/gpt-koala", True, True, "hf_x")
    assert (upload, repo2, token2) == ("upload", "someone/gpt-koala", "hf_x")
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json", "results.json", "curves.png"} <= set(files)


def test_the_prepare_command_writes_a_folder_without_pushing(vision_smoke_run, tmp_path, monkeypatch):
    _, run_dir = vision_smoke_run
    recorder = RecordingHub(monkeypatch)
    hub.main(["prepare", str(run_dir), "--output", str(tmp_path / "out")])
    assert recorder.calls == [] and (tmp_path / "out" / "README.md").exists()


def test_pushing_a_folder_without_a_card_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare"):
        hub.push(tmp_path, "someone/x")
    with pytest.raises(FileNotFoundError, match="results.json"):
        hub.prepare(tmp_path)


@pytest.mark.slow
def test_the_recipe_flag_pushes_the_finished_run(wikitext_dir, tmp_path, monkeypatch):
    from recipes import wikitext2_gpt
    recorder = RecordingHub(monkeypatch)
    wikitext2_gpt.main([
        "--preset", "smoke", "--data_dir", str(wikitext_dir), "--train_split", "validation", "--halve_test_split",
        "--max_train_blocks", "32", "--num_train_epochs", "1", "--output_dir", str(tmp_path / "run"),
        "--disable_tqdm", "true", "--push_to_hub", "--hub_model_id", "someone/flagged", "--hub_private_repo", "true",
    ])
    assert [call[:2] for call in recorder.calls] == [("create", "someone/flagged"), ("upload", "someone/flagged")]
    assert recorder.calls[0][2]["private"] is True
    assert "README.md" in recorder.calls[1][2]


def test_the_cards_reproduction_runs_from_the_pushed_folder_alone(lm_smoke_run, wikitext_dir, tmp_path):
    import re
    import shlex
    import subprocess
    import sys

    _, run_dir = lm_smoke_run
    folder = hub.prepare(run_dir, tmp_path / "repo", repo_id="someone/gpt-koala")
    assert sorted(p.name for p in (folder / "recipe").iterdir()) == ["wikitext2_gpt.py"]  # the rest is in the package
    block = re.search(r"## How to reproduce.*?```bash\n(.*?)```", ModelCard.load(folder / "README.md").text, re.S).group(1)
    lines = block.strip().splitlines()
    page, anchor = lines[0].split(": ", 1)[1].split(" ", 1)[0].split("#")
    assert lines[0].startswith("# the recipe and its options: docs/recipes.md#") and (ROOT / page).exists()
    assert anchor in _heading_slugs(ROOT / page)
    assert lines[-4].startswith("# koala_hf is not on PyPI yet: in a checkout of its source, pip install '.[recipes]'")
    assert lines[-3:-1] == ['hf download someone/gpt-koala --include "recipe/*" --local-dir gpt-koala', "cd gpt-koala"]
    command = shlex.split(lines[-1].replace("DATA_DIR", str(wikitext_dir))) + ["--max_steps", "2", "--save_strategy", "no"]
    assert command[:2] == ["python", "recipe/wikitext2_gpt.py"]
    done = subprocess.run([sys.executable] + command[1:], cwd=folder, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rerun = json.loads((folder / "rerun" / "results.json").read_text())
    assert rerun["steps"] == 2 and rerun["data"]["train_blocks"] == json.loads((run_dir / "results.json").read_text())["data"]["train_blocks"]


def _heading_slugs(page) -> set:
    """The anchors mkdocs gives the page's headings (its toc slugify: lower case, punctuation dropped)."""
    from markdown.extensions.toc import slugify

    return {slugify(line.lstrip("#").strip(), "-") for line in page.read_text().splitlines() if line.startswith("#")}


def test_each_recipes_docs_anchor_exists():
    for target in hub.RECIPE_DOCS.values():
        page, anchor = target.split("#")
        assert anchor in _heading_slugs(ROOT / page), target
