"""The WikiText-2 GPT recipe: real text, both on-disk layouts, saved runs that load and generate."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from recipes import compare
from recipes import wikitext2_gpt
def smoke(wikitext_dir, output_dir, *extra):
    return wikitext2_gpt.main([
        "--preset", "smoke", "--data_dir", str(wikitext_dir), "--train_split", "validation", "--halve_test_split",
        "--output_dir", str(output_dir), "--disable_tqdm", "true", "--report_to", "none", *extra,
    ])


def test_smoke_preset_trains_on_real_wikitext_and_perplexity_falls(lm_smoke_run):
    results, output = lm_smoke_run
    perplexities = [e["validation_perplexity"] for e in results["epochs"]]
    assert results["epochs"][0]["epoch"] == 0 and len(perplexities) == 3
    assert perplexities[-1] < 0.5 * perplexities[0], perplexities
    assert perplexities[2] < perplexities[1]
    assert results["test_perplexity"] < 0.5 * perplexities[0]
    assert results["data"]["train_blocks"] == 320 and results["model"]["vocab_size"] > 10_000
    written = json.loads((output / "results.json").read_text())
    assert written["optimizer"] == "koala++" and "wikitext2_gpt.py" in written["command"]
    assert all(e["seconds"] > 0 and e["tokens_per_second"] > 0 for e in written["epochs"] if e["epoch"] > 0)
    assert (output / "curves.png").stat().st_size > 10_000


def test_the_saved_run_loads_back_and_generates(lm_smoke_run):
    _, output = lm_smoke_run
    model = AutoModelForCausalLM.from_pretrained(output)
    tokenizer = AutoTokenizer.from_pretrained(output)
    prompt = tokenizer("The lobster is a", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    ids = prompt["input_ids"]
    with torch.no_grad():  # greedy decoding by hand: the next token is the argmax of the last position's logits
        for _ in range(8):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, ids)
    assert all(token in tokenizer.get_vocab() for token in tokenizer.convert_ids_to_tokens(generated[0]))
    assert tokenizer.convert_ids_to_tokens(tokenizer("zyzzyva-unknown")["input_ids"]) == ["<unk>"]


def test_baselines_run_the_same_way_and_compare(lm_smoke_run, wikitext_dir, tmp_path, capsys):
    koala, koala_output = lm_smoke_run
    adamw = smoke(wikitext_dir, tmp_path / "adamw", "--optimizer", "adamw")
    assert adamw["optimizer_kwargs"] == {"lr": 3e-4} and adamw["weight_decay"] == 5e-4
    assert adamw["data"] == koala["data"] and adamw["seed"] == koala["seed"]
    text = compare.main([str(koala_output), str(tmp_path / "adamw"), "--output", str(tmp_path / "compare.png")])
    assert "| koala++ (" in text and "| adamw (" in text and "test PPL" in text
    assert (tmp_path / "compare.png").stat().st_size > 10_000


def write_parquet_layout(folder, lines_per_split):
    config = folder / "wikitext-2-v1"
    config.mkdir(parents=True)
    for split, lines in lines_per_split.items():
        pq.write_table(pa.table({"text": lines}), config / f"{split}-00000-of-00001.parquet")


def test_the_hub_parquet_layout_reads_like_the_text_files(tmp_path):
    lines = {"train": [" = Title = \n", " a b c <unk> d \n", ""], "validation": [" b c \n"], "test": [" c d \n", " a \n"]}
    write_parquet_layout(tmp_path, lines)
    splits = wikitext2_gpt.read_splits(wikitext2_gpt.DataArguments(data_dir=str(tmp_path)))
    assert {k: list(v["text"]) for k, v in splits.items()} == lines
    tokenizer = wikitext2_gpt.word_level_tokenizer(splits["train"]["text"])
    blocks = wikitext2_gpt.blocks(splits["train"], tokenizer, block_size=4, limit=None)
    words = "= Title = <eos> a b c <unk> d <eos>".split()
    assert [tokenizer.convert_ids_to_tokens(b) for b in blocks["input_ids"]] == [words[:4], words[4:8]]


def test_a_folder_without_wikitext_files_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="holds neither train.txt"):
        wikitext2_gpt.read_splits(wikitext2_gpt.DataArguments(data_dir=str(tmp_path)))




def test_halving_the_test_text(wikitext_dir):
    splits = wikitext2_gpt.read_splits(
        wikitext2_gpt.DataArguments(data_dir=str(wikitext_dir), train_split="validation", halve_test_split=True)
    )
    test_lines = (wikitext_dir / "test.txt").read_text().splitlines(keepends=True)
    assert len(splits["validation"]) + len(splits["test"]) == len(test_lines)
    assert splits["validation"][0]["text"] == test_lines[0]
    assert len(splits["train"]) == len((wikitext_dir / "valid.txt").read_text().splitlines())
