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
    assert {name: c["cuda_triton_launches"] for name, c in counts.items()} == {"KOALAPlusPlus": 4, "KOALAV": 4, "KOALAM": 4}, counts
    assert all(c["cuda_aten_ops"] > 0 for c in counts.values()), counts


@pytest.mark.slow
def test_the_gpu_check_runs_every_step_at_a_tiny_size_on_the_cpu(tmp_path):
    """Every script of the check, with its arguments, the result files it writes and the Triton rows (through
    the interpreter), so that it cannot break unnoticed before a GPU runs it."""
    environment = {**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1", "PYTHON": sys.executable,
                   "PYTHONPATH": str(ROOT)}
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--device", "cpu", "--tiny", "--output", str(tmp_path)],
                          cwd=ROOT, env=environment, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-4000:]
    written = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.md")}
    assert {"optimizer_step_cpu.md", "optimizer_step_cpu_bf16.md", "train_step_cpu.md", "train_step_cpu_bf16.md",
            "main_job_cpu/compare.md", "default_path_cpu.md"} <= written, written
    steps = json.loads((tmp_path / "optimizer_step_cpu_bf16.json").read_text())
    names = {row["implementation"] for row in steps["rows"]}
    assert {"KOALA++ triton", "KOALA-V triton", "KOALA-M triton", "AdamW fused"} <= names
    assert all(row["vs_per_tensor"] < 1e-2 for row in steps["rows"] if "vs_per_tensor" in row)  # bf16 parity
    assert "tokens/s" in (tmp_path / "main_job_cpu" / "compare.md").read_text()


def test_without_a_gpu_the_check_stops_at_once_saying_so():
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHON": sys.executable})
    assert done.returncode != 0 and "needs a CUDA GPU" in done.stderr
