"""Regenerate the measured sections of the README and the docs pages from benchmarks/results/.

    python benchmarks/render_readme.py             # rewrites README.md and docs/*.md where they differ
    python benchmarks/render_readme.py --check     # changes nothing; fails if any section is out of date

A section is the text between ``<!-- name:start -->`` and ``<!-- name:end -->`` in README.md or any page under
docs/; every section must appear somewhere. main: ``main_job_cpu/compare.md`` (recipes/wikitext2_compare.py);
wikitext2 and wikitext2-long: ``wikitext2_paper_protocol_cpu/compare.md`` and ``long.md``
(benchmarks/wikitext2_paper_protocol.py); vision: ``digits_cpu/digits.md`` (benchmarks/digits_vision.py);
performance: every ``*_step_*.md`` table (benchmarks/optimizer_step.py, train_step.py; ``*_cuda.md`` from
benchmarks/gpu_check.sh); fsdp2: ``fsdp2_state_memory_*.md`` (benchmarks/fsdp2_state_memory.py); guidance:
``guidance_cpu/lm/guidance.md`` then ``digits/guidance.md`` (benchmarks/render_guidance.py, from the guidance
sweep); summary: the README's small table, computed here from ``long.json``, the frozen grid's runs and
``digits.json``. A section without a result file says so.
"""

import argparse
import json
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
    "guidance": ("guidance_cpu/lm/guidance.md", "guidance_cpu/digits/guidance.md"),  # the finished task first
}


def summary() -> str:
    """Where KOALA++ stands against the tuned baselines, one row per task, from the committed result files."""
    lm = RESULTS / "wikitext2_paper_protocol_cpu"
    long = {s["optimizer"]: s for s in json.loads((lm / "long.json").read_text())["settings"]}
    koala, adamw = long["koala++"], long["adamw"]
    paper = json.loads((lm / "frozen_pretrained/adamw_lr1e-05/results.json").read_text())
    short = json.loads((lm / "frozen_pretrained/koala++_none_lr0.001/results.json").read_text())
    digits = json.loads((RESULTS / "digits_cpu/digits.json").read_text())["models"]

    def final(model: str, run: str) -> str:
        return f"{digits[model][run]['test_top1_error_per_epoch'][-1]:.1f}%"

    def epochs(model: str) -> int:
        return len(digits[model]["sgd"]["test_top1_error_per_epoch"])

    mobile, resnet = "mobilenetv3_large_100_cifar", "resnet18_cifar"
    rows = [
        ("WikiText-2 GPT, frozen embeddings, 12 epochs, 3 seeds: test PPL",
         f"{koala['test_perplexity_mean']:.1f} +- {koala['test_perplexity_sd']:.1f} (E1c, lr {koala['learning_rate']:g})",
         f"AdamW {adamw['test_perplexity_mean']:.1f} +- {adamw['test_perplexity_sd']:.1f} (lr {adamw['learning_rate']:g}, tuned)"),
        ("the same, 4 epochs, against the papers' AdamW setting: test PPL",
         f"{short['test_perplexity']:.1f}", f"AdamW {paper['test_perplexity']:.1f} (lr 1e-5, the papers' script)"),
        (f"digits, MobileNetV3-Large, {epochs(mobile)} epochs: final test error",
         f"{final(mobile, 'koala++_lr3')} (lr 3); {final(mobile, 'koala++')} at the papers' lr 1",
         f"SGD {final(mobile, 'sgd')}, AdamW {final(mobile, 'adamw')}"),
        (f"digits, ResNet-18, {epochs(resnet)} epochs: final test error", f"{final(resnet, 'koala++')} (the papers' lr 1)",
         f"SGD {final(resnet, 'sgd')}, AdamW {final(resnet, 'adamw')}"),
    ]
    lines = ["| task (one CPU, measured) | KOALA++ | best baseline |", "|---|---|---|"]
    lines += [f"| {task} | {mine} | {theirs} |" for task, mine, theirs in rows]
    return "\n".join(lines)


def render(text: str, section: str, body: str) -> str:
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


def bodies() -> dict[str, str]:
    found = {}
    for section, patterns in SECTIONS.items():
        patterns = (patterns,) if isinstance(patterns, str) else patterns
        tables = [p.read_text().strip() for pattern in patterns for p in sorted(RESULTS.glob(pattern))]
        found[section] = "\n\n".join(tables) if tables else "Not measured yet."
    found["summary"] = summary()
    return found


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; fail if a section is out of date")
    args = parser.parse_args(argv)
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    rendered, stale = set(), []
    for section, body in bodies().items():
        for page in pages:
            text = page.read_text()
            if f"<!-- {section}:start -->" not in text:
                continue
            new = render(text, section, body)
            rendered.add(section)
            if new != text:
                stale.append(f"{page.relative_to(ROOT)} ({section})")
                if not args.check:
                    page.write_text(new)
    missing = sorted((set(SECTIONS) | {"summary"}) - rendered)
    if missing:
        raise SystemExit(f"no page has the markers of: {', '.join(missing)}")
    if args.check and stale:
        raise SystemExit("out of date with benchmarks/results: " + ", ".join(stale) +
                         "; run python benchmarks/render_readme.py")
    print(("checked: " if args.check else "rendered: ") + ", ".join(sorted(rendered)))


if __name__ == "__main__":
    main()
