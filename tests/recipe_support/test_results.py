"""koala_hf.recipe_support.results: the results.json schema the recipes write and hub / compare read."""

import json
from pathlib import Path

import pytest

from koala_hf.recipe_support import compare
from koala_hf.recipe_support.results import TASKS, command_line, load_results, record, validate

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = sorted((ROOT / "benchmarks" / "results").rglob("results.json"))


def test_a_record_must_hold_exactly_the_schemas_keys():
    keys = {key: None for key in TASKS["wikitext2_gpt"].all_keys if key not in ("task", "command", "device", "date")}
    assert record("wikitext2_gpt", **keys)["task"] == "wikitext2_gpt"
    with pytest.raises(ValueError, match=r"missing \['test_perplexity'\], not in the schema \['perplexity'\]"):
        record("wikitext2_gpt", **{k: v for k, v in keys.items() if k != "test_perplexity"}, perplexity=1.0)
    with pytest.raises(ValueError, match="unknown task 'lm'"):
        record("lm", **keys)


def test_reading_names_what_a_file_lacks(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"task": "timm_vision", "optimizer": "sgd"}))
    with pytest.raises(ValueError, match="lacks augmentation, batch_size, .*written by an older recipe"):
        load_results(tmp_path)
    with pytest.raises(FileNotFoundError, match="no results.json"):
        load_results(tmp_path / "missing")


@pytest.mark.parametrize("path", COMMITTED, ids=[str(p.relative_to(ROOT / "benchmarks" / "results")) for p in COMMITTED])
def test_every_committed_result_follows_the_schema(path):
    results = validate(json.loads(path.read_text()), str(path))
    assert results["command"].startswith("python recipes/") and results["date"].endswith("UTC")


def test_compare_tables_any_runs_of_one_task():
    runs = [compare.load(path) for path in COMMITTED if "wikitext2" in str(path)][:3]
    text = compare.table(runs)
    assert text.startswith("| run |") and text.count("\n| ") == len(runs) and "test PPL" in text and runs[0]["command"] in text


def test_commands_are_recorded_from_the_repository_root():
    assert command_line(str(ROOT / "recipes" / "wikitext2_gpt.py"), ["--preset", "smoke"], root=ROOT) == \
        "python recipes/wikitext2_gpt.py --preset smoke"
