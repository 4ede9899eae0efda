"""Every command the README and the docs pages print, run at a tiny size on a fresh clone's files (outputs in a
temporary folder), or, for those that need the Hub, a GPU or hours, checked as far as can be here: their
arguments parse. (The pages' Python snippets: tests/test_docs.py.)"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
PYTHON = {"python", ".venv/bin/python"}
# Extra arguments that make a runnable command tiny (appended: the last value of a flag wins).
TINY = {
    "recipes/wikitext2_compare.py": ["--max_train_blocks", "16", "--max_eval_blocks", "8", "--num_train_epochs", "1"],
    "recipes/wikitext2_gpt.py": ["--max_steps", "2", "--max_eval_blocks", "8", "--save_strategy", "no"],
    "recipes/timm_vision.py": ["--max_steps", "2", "--max_train_samples", "64", "--max_eval_samples", "16",
                               "--measure_batches", "2", "--save_strategy", "no"],
    "benchmarks/optimizer_step.py": ["--steps", "1", "--warmup", "0", "--only", "AdamW fused", "KOALA++ fused"],
    "benchmarks/train_step.py": ["--steps", "1", "--warmup", "0", "--lm_batch", "1", "--vision_batch", "2"],
}
# What cannot run here, and why; their arguments are parsed instead where they are a recipe's.
NOT_HERE = {
    "the Hub's": "needs the Hub (datasets or GPT-1)",
    "your ImageNet32": "needs ImageNet32 batches",
    "--hub_model_id me/gpt-koala": "pushes to the Hub",
    "path/to/pytorch-image-models/train.py": "timm's train.py is not in this repository (tests/integrations/test_timm.py runs the launcher)",
    "pip install": "installs into your environment (.ci/run installs and tests a clean clone)",
    "-m pytest": "the test command itself (.ci/run)",
    "bash .ci/run": "CI itself",
}


def readme_commands() -> list[str]:
    """Each distinct command line of the pages' bash blocks, in order."""
    blocks = [b for page in PAGES for b in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S)]
    lines = [line.strip() for block in blocks for line in block.splitlines() if line.strip()]
    return list(dict.fromkeys(lines))


def reason_not_here(line: str) -> str | None:
    return next((why for marker, why in NOT_HERE.items() if marker in line), None)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """Where the commands' outputs go (runs/, data/) instead of the checkout."""
    return tmp_path_factory.mktemp("readme")


def in_sandbox(argument: str, sandbox: Path) -> str:
    for folder in ("runs/", "data/"):
        if argument.startswith(folder):
            return str(sandbox / argument)
    return argument


def parse_recipe_arguments(script: str, arguments: list[str]) -> None:
    from transformers import HfArgumentParser

    from recipes import timm_vision, wikitext2_gpt

    if script.endswith("wikitext2_gpt.py"):
        from koala_hf.recipe_support.arguments import RecipeTrainingArguments

        dataclasses, presets = (wikitext2_gpt.DataArguments, wikitext2_gpt.ModelArguments, RecipeTrainingArguments), wikitext2_gpt.PRESETS
    else:
        dataclasses, presets = (timm_vision.DataArguments, timm_vision.ModelArguments, timm_vision.VisionTrainingArguments), timm_vision.PRESETS
    _, model, _ = HfArgumentParser(dataclasses).parse_args_into_dataclasses(args=arguments)
    assert model.preset in presets


@pytest.mark.slow
@pytest.mark.parametrize("line", readme_commands())
def test_the_readme_command_works_as_printed(line, sandbox):
    words = shlex.split(line, comments=True)
    why = reason_not_here(line)
    if words[:2] == ["accelerate", "launch"]:
        words = ["python", *words[2:]]
        why = why or "accelerate launch starts the same script on the devices (its arguments are checked)"
    if why:
        if words[0] in PYTHON and words[1].startswith("recipes/") and words[1].endswith(("wikitext2_gpt.py", "timm_vision.py")):
            parse_recipe_arguments(words[1], words[2:])
        pytest.skip(why)
    if words[:2] == ["bash", "benchmarks/gpu_check.sh"]:  # without a GPU it must stop at once, saying so
        done = subprocess.run(words, cwd=ROOT, capture_output=True, text=True, timeout=120,
                              env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHON": sys.executable})
        assert done.returncode != 0 and "needs a CUDA GPU" in done.stderr
        return
    if words[0] == "python" and words[1] == "benchmarks/render_readme.py":  # it must have nothing to change
        done = subprocess.run([sys.executable, words[1], "--check"], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return
    assert words[0] in PYTHON, line
    arguments = [in_sandbox(a, sandbox) for a in words[1:]]
    script = words[1] if not words[1].startswith("-") else None
    arguments += TINY.get(script, [])
    if script and script.startswith("benchmarks/"):
        arguments += ["--output", str(sandbox / "benchmarks")]
    offline = {**os.environ, "HF_HUB_OFFLINE": "1"}  # as CI is: the main job then reads the copy in the repository
    done = subprocess.run([sys.executable, *arguments], cwd=ROOT, capture_output=True, text=True, timeout=900, env=offline)
    assert done.returncode == 0, f"{line}\n{done.stderr[-3000:]}"
