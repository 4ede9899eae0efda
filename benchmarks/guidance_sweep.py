"""How to set KOALA: every variant under the schedules Trainer users run, against the tuned baselines.

    nice python benchmarks/guidance_sweep.py --task lm          # the LM part, about 4 h on 2 CPU cores
    nice python benchmarks/guidance_sweep.py --task digits      # the digits part, about 15 to 20 h on 2 CPU cores
    python benchmarks/guidance_sweep.py --task lm --epochs 1 --max_train_blocks 32 --output /tmp/sweep  # a check

Times measured on a 2-core x86_64 CPU, each run alone: a 4-epoch LM run about 2.6 min and a 12-epoch one 8 to
10 min (60 grid and sigma/q runs, 9 seeded). On the digits (benchmarks/results/digits_cpu), MobileNetV3-Large
takes 9 to 11 s per epoch with AdamW and KOALA++ (SGD's run 26 s): 5 min for 30 epochs, over 48 to 72 grid, 4
sigma/q and 9 seeded runs; ResNet-18 about 37 s per epoch, 25 min for 40 epochs, over 12 to 18 grid, 4 sigma/q
and 6 seeded runs, most of the total. Run one task at a time: two runs sharing two cores each take many
times longer (a MobileNetV3 run beside an LM run took 57 min).

Every run is a recipe run, trained the same way within a task; only the optimizer, its lr and the schedule
change. Schedules (``SCHEDULES``): constant (the papers'), linear decay to 0 (``transformers.Trainer``'s default)
and cosine with 5% linear warm-up.

- ``lm``: ``recipes/wikitext2_gpt.py --preset paper_cpu`` with frozen pretrained embeddings (the protocol of
  benchmarks/wikitext2_paper_protocol.py: trained on WikiText-2's valid.txt, validated and tested on the two
  halves of test.txt, 600 chunks each), 4 epochs. Selected by best validation perplexity; test perplexity
  reported.
- ``digits``: ``recipes/timm_vision.py --preset koala_cifar10`` on scikit-learn's handwritten digits written as
  CIFAR-10 archives (benchmarks/digits_vision.py), MobileNetV3-Large for 30 epochs; ResNet-18 for 40 with
  SGD and KOALA++ only. The digits have no validation split: runs are compared by final test error (360
  images), which is also what is reported, so a best setting there is chosen on the figure it reports.

Per task and schedule the grid (``GRIDS``): the tuned baseline(s), KOALA++ with E1a (``second_moment``) and
E1c (``none``) at three lrs bracketing the best constant-lr setting of the earlier benchmarks, KOALA-V and
KOALA-M at their default lr and three more. Where a KOALA line's best lr is the edge of its grid, the line
goes on past that edge by factors of 3 (``next_lr``, at most ``EXTEND`` more runs) until the best is interior. Then, at the best KOALA++ setting: sigma and q at three values
each (``SIGMA_Q``). Then the best KOALA++, the best KOALA setting of any variant (when another leads) and the
best baseline at three seeds (``SEEDS``; 12 epochs for the LM).

Every run is skipped when its results.json is there (an interrupted sweep resumes). A constant-lr LM run of
benchmarks/wikitext2_paper_protocol.py with the same settings, and on the digits a seeded setting's seed-42
run (as long as its grid run), are reused rather than trained again (the results.json is copied, its own
command kept, and ``reused_from.txt`` names it). Writes ``sweep.json`` (every run, and the choices made) in
``--output``; benchmarks/render_guidance.py renders the guidance page from it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL = ROOT / "benchmarks/results/wikitext2_paper_protocol_cpu"
SCHEDULES = {"constant": ("--lr_scheduler_type", "constant"), "linear": ("--lr_scheduler_type", "linear"),
             "cosine": ("--lr_scheduler_type", "cosine", "--warmup_steps", "0.05")}
# task -> model -> ((optimizer, noise or None, learning rates), ...)
GRIDS = {
    "lm": {"gpt": (("adamw", None, (1e-3,)),
                   ("koala++", "second_moment", (0.3, 1.0, 3.0)),
                   ("koala++", "none", (5e-4, 1e-3, 2e-3)),
                   ("koala-v", None, (0.1, 0.3, 1.0, 3.0)),
                   ("koala-m", None, (1.0, 0.3, 3.0, 10.0)))},
    "digits": {"mobilenetv3_large_100_cifar": (("sgd", None, (0.1,)), ("adamw", None, (3e-4,)),
                                               ("koala++", "second_moment", (1.0, 3.0, 10.0)),
                                               ("koala++", "none", (1e-2, 3e-2, 1e-1)),
                                               ("koala-v", None, (0.1, 0.3, 1.0, 3.0)),
                                               ("koala-m", None, (1.0, 3.0, 10.0, 30.0))),
               "resnet18_cifar": (("sgd", None, (0.1,)), ("koala++", "second_moment", (3.0, 10.0, 30.0)))},
}
EPOCHS = {"gpt": 4, "mobilenetv3_large_100_cifar": 30, "resnet18_cifar": 40}
LONG_EPOCHS = {"gpt": 12, "mobilenetv3_large_100_cifar": 30, "resnet18_cifar": 40}
SIGMA_Q = {"sigma": (0.03, 0.3), "q": (0.03, 0.3)}  # besides the default 0.1
SEEDS = (42, 43, 44)
BASELINES = ("adamw", "sgd")
EXTEND = 2  # runs a grid line may add past its edge
CHANCE = {"lm": None, "digits": 90.0}  # the score of guessing (ten classes); a run that scores it learned nothing


def next_lr(scores: dict[float, float], chance: float | None = None) -> float | None:
    """The lr to try next on a grid line (lr -> score, lower is better): a third of the lowest when that is the
    best, three times the highest when that is, else ``None`` (the best is interior, or a line of one lr). The
    extension stops at a run that scored no better: a worse or diverged edge brackets the best, and so does an
    edge that ties an interior lr. A line where every run diverged, or none did better than ``chance``, goes on
    down."""
    if len(scores) < 2:
        return None
    rates = sorted(scores)
    if all(math.isinf(scores[lr]) or (chance is not None and scores[lr] >= chance) for lr in rates):
        return rates[0] / 3
    lowest = min(scores.values())
    best = [lr for lr in rates if scores[lr] == lowest]
    if best == [rates[0]]:
        return rates[0] / 3
    if best == [rates[-1]]:
        return rates[-1] * 3
    return None


def run_name(optimizer: str, noise: str | None, lr: float, **extra) -> str:
    tail = "".join(f"_{k}{v:g}" for k, v in sorted(extra.items()))
    return f"{optimizer}{'_' + noise if noise else ''}_lr{lr:g}{tail}"


def score(result: dict, task: str) -> float:
    """What a run is selected by (lower is better); a run that diverged scores infinity. A vision run whose final
    test loss is not finite diverged too, though its error is a number (what the NaN logits' argmax scores)."""
    value = result.get("best_validation_perplexity") if task == "lm" else result.get("test_top1_error")
    diverged = task != "lm" and not math.isfinite(result.get("test_loss", 0.0))
    return value if value is not None and math.isfinite(value) and not diverged else math.inf


class Sweep:
    def __init__(self, task: str, out: Path, args):
        self.task, self.out, self.args = task, out, args
        self.runs: list[dict] = []

    def command(self, model: str, schedule: str, optimizer: str, noise, lr: float, extra: dict, seed: int,
                epochs: int, output: Path) -> list[str]:
        kwargs = {**({"noise": noise} if noise else {}), **extra}
        common = ["--optimizer", optimizer, "--learning_rate", f"{lr:g}", *SCHEDULES[schedule],
                  "--num_train_epochs", str(epochs), "--seed", str(seed), "--save_strategy", "no",
                  "--disable_tqdm", "true", "--report_to", "none", "--output_dir", os.path.relpath(output, ROOT)]
        if kwargs:
            common += ["--optimizer_kwargs", json.dumps(kwargs)]
        if self.task == "lm":
            pretrain = os.path.relpath(PROTOCOL / "pretrain", ROOT)
            head = ["recipes/wikitext2_gpt.py", "--preset", "paper_cpu", "--data_dir", "recipes/data/wikitext-2",
                    "--train_split", "validation", "--halve_test_split", "true", "--max_eval_blocks", "600",
                    "--embeddings_from", pretrain, "--freeze_embeddings", "true"]
            if self.args.max_train_blocks:
                head += ["--max_train_blocks", str(self.args.max_train_blocks)]
        else:
            head = ["recipes/timm_vision.py", "--preset", "koala_cifar10", "--model", model, "--data_dir",
                    os.path.relpath(self.args.digits, ROOT)]
        return [sys.executable, *head, *common]

    def reused(self, phase, model, schedule, optimizer, noise, lr, extra, seed, epochs) -> Path | None:
        """The same run made before: a seeded setting's seed-42 run when it is as long as the grid's (the digits,
        where ``LONG_EPOCHS`` equals ``EPOCHS``) is its grid or sigma/q run; an LM grid run is the one
        benchmarks/wikitext2_paper_protocol.py made (constant lr, 4 epochs, seed 42)."""
        if phase == "seeds" and seed == 42 and epochs == (self.args.epochs or EPOCHS[model]):
            found = self.out / model / schedule / run_name(optimizer, noise, lr, **extra) / "results.json"
            return found if found.exists() else None
        if self.task != "lm" or schedule != "constant" or extra or seed != 42 or epochs != 4 or self.args.max_train_blocks:
            return None
        found = PROTOCOL / "frozen_pretrained" / run_name(optimizer, noise, lr) / "results.json"
        return found if found.exists() else None

    def run(self, phase: str, model: str, schedule: str, optimizer: str, noise, lr: float, *, seed: int = 42,
            epochs: int | None = None, **extra) -> dict:
        epochs = epochs or self.args.epochs or EPOCHS[model]
        name = run_name(optimizer, noise, lr, **extra) + ("" if seed == 42 else f"_seed{seed}")
        output = self.out / model / schedule / (name if phase != "seeds" else f"long/{name}")
        if not (output / "results.json").exists():
            output.mkdir(parents=True, exist_ok=True)
            earlier = self.reused(phase, model, schedule, optimizer, noise, lr, extra, seed, epochs)
            if earlier is not None:
                shutil.copy(earlier, output / "results.json")
                (output / "reused_from.txt").write_text(os.path.relpath(earlier, ROOT) + "\n")
                print("reused:", earlier, flush=True)
            else:
                command = self.command(model, schedule, optimizer, noise, lr, extra, seed, epochs, output)
                print("$", " ".join(command[1:]), flush=True)
                done = subprocess.run(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"run failed ({' '.join(command[1:])}):\n{done.stderr[-3000:]}")
                for path in output.iterdir():  # keep the measurements, not the weights
                    if path.name not in ("results.json", "curves.png"):
                        shutil.rmtree(path) if path.is_dir() else path.unlink()
        result = json.loads((output / "results.json").read_text())
        entry = {"phase": phase, "model": model, "schedule": schedule, "optimizer": optimizer, "noise": noise,
                 "learning_rate": lr, "seed": seed, "epochs": epochs, **extra, "score": score(result, self.task),
                 "path": os.path.relpath(output / "results.json", ROOT),
                 "reused_from": (output / "reused_from.txt").read_text().strip() if (output / "reused_from.txt").exists() else None}
        self.runs.append(entry)
        self.save()
        return entry

    def best(self, model: str, where) -> dict:
        chosen = [r for r in self.runs if r["model"] == model and r["phase"] != "seeds" and where(r)]
        return min(chosen, key=lambda r: r["score"])

    def save(self, **choices) -> None:
        path = self.out / "sweep.json"
        previous = json.loads(path.read_text()) if path.exists() else {}
        record = {"task": self.task, "schedules": {k: list(v) for k, v in SCHEDULES.items()},
                  "selected_by": "best validation perplexity" if self.task == "lm" else "final test top-1 error",
                  "runs": self.runs, "choices": {**previous.get("choices", {}), **choices}}
        path.write_text(json.dumps(record, indent=1) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(GRIDS), required=True)
    parser.add_argument("--output", default=None, help="default: benchmarks/results/guidance_cpu/<task>")
    parser.add_argument("--epochs", type=int, default=None, help="one length for every run (a quick check)")
    parser.add_argument("--max_train_blocks", type=int, default=None, help="LM: fewer training chunks (a check)")
    parser.add_argument("--models", nargs="+", default=None, help="a subset of the task's models")
    parser.add_argument("--phases", nargs="+", default=["grid", "sigma_q", "seeds"], choices=["grid", "sigma_q", "seeds"])
    parser.add_argument("--digits", type=Path, default=ROOT / "data/digits", help="the digits archive (written if missing)")
    args = parser.parse_args(argv)
    out = Path(args.output or f"benchmarks/results/guidance_cpu/{args.task}")
    out = out if out.is_absolute() else ROOT / out
    out.mkdir(parents=True, exist_ok=True)
    if args.task == "digits":
        from koala_hf.recipe_support.archives import FOLDER, write_digits

        if not (args.digits / FOLDER / "test_batch").exists():
            write_digits(args.digits)
    sweep = Sweep(args.task, out, args)
    for model, grid in GRIDS[args.task].items():
        if args.models and model not in args.models:
            continue
        for schedule in SCHEDULES:
            for optimizer, noise, rates in grid:
                scores = {lr: sweep.run("grid", model, schedule, optimizer, noise, lr)["score"] for lr in rates}
                for _ in range(EXTEND if optimizer not in BASELINES else 0):
                    lr = next_lr(scores, CHANCE[args.task])
                    if lr is None:
                        break
                    scores[lr] = sweep.run("grid", model, schedule, optimizer, noise, lr)["score"]
        is_koala = lambda r: r["optimizer"] == "koala++"  # noqa: E731
        best = sweep.best(model, is_koala)
        if "sigma_q" in args.phases:
            for name, values in SIGMA_Q.items():
                for value in values:
                    sweep.run("sigma_q", model, best["schedule"], "koala++", best["noise"], best["learning_rate"],
                              **{name: value})
        if "seeds" not in args.phases:
            continue
        koala = sweep.best(model, is_koala)
        any_koala = sweep.best(model, lambda r: r["optimizer"] not in BASELINES)  # KOALA-V or -M may lead
        baseline = sweep.best(model, lambda r: r["optimizer"] in BASELINES)
        sweep.save(**{model: {"best_koala": koala["path"], "best_any_koala": any_koala["path"],
                              "best_baseline": baseline["path"]}})
        for chosen in (koala, *([any_koala] if any_koala is not koala else []), baseline):
            extra = {k: chosen[k] for k in SIGMA_Q if k in chosen}
            for seed in SEEDS:
                sweep.run("seeds", model, chosen["schedule"], chosen["optimizer"], chosen["noise"],
                          chosen["learning_rate"], seed=seed, epochs=args.epochs or LONG_EPOCHS[model], **extra)
    print(f"wrote {out / 'sweep.json'}")


if __name__ == "__main__":
    main()
