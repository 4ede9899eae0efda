"""The README and the docs: every Python snippet runs (at the tiny size it is written at), the site builds
strictly (every internal link and anchor resolves), no link leaves the repository except to the papers and
the libraries' own documentation, the README serves a newcomer on its first screen, and the license and the
citation file are there and valid. (The pages' shell commands: tests/test_readme_commands.py.)"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
# What a snippet presumes that its page says in words (timm's train.py has a task and an optimizer by then).
CONTEXT = {
    "docs/guides/timm.md": (
        "import timm, koala_hf.integrations.timm\n"
        "from timm.optim import create_optimizer_v2\n"
        "from timm.task import ClassificationTask\n"
        "model = timm.create_model('resnet10t', num_classes=3)\n"
        "task = ClassificationTask(model, verbose=False)\n"
        "optimizer = create_optimizer_v2(model, opt='koalapp', lr=0.5)\n"
    ),
}
# Hosts a page may link to: the papers and the libraries' own documentation.
ALLOWED_HOSTS = ("creativecommons.org", "arxiv.org", "proceedings.neurips.cc", "ojs.aaai.org", "huggingface.co/docs",
                 "pytorch.org/docs", "www.mkdocs.org", "timm.fast.ai")


def snippets() -> list:
    found = []
    for page in PAGES:
        for index, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), re.S)):
            name = str(page.relative_to(ROOT))
            found.append(pytest.param(name, code, id=f"{name}#{index}"))
    return found


@pytest.mark.parametrize("page, code", snippets())
def test_the_snippet_runs_as_printed(page, code, tmp_path):
    script = tmp_path / "snippet.py"
    script.write_text(CONTEXT.get(page, "") + code)
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=snippet_environment())
    assert done.returncode == 0, f"{page}:\n{code}\n{done.stderr[-3000:]}"


def snippet_environment() -> dict:
    """A snippet runs as a user's script would, offline, with this checkout importable."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}


def test_the_docs_site_builds_strictly(tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    if mkdocs is None:
        pytest.fail("mkdocs is missing: pip install -e '.[docs]' (the test extra includes it)")
    done = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "site" / "algorithm" / "index.html").read_text().count('id="E1') >= 10


def test_every_equation_tag_the_code_cites_is_defined_on_the_algorithm_page():
    defined = set(re.findall(r'<a id="(E\d+[a-c]?)"></a>', (ROOT / "docs" / "algorithm.md").read_text()))
    cited = set()
    for folder in ("koala_hf", "tests", "recipes", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            cited |= set(re.findall(r"\b(E(?:[1-4]|[12]\d|3[0-6])[a-c]?)\b", path.read_text()))
    assert cited and cited <= defined, sorted(cited - defined)


def test_nothing_points_outside_the_repository():
    outside = "../" + "shared"  # written apart so that this file does not match itself
    for folder in ("README.md", "docs", "koala_hf", "model_cards", "recipes", "benchmarks", "tests"):
        root = ROOT / folder
        for path in [root] if root.is_file() else root.rglob("*"):
            if path.is_file() and path.suffix in (".py", ".md", ".json", ".yaml", ".yml", ".sh", ".txt", ".cff"):
                assert outside not in path.read_text(errors="ignore"), path
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://")):
                assert any(host in target for host in ALLOWED_HOSTS), f"{page.name} links out: {target}"
            elif not target.startswith("#"):
                assert (page.parent / target.split("#")[0]).resolve().is_relative_to(ROOT), f"{page.name}: {target}"
                assert (page.parent / target.split("#")[0]).exists(), f"{page.name}: {target} does not exist"


def test_the_readme_is_short_and_its_first_screen_installs_and_trains():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200
    first_screen = "\n".join(lines[:50])
    assert 'pip install -e ".[test]"' in first_screen
    assert "KoalaTrainer(model=model, args=args, train_dataset=data).train()" in first_screen


def test_the_license_and_the_citation_are_there_and_valid():
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")
    assert 'license = "Apache-2.0"' in (ROOT / "pyproject.toml").read_text()
    cffconvert = shutil.which("cffconvert", path=str(Path(sys.executable).parent))
    if cffconvert is None:
        pytest.fail("cffconvert is missing: pip install -e '.[test]'")
    done = subprocess.run([cffconvert, "--validate", "--infile", str(ROOT / "CITATION.cff")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    bibtex = (ROOT / "docs" / "citing.md").read_text()
    assert "@inproceedings{xia2025koalapp" in bibtex and "@inproceedings{davtyan2022koala" in bibtex


# Each guide's snippet with the mistake a user of that guide makes first, and what the error must name.
MISTAKES = {
    "README.md#1 without observe": ("README.md", 1, "    optimizer.observe(loss, per_sample)   # the measurement (E1)\n", "",
                                    r"needs the loss.*optimizer\.observe\(loss\)"),
    "koala-trainer with the plain Trainer": ("docs/guides/koala-trainer.md", 0, "trainer = KoalaTrainer(",
                                             "from transformers import Trainer\ntrainer = Trainer(",
                                             r"KoalaTrainer"),
    "accelerate without observe": ("docs/guides/accelerate.md", 0,
                                   "        koala_hf.observe(optimizer, outputs.loss, per_token)   # reaches through AcceleratedOptimizer\n",
                                   "", r"koala_hf\.observe\(optimizer, loss\) where accelerator\.prepare has wrapped"),
    "timm without the feed line": ("docs/guides/timm.md", 0, "koala_hf.integrations.timm.feed_losses(task, optimizer)",
                                   "import torch\nfor p in model.parameters(): p.grad = torch.zeros_like(p)\noptimizer.step()",
                                   r"feed_losses\(task, optimizer\).*python -m koala_hf\.integrations\.timm"),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_a_guides_common_mistake_gets_an_error_that_names_the_fix(mistake, tmp_path):
    page, index, right, wrong, expected = MISTAKES[mistake]
    code = re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), re.S)[index]
    assert right in code, f"{page}'s snippet changed: update this test"
    script = tmp_path / "mistake.py"
    script.write_text(CONTEXT.get(page, "") + code.replace(right, wrong))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=snippet_environment())
    assert done.returncode != 0 and re.search(expected, done.stderr, re.S), done.stderr[-3000:]
