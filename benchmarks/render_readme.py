"""Regenerate the README's measured sections from benchmarks/results/.

    python benchmarks/render_readme.py                      # rewrites README.md
    python benchmarks/render_readme.py --readme /tmp/README.md

main: ``main_job_cpu/compare.md`` (``recipes/wikitext2_compare.py``);
wikitext2 and wikitext2-long: ``wikitext2_paper_protocol_cpu/compare.md`` and ``long.md``
(benchmarks/wikitext2_paper_protocol.py); vision: ``digits_cpu/digits.md`` (benchmarks/digits_vision.py);
performance: every ``*_step_*.md`` table (benchmarks/optimizer_step.py, train_step.py; ``*_cuda.md`` from
benchmarks/gpu_check.sh); fsdp2: ``fsdp2_state_memory_*.md`` (benchmarks/fsdp2_state_memory.py).
A section without a result file says so.
"""

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SECTIONS = {
    "main": "main_job_cpu/compare.md",
    "wikitext2": "wikitext2_paper_protocol_cpu/compare.md",
    "wikitext2-long": "wikitext2_paper_protocol_cpu/long.md",
    "vision": "digits_cpu/digits.md",
    "performance": "*_step_*.md",
    "fsdp2": "fsdp2_state_memory_*.md",
}


def render(text: str, section: str, body: str) -> str:
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    if start not in text or end not in text:
        raise SystemExit(f"README.md lacks the {start} ... {end} markers")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readme", default=str(ROOT / "README.md"))
    args = parser.parse_args(argv)
    readme = Path(args.readme)
    text = readme.read_text()
    for section, pattern in SECTIONS.items():
        tables = [p.read_text().strip() for p in sorted(RESULTS.glob(pattern))]
        text = render(text, section, "\n\n".join(tables) if tables else "Not measured yet.")
        print(f"{section}: {len(tables)} table(s)")
    readme.write_text(text)


if __name__ == "__main__":
    main()
