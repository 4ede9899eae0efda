"""The prepared GPU check's CUDA-only parts that need no GPU, run as a GPU user runs them: with Triton compiling
(``TRITON_INTERPRET=0``), not through the interpreter the other tests use. (The check once stopped in its first
script: its op count built a probe optimizer on a CPU parameter with ``fused="triton"``, which only the
interpreter accepts.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

COUNT = """
import json, runpy, sys
benchmark = runpy.run_path("benchmarks/optimizer_step.py", run_name="optimizer_step")
from koala_hf import KOALAM, KOALAV, KOALAPlusPlus
counts = {variant.__name__: benchmark["cuda_dispatches"](lambda ps: variant(ps, fused=fused), [(3, 4)] * 6)
          for variant in (KOALAPlusPlus, KOALAV, KOALAM) for fused in ("triton",)}
print(json.dumps(counts))
"""


@pytest.mark.compiles_triton
def test_the_op_count_of_a_triton_step_runs_with_triton_compiling():
    pytest.importorskip("triton")
    environment = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", COUNT], cwd=ROOT, env=environment, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = json.loads(done.stdout.splitlines()[-1])
    assert {c["cuda_triton_launches"] for c in counts.values()} == {3}, counts
    assert all(c["cuda_aten_ops"] > 0 for c in counts.values()), counts
