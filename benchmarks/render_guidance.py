"""Render the guidance sweep's results (benchmarks/guidance_sweep.py) as tables, one file per task.

    python benchmarks/render_guidance.py            # writes benchmarks/results/guidance_cpu/<task>/guidance.md
    python benchmarks/render_guidance.py --check    # changes nothing; fails if a file is out of date

Everything in the tables is read from ``sweep.json`` and the ``results.json`` of each run it lists; a phase the
sweep has not reached yet is said to be missing. benchmarks/render_readme.py then puts the files into
docs/guidance.md (section ``guidance``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = ROOT / "benchmarks" / "results" / "guidance_cpu"
TASKS = {
    "lm": {"title": "Language modelling: WikiText-2 GPT with frozen pretrained embeddings (the papers' protocol, "
                    "on a CPU)", "reported": "test_perplexity", "unit": "test PPL", "target": "within 5% of the "
                    "tuned baseline's test PPL", "within": lambda koala, base: koala <= 1.05 * base, "chance": None},
    "digits": {"title": "Vision from scratch: the handwritten digits as CIFAR-10 archives", "reported": "test_top1_error",
               "unit": "final test error (%)", "target": "within 1 point of SGD's final test error",
               "within": lambda koala, base: koala <= base + 1.0, "chance": 90.0},
}
NAMES = {"adamw": "AdamW", "sgd": "SGD (momentum)", "koala++": "KOALA++", "koala-v": "KOALA-V", "koala-m": "KOALA-M"}
NOISES = {"second_moment": "E1a", "variance": "E1b", "none": "E1c"}
RANGE = 0.05  # an lr "worked" when its score is within 5% of the best of its variant and schedule
# A task's "chance": the score of guessing (one of the digits' ten classes: 90% error). A run scoring that or worse
# learned nothing, and a line whose best run did so has no lr that worked: "within 5% of the best" would name all.


def variant(run: dict) -> str:
    noise = run.get("noise")
    return NAMES[run["optimizer"]] + (f" {NOISES[noise]}" if noise else "")


def reported(run: dict, task: str) -> float:
    value = json.loads((ROOT / run["path"]).read_text()).get(TASKS[task]["reported"])
    return value if value is not None and math.isfinite(value) else math.inf


def learned(score: float, task: str) -> bool:
    """Whether a run did better than guessing (always, for a task without a chance level)."""
    chance = TASKS[task]["chance"]
    return math.isfinite(score) and (chance is None or score < chance)


def best_run(runs) -> dict:
    """The lowest score; ties go to the smaller lr, so every table names the same run."""
    return min(runs, key=lambda r: (r["score"], r["learning_rate"]))


def number(value: float) -> str:
    return "diverged" if not math.isfinite(value) else f"{value:.1f}"


def failure(task: str) -> str:
    """Why a line has no lr that worked: every run diverged, or none beat guessing."""
    chance = TASKS[task]["chance"]
    return "every run diverged" if chance is None else f"no run did better than guessing ({chance:g}% error)"


def gap_to(value: float, base: float, task: str) -> str:
    """A KOALA figure against its baseline's: relative for perplexity, in points for an error rate."""
    return f"{100 * (value / base - 1):+.1f}%" if task == "lm" else f"{value - base:+.1f} points"


def grid_table(runs: list[dict], task: str, schedule: str) -> list[str]:
    """One row per variant: every lr tried with its score, the lrs that worked, the best and what it reports."""
    rows = [r for r in runs if r["phase"] == "grid" and r["schedule"] == schedule]
    if not rows:
        return [f"*{schedule}: not run yet.*"]
    baselines = [r for r in rows if r["optimizer"] in ("adamw", "sgd")]
    baseline = best_run(baselines) if baselines else None
    base = reported(baseline, task) if baseline else None
    lines = [f"| {schedule} | lr tried: score | lr that worked (score within 5% of the best) | best lr | "
             f"{TASKS[task]['unit']} | against {variant(baseline) if baseline else 'the baseline'} |", "|---|---|---|---|---|---|"]
    for name in dict.fromkeys(variant(r) for r in rows):
        tried = sorted((r for r in rows if variant(r) == name), key=lambda r: r["learning_rate"])
        best = best_run(tried)
        scores = ", ".join(f"{r['learning_rate']:.3g}: {number(r['score'])}" for r in tried)
        if not learned(best["score"], task):
            lines.append(f"| {name} | {scores} | none: {failure(task)} | | | |")
            continue
        worked = [r["learning_rate"] for r in tried if r["score"] <= (1 + RANGE) * best["score"]]
        value = reported(best, task)
        gap = "" if base is None or best is baseline else gap_to(value, base, task)
        lines.append(f"| {name} | {scores} | "
                     f"{', '.join(f'{lr:.3g}' for lr in worked)} | {best['learning_rate']:.3g} | {number(value)} | {gap} |")
    return lines


def start_here(runs: list[dict], task: str) -> list[str]:
    """Per variant, its best grid run over every schedule tried, against the baseline's best under that schedule."""
    grid = [r for r in runs if r["phase"] == "grid"]
    lines = [f"| start here | schedule | lr | {TASKS[task]['unit']} | the baseline's, same schedule | gap |",
             "|---|---|---|---|---|---|"]
    for name in dict.fromkeys(variant(r) for r in grid):
        best = best_run(r for r in grid if variant(r) == name)
        if not learned(best["score"], task):
            lines.append(f"| {name} | every schedule tried | none | {failure(task)} | | |")
            continue
        baselines = [r for r in grid if r["schedule"] == best["schedule"] and r["optimizer"] in ("adamw", "sgd")]
        base = best_run(baselines) if baselines else None
        value, base_value = reported(best, task), reported(base, task) if base else math.nan
        gap = "" if base is None or best is base else gap_to(value, base_value, task)
        lines.append(f"| {name} | {best['schedule']} | {best['learning_rate']:.3g} | {number(value)} | "
                     f"{'' if base is None else f'{variant(base)} {number(base_value)}'} | {gap} |")
    return lines


