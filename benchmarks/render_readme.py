"""Regenerate the README's measured sections from benchmarks/results/.

    python benchmarks/render_readme.py

performance: every ``*_step_*.md`` table (benchmarks/optimizer_step.py, train_step.py);
wikitext2: ``wikitext2_paper_protocol_cpu/compare.md`` (benchmarks/wikitext2_paper_protocol.py);
vision: ``vision_smoke_cpu/compare.md`` (benchmarks/run_vision_smoke_cpu.sh);
fsdp2: ``fsdp2_state_memory_*.md`` (benchmarks/fsdp2_state_memory.py).
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SECTIONS = {
    "performance": "*_step_*.md",
    "wikitext2": "wikitext2_paper_protocol_cpu/compare.md",
    "vision": "vision_smoke_cpu/compare.md",
    "fsdp2": "fsdp2_state_memory_*.md",
}


def render(text: str, section: str, body: str) -> str:
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    if start not in text or end not in text:
        raise SystemExit(f"README.md lacks the {start} ... {end} markers")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    for section, pattern in SECTIONS.items():
        tables = [p.read_text().strip() for p in sorted(RESULTS.glob(pattern))]
        text = render(text, section, "\n\n".join(tables) if tables else "No measurements yet.")
        print(f"{section}: {len(tables)} table(s)")
    readme.write_text(text)


if __name__ == "__main__":
    main()
