"""KOALA++ against AdamW on WikiText-2, trained the same way: the recipe once per optimizer, then one table.

    python recipes/wikitext2_compare.py --output_dir runs/main       # the README's main job, ~4 min on 2 CPU cores
    python recipes/wikitext2_compare.py --output_dir runs/main --runs koala++ adamw adamw_paper   # + the papers' AdamW

Runs ``recipes/wikitext2_gpt.py`` for each optimizer with the same preset, data, seed, data order and epochs,
then prints the comparison table (``compare.md``) and draws the curves (``compare.png``) into ``--output_dir``.
The defaults are the papers' protocol at CPU size (``paper_cpu``: GPT-1 blocks, 2 x 128, consecutive chunks,
constant lr, no clipping), its frozen pretrained embeddings (the stand-in checkpoint kept in
``benchmarks/results/wikitext2_paper_protocol_cpu/pretrain``), two epochs, validated and tested on 600 chunks
of each half of test.txt, and the best setting of each optimizer in benchmarks/wikitext2_paper_protocol.py's
grid: KOALA++ with ``noise="none"`` (E1c) at lr 1e-3 and AdamW at lr 1e-3 (wd 0.1); ``--runs`` adds AdamW at the
papers' lr 1e-5 (``adamw_paper``). Any other argument goes to every run (e.g. ``--num_train_epochs 4``,
``--max_train_blocks 64``). Run it from the repository's root.

Data: the Hub's WikiText-2 (``Salesforce/wikitext``, ``wikitext-2-v1``, the tokenised release the protocol
uses) where the Hub can be reached, else the copy of its validation and test text kept in
``recipes/data/wikitext-2`` (said once); ``--data_dir`` chooses a folder.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from koala_hf.recipe_support import compare
from koala_hf.recipe_support.machine import hub_unreachable
from koala_hf.recipe_support.results import provenance

RECIPE = Path(__file__).with_name("wikitext2_gpt.py")
LOCAL_COPY = "recipes/data/wikitext-2"  # WikiText-2's validation and test text, kept in the repository (its README)
PROTOCOL = ["--preset", "paper_cpu", "--train_split", "validation",
            "--halve_test_split", "true", "--embeddings_from", "benchmarks/results/wikitext2_paper_protocol_cpu/pretrain",
            "--freeze_embeddings", "true", "--num_train_epochs", "2", "--max_eval_blocks", "600", "--disable_tqdm", "true",
            "--report_to", "none", "--save_strategy", "no"]  # flag, value pairs
# name -> the recipe arguments of that run
RUNS = {
    "koala++": ["--optimizer", "koala++", "--learning_rate", "1e-3", "--optimizer_kwargs", json.dumps({"noise": "none"})],
    "adamw": ["--optimizer", "adamw", "--learning_rate", "1e-3"],
    "adamw_paper": ["--optimizer", "adamw", "--learning_rate", "1e-5"],
}
LABELS = {"koala++": "KOALA++ (E1c, lr 1e-3)", "adamw": "AdamW (lr 1e-3, tuned)", "adamw_paper": "AdamW (lr 1e-5, the papers')"}


def without_overridden(arguments: list[str], overrides: list[str]) -> list[str]:
    """``arguments`` (flag, value pairs) less the flags ``overrides`` gives again, so each appears once."""
    given = {a.split("=", 1)[0] for a in overrides if a.startswith("--")}
    pairs = list(zip(arguments[::2], arguments[1::2]))
    return [item for flag, value in pairs if flag not in given for item in (flag, value)]


def data_source(extra: list[str]) -> list[str]:
    """The recipe's data arguments: none (the Hub's WikiText-2) where the Hub can be reached, else the copy kept in
    the repository, said once; none either when ``--data_dir`` is among the arguments given."""
    if any(a.split("=", 1)[0] == "--data_dir" for a in extra):
        return []
    reason = hub_unreachable()
    if reason is None:
        return []
    print(f"WikiText-2 from the copy kept in {LOCAL_COPY} (the Hub cannot be used: {reason})", flush=True)
    return ["--data_dir", LOCAL_COPY]


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/main")
    parser.add_argument("--runs", nargs="+", default=["koala++", "adamw"], choices=list(RUNS), help="which optimizers")
    args, extra = parser.parse_known_args(argv)
    out = Path(args.output_dir)
    start = time.perf_counter()
    results = []
    data = data_source(extra)
    for name in args.runs:
        arguments = without_overridden(PROTOCOL + data + RUNS[name], extra) + extra
        command = [sys.executable, str(RECIPE), *arguments, "--output_dir", str(out / name)]
        print("$", shlex.join(["python", str(RECIPE.relative_to(Path.cwd()) if RECIPE.is_relative_to(Path.cwd()) else RECIPE),
                               *command[2:]]), flush=True)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        results.append({**compare.load(out / name), "label": LABELS[name]})
    stamp = provenance(__file__, argv, root=Path(__file__).resolve().parents[1])
    minutes, seconds = divmod(round(time.perf_counter() - start), 60)
    text = (f"WikiText-2, {stamp['device']}, {stamp['date']}: `{stamp['command']}` ({minutes} min {seconds} s)\n\n"
            + compare.table(results))
    (out / "compare.md").write_text(text + f"\nfigure: {out / 'compare.png'}\n")
    compare.figure(results, out / "compare.png")
    print(text)
    print(f"\nfigure: {out / 'compare.png'}")
    return text


if __name__ == "__main__":
    main()