def changed(run: dict) -> str:
    """The prior's settings a run changed from the default (sigma, q), e.g. ``sigma 0.3``; empty if none."""
    return ", ".join(f"{k} {run[k]:g}" for k in ("sigma", "q") if k in run)


def sigma_q_table(runs: list[dict], task: str) -> list[str]:
    rows = [r for r in runs if r["phase"] == "sigma_q"]
    if not rows:
        return ["*sigma and q: not run yet.*"]
    lines = [f"| setting | {TASKS[task]['unit']} | score |", "|---|---|---|"]
    for r in rows:
        lines.append(f"| {variant(r)}, lr {r['learning_rate']:.3g}, {r['schedule']}, {changed(r)} | "
                     f"{number(reported(r, task))} | {number(r['score'])} |")
    return lines


def seeds_table(runs: list[dict], task: str) -> list[str]:
    rows = [r for r in runs if r["phase"] == "seeds"]
    if not rows:
        return ["*Seeds: not run yet (the verdict below needs them).*"]
    groups: dict = {}
    for r in rows:
        groups.setdefault((variant(r), r["learning_rate"], r["schedule"], r["epochs"], changed(r)), []).append(r)
    lines = [f"| setting | seeds | {TASKS[task]['unit']}: mean +- sd |", "|---|---|---|"]
    means = {}
    for (name, lr, schedule, epochs, prior), members in groups.items():
        values = [reported(r, task) for r in members]
        mean, sd = statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)
        setting = f"lr {lr:.3g}, {schedule}" + (f", {prior}" if prior else "")
        means[f"{name} ({setting})"] = (mean, sd, len(values))
        lines.append(f"| {name}, {setting}, {epochs} epochs | {', '.join(str(r['seed']) for r in members)} | "
                     f"{number(mean)} +- {sd:.1f} |")
    return lines + ["", verdict(means, task)]


def verdict(means: dict, task: str) -> str:
    koala = {k: v for k, v in means.items() if k.startswith("KOALA")}
    base = {k: v for k, v in means.items() if not k.startswith("KOALA")}
    if not koala or not base:
        return "*Verdict: both seeded settings are needed.*"
    k_name, (k_mean, k_sd, _) = min(koala.items(), key=lambda item: item[1][0])
    b_name, (b_mean, b_sd, _) = min(base.items(), key=lambda item: item[1][0])
    reached = TASKS[task]["within"](k_mean, b_mean)
    return (f"**Verdict.** Target: {TASKS[task]['target']}. The best KOALA setting, {k_name}, "
            f"{'reaches' if reached else 'does not reach'} it: {k_mean:.1f} +- {k_sd:.1f} against "
            f"{b_mean:.1f} +- {b_sd:.1f} for {b_name} ({gap_to(k_mean, b_mean, task)}; means and sample sd over the seeds).")


def provenance(runs: list[dict], task: str) -> str:
    results = [json.loads((ROOT / r["path"]).read_text()) for r in runs]
    dates = sorted(r["date"] for r in results)
    devices = sorted({r["device"] for r in results})
    sources = [r["reused_from"] for r in runs if r.get("reused_from")]
    earlier = sum(1 for s in sources if s.startswith("benchmarks/results/wikitext2_paper_protocol"))
    reuse = "".join(
        f", {count} {what}" for count, what in (
            (earlier, "reused from the earlier protocol benchmark"),
            (len(sources) - earlier, "seed-42 repeats that are their grid runs, reused")) if count)
    return (f"Measured with `python benchmarks/guidance_sweep.py --task {task}` on {', '.join(devices)}, "
            f"{dates[0]} to {dates[-1]} ({len(runs)} runs{reuse}; "
            f"each run's own command is in its `results.json` under `benchmarks/results/guidance_cpu/{task}/`).")


def render(task: str, sweep: dict) -> str:
    runs = sweep["runs"]
    lines = [f"### {TASKS[task]['title']}", "", provenance(runs, task), "",
             f"Runs are selected by {sweep['selected_by']}; the tables report {TASKS[task]['unit']}. "
             f"A score of `diverged` is a run that did not finish with a finite loss.", ""]
    for model in dict.fromkeys(r["model"] for r in runs):
        model_runs = [r for r in runs if r["model"] == model]
        lines += [f"#### {model}", "", "Each variant's best setting over the schedules tried (one seed):", ""]
        lines += start_here(model_runs, task) + ["", "Every run, by schedule:", ""]
        for schedule in sweep["schedules"]:
            lines += grid_table(model_runs, task, schedule) + [""]
        lines += ["Around the best KOALA++ setting:", ""] + sigma_q_table(model_runs, task) + [""]
        lines += seeds_table(model_runs, task) + [""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; fail if a file is out of date")
    args = parser.parse_args(argv)
    stale = []
    for task in TASKS:
        source = SWEEPS / task / "sweep.json"
        if not source.exists():
            continue
        target = source.with_name("guidance.md")
        text = render(task, json.loads(source.read_text()))
        if not target.exists() or target.read_text() != text:
            stale.append(str(target.relative_to(ROOT)))
            if not args.check:
                target.write_text(text)
    if args.check and stale:
        raise SystemExit(f"out of date with the sweep: {', '.join(stale)}; run python benchmarks/render_guidance.py")
    print(("checked" if args.check else "rendered") + (f": {', '.join(stale)} changed" if stale and not args.check else ""))


if __name__ == "__main__":
    main()
