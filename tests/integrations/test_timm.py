"""timm's train.py through koala_hf.integrations.timm: each step measures the mean of its micro-batches'
losses, as timm's task computed them (a stand-in loop with timm's real task and optimizer factory)."""

import json
import subprocess
import sys

import pytest

pytest.importorskip("timm")

from tests.helpers import ROOT  # noqa: E402

SCRIPT = ROOT / "tests" / "scripts" / "timm_style_train.py"


def run(tmp_path, *launcher, opt="koalapp"):
    out = tmp_path / f"{opt}.json"
    done = subprocess.run([sys.executable, *launcher, str(SCRIPT), "--opt", opt, "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    return done, (json.loads(out.read_text()) if out.exists() else None)


@pytest.mark.slow
@pytest.mark.parametrize("opt", ["koalapp", "koalam"])
def test_the_launcher_feeds_each_steps_micro_batch_losses(opt, tmp_path):
    done, seen = run(tmp_path, "-m", "koala_hf.integrations.timm", opt=opt)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = seen["micro_batch_losses"]
    expected = [(a + b) / 2 for a, b in zip(losses[::2], losses[1::2])]  # two micro-batches per step
    assert seen["measured"] == pytest.approx(expected, rel=1e-6) and len(expected) == 3
    assert seen["optimizer"] == {"koalapp": "KOALAPlusPlus", "koalam": "KOALAM"}[opt]
    assert done.stderr.count("falls back to loss**2") == 1  # said once


@pytest.mark.slow
def test_without_the_launcher_the_first_step_says_what_to_do(tmp_path):
    done, _ = run(tmp_path, "-c", "import koala_hf, runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    assert done.returncode != 0 and "needs the loss" in done.stderr


def test_the_launcher_says_how_to_call_it():
    from koala_hf.integrations.timm import main

    with pytest.raises(SystemExit, match="python -m koala_hf.integrations.timm path/to/train.py"):
        main([])
