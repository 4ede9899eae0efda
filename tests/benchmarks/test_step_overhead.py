"""benchmarks/step_overhead.py at a tiny size: its rows, its result files, and the counts it publishes."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_benchmark_writes_every_row_with_the_dispatch_counts_and_host_times(tmp_path):
    environment = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "benchmarks/step_overhead.py", "--tensors", "4", "12", "--steps", "2",
                           "--output", str(tmp_path)], cwd=ROOT, env=environment, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "host_step_overhead_cpu.json").read_text())
    assert report["command"].startswith("python benchmarks/step_overhead.py") and report["device"] and report["date"]
    rows = {(r["tensors"], r["implementation"]): r for r in report["rows"]}
    assert len(rows) == 2 * 9
    for n in (4, 12):
        for variant in ("KOALA++", "KOALA-V", "KOALA-M"):
            triton = rows[(n, f"{variant} triton")]
            assert triton["cuda_triton_launches"] == 4 and triton["cuda_aten_ops"] <= 20, triton
            assert triton["host_ms"] > 0
            foreach = rows[(n, f"{variant} foreach")]
            assert foreach["cuda_triton_launches"] == 0 and foreach["cuda_host_copies"] == 1, foreach
            assert triton["cuda_host_copies"] == 0, triton
        assert rows[(n, "AdamW fused")]["host_vs_adamw_fused"] == 1.0
    # The Triton step's dispatches do not grow with the tensors; AdamW foreach's do.
    assert rows[(4, "KOALA++ triton")]["cuda_aten_ops"] == rows[(12, "KOALA++ triton")]["cuda_aten_ops"]
    for variant in ("KOALA++", "KOALA-V", "KOALA-M"):  # nor does the foreach step's (coefficients on the host)
        assert rows[(4, f"{variant} foreach")]["cuda_aten_ops"] == rows[(12, f"{variant} foreach")]["cuda_aten_ops"]
    assert rows[(12, "AdamW foreach")]["cuda_aten_ops"] > rows[(4, "AdamW foreach")]["cuda_aten_ops"]
    # Nor do the Triton step's Python calls (its records and tables kept); fused AdamW's do.
    for variant in ("KOALA++", "KOALA-V", "KOALA-M"):
        assert rows[(4, f"{variant} triton")]["host_python_calls"] == rows[(12, f"{variant} triton")]["host_python_calls"]
    assert rows[(12, "AdamW fused")]["host_python_calls"] > rows[(4, "AdamW fused")]["host_python_calls"]
    assert (tmp_path / "host_step_overhead_cpu.md").read_text().count("| 12 tensors |") == 9
    moved = rows[(12, "KOALA++ triton, gradients moved every step")]  # the kept tables pointed at new gradients
    assert moved["host_python_calls"] == rows[(4, "KOALA++ triton, gradients moved every step")]["host_python_calls"]
