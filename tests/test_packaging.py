"""The distribution: a wheel with everything the package reads at run time, installable on its own."""

import re
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

import koala_hf
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    (built,) = out.glob("koala_hf-*.whl")
    return built


def test_the_wheel_carries_the_version_the_card_template_and_the_metric_module(wheel):
    assert wheel.name.startswith(f"koala_hf-{koala_hf.__version__}-")
    names = zipfile.ZipFile(wheel).namelist()
    assert "koala_hf/model_cards/template.md" in names
    assert "koala_hf/metrics/top_k_error/top_k_error.py" in names
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    core = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert sorted(line.split()[1].split(">")[0] for line in core) == ["accelerate", "huggingface_hub", "torch", "transformers"]


def test_the_installed_wheel_takes_a_koala_step_and_renders_a_card(wheel, tmp_path, lm_smoke_run):
    """A fresh venv with the wheel alone; torch and friends come from this environment's site-packages,
    whose own .pth files (this checkout's editable install) are not read from there."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True, timeout=300)
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _, run_dir = lm_smoke_run
    code = f"""
import torch, koala_hf
assert koala_hf.__file__.startswith({site!r}), koala_hf.__file__
model = torch.nn.Linear(4, 1)
optimizer = koala_hf.KOALAPlusPlus(model.parameters(), lr=0.5)
x, y = torch.randn(8, 4), torch.randn(8, 1)
losses = ((model(x) - y) ** 2).squeeze(-1)
losses.mean().backward()
optimizer.observe(losses.mean(), losses)
before = model.weight.detach().clone()
optimizer.step()
assert not torch.equal(before, model.weight)
from koala_hf import hub
folder = hub.prepare({str(run_dir)!r}, {str(tmp_path / 'card')!r}, repo_id="someone/x")
text = (folder / "README.md").read_text()
assert "in a checkout of the koala_hf source repository" in text and "pip install '.[recipes]'" in text, text  # no recipe beside a wheel
print("ok", koala_hf.__version__)
"""
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == f"ok {koala_hf.__version__}"


def test_the_optimizer_modules_stay_small_and_nothing_edits_sys_path():
    """Issue 20's structure: one job per module (none in koala_hf/optim over 400 lines) and every module
    imported the normal way (no ``sys.path`` edits in the package, recipes, benchmarks or tests)."""
    long = {p.name: n for p in (ROOT / "koala_hf" / "optim").glob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long
    edits = [str(p.relative_to(ROOT)) for folder in ("koala_hf", "recipes", "benchmarks", "tests")
             for p in (ROOT / folder).rglob("*.py") if re.search(r"sys\.path\.(insert|append)\(", p.read_text())]
    assert not edits, edits
