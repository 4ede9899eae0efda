"""Share a recipe's run on the Hugging Face Hub: the folder users load, with a model card.

    python -m koala_hf.hub prepare runs/koala                         # writes runs/koala/hub, no network
    python -m koala_hf.hub push runs/koala --hub_model_id me/gpt-koala [--hub_private_repo] [--hub_token T]

``prepare`` assembles what a pushed repository holds: weights (safetensors) and
config in the format users load (``AutoModelForCausalLM`` and the tokenizer for
the language model; ``timm.create_model("hf-hub:<id>", pretrained=True)`` for
vision models, after ``import koala_hf.vision``), ``results.json``,
``curves.png`` and a model card rendered from ``koala_hf/model_cards/template.md``.
``push`` uploads it with ``huggingface_hub`` (token from ``--hub_token``,
``HF_TOKEN`` or ``huggingface-cli login``). The recipes do both after training
when given ``--push_to_hub``.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData

from koala_hf.recipe_support.results import load_results, schema

TEMPLATE = Path(__file__).resolve().parent / "model_cards" / "template.md"  # shipped in the wheel
TITLES = {
    "koala++": "KOALA++", "koala++ns": "KOALA++ (NS)", "koala-v": "KOALA-V", "koala-m": "KOALA-M",
    "adamw": "AdamW", "adam": "Adam", "sgd": "SGD",
}
DATASET_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "imagenet32": "ImageNet32"}
LM_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json")


def recipe_script(results: dict) -> Path | None:
    """The recipe script a run's command names (``python recipes/<script>.py ...``), where it exists from the
    current directory (a checkout's root, as the command was recorded); ``None`` otherwise."""
    script = Path(shlex.split(results["command"])[1])
    return script if script.name == Path(schema(results["task"]).recipe).name and script.is_file() else None


def prepare(run_dir: str | Path, output: str | Path | None = None, repo_id: str | None = None,
            recipe: str | Path | None = None) -> Path:
    """Write the push folder for ``run_dir`` (default ``run_dir/hub``); return it.

    ``recipe``: the recipe script to push beside the model (the recipes pass their own file), so that the card's
    reproduction runs from the repository alone; by default the one the run's command names, when it is found
    from the current directory. Without it the card says to run it from a checkout.
    """
    run_dir = Path(run_dir)
    try:
        results = load_results(run_dir)
    except ValueError as error:
        raise ValueError(f"{run_dir}: {error}") from None
    output = Path(output) if output else run_dir / "hub"
    output.mkdir(parents=True, exist_ok=True)
    if results["task"] == "wikitext2_gpt":
        missing = [name for name in LM_FILES[:3] if not (run_dir / name).exists()]
        if missing:
            raise FileNotFoundError(f"{run_dir} lacks {', '.join(missing)}: was the model saved?")
        for name in LM_FILES:
            if (run_dir / name).exists():
                shutil.copy2(run_dir / name, output / name)
    else:  # timm_vision (load_results knows no other task)
        _export_timm(run_dir, results, output)
    for name in ("results.json", "curves.png"):
        if (run_dir / name).exists():
            shutil.copy2(run_dir / name, output / name)
    script = Path(recipe) if recipe is not None else recipe_script(results)
    if script is not None:
        (output / "recipe").mkdir(exist_ok=True)
        shutil.copy2(script, output / "recipe" / Path(schema(results["task"]).recipe).name)
    model_card(results, repo_id or f"koala-hf/{run_dir.resolve().name}", script is not None).save(output / "README.md")
    return output


def _export_timm(run_dir: Path, results: dict, output: Path) -> None:
    """The recipe's ``ImageClassifier`` weights as a timm model saved the way timm's Hub loader reads it."""
    from safetensors.torch import load_file
    from timm.models import save_for_hf

    from koala_hf.vision import create_model

    state = load_file(run_dir / "model.safetensors")
    model = create_model(results["model"], num_classes=results["num_classes"])
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    save_for_hf(model, str(output), safe_serialization=True)


def _plural(count: int, noun: str, plural: str | None = None) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {plural or noun + 's'}"


def _epochs_text(value) -> str:
    return str(value) if value is not None else "?"


def model_card(results: dict, repo_id: str, recipe_shipped: bool = True) -> ModelCard:
    """The model card of a run: Hub metadata (tags, datasets, model-index) and how it was trained.

    It states only what ``results.json`` records: the data's real source (a Hub
    dataset, or a local folder), the splits as they were used, every optimizer
    hyperparameter, and a reproduction from the files pushed with the card.
    """
    optimizer = results["optimizer"]
    title = TITLES.get(optimizer, optimizer)
    hyperparameters = results.get("hyperparameters") or {
        **results["optimizer_kwargs"], "lr": results["learning_rate"], "weight_decay": results["weight_decay"]}
    common_tags = ["koala-hf", "kalman-filter-optimizer", optimizer, title]
    if results["task"] == "wikitext2_gpt":
        model = results["model"]
        data = results["data"]
        hub_dataset = data.get("hub_dataset", "Salesforce/wikitext" if "/" in data["source"] else None)
        halved = data["halve_test_split"]
        test_split = "test (second half of test.txt)" if halved else "test"
        validation_split = "test (first half of test.txt)" if halved else "validation"
        dataset_name = "WikiText-2" if hub_dataset else f"WikiText-2 (local files, {data['source']})"
        evals = [("perplexity", "Test perplexity", results["test_perplexity"], test_split)]
        if results.get("best_validation_perplexity") is not None:
            evals.append(("perplexity", "Best validation perplexity", results["best_validation_perplexity"], validation_split))
        card_data = ModelCardData(
            library_name="transformers", pipeline_tag="text-generation", model_name=repo_id,
            tags=common_tags + ["wikitext-2", "causal-lm"], datasets=[hub_dataset] if hub_dataset else None,
            eval_results=[EvalResult(task_type="text-generation", dataset_type=hub_dataset or "wikitext",
                                     dataset_name=dataset_name, dataset_config="wikitext-2-v1", dataset_split=s,
                                     metric_type=t, metric_name=n, metric_value=v) for t, n, v, s in evals],
        )
        layers = _plural(model["n_layer"], "layer")
        architecture = model.get("architecture", "GPT2LMHeadModel")
        details = dict(
            summary=f"A GPT-style decoder ({layers}, width {model['n_embd']}, {_plural(model['n_head'], 'head')}, "
                    f"context {model['block_size']}) trained on WikiText-2 for language modelling.",
            model_description=f"`{architecture}`, {layers} x {model['n_embd']}, {_plural(model['n_head'], 'head')}, "
                              f"context {model['block_size']}, vocabulary of {model['vocab_size']:,}"
                              + _embeddings_text(model),
            parameters=model["parameters"],
            data_description=_lm_data(data),
            schedule=f"{results['lr_scheduler']}",
            metrics=[("test perplexity", f"{results['test_perplexity']:.2f}"),
                     ("best validation perplexity", _fmt(results.get("best_validation_perplexity"))),
                     ("tokens / s (training)", _fmt(results.get("tokens_per_second"), "{:,.0f}"))],
            load_snippet=(f'from transformers import AutoModelForCausalLM, AutoTokenizer\n\n'
                          f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")\n'
                          f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")\n'
                          f'ids = tokenizer("The meaning of", return_tensors="pt")\n'
                          f'print(tokenizer.decode(model.generate(**ids, max_new_tokens=20)[0]))'),
            limitations="A small research model: WikiText-2 text only (Wikipedia articles), no safety "
                        "tuning; words outside its vocabulary become `<unk>`. Not for production text generation.",
            recipe=schema("wikitext2_gpt").recipe,
            data_flag="a folder with WikiText-2's `train.txt`/`valid.txt`/`test.txt`",
        )
    else:
        dataset = results["dataset"]
        hub_dataset = results.get("hub_dataset")
        source = results.get("data_source") or (f"Hub: {hub_dataset}" if hub_dataset else "a local folder")
        pretty = DATASET_NAMES.get(dataset, dataset)
        dataset_name = pretty if hub_dataset else f"{pretty} format, local files ({source})"
        evals = [("top1_error", "Top-1 error (%)", results["test_top1_error"]),
                 ("top5_error", "Top-5 error (%)", results["test_top5_error"])]
        card_data = ModelCardData(
            library_name="timm", pipeline_tag="image-classification", model_name=repo_id,
            tags=common_tags + ["image-classification", "timm", results["model"], dataset],
            datasets=[hub_dataset] if hub_dataset else None,
            eval_results=[EvalResult(task_type="image-classification", dataset_type=hub_dataset or dataset,
                                     dataset_name=dataset_name, dataset_split="test", metric_type=t, metric_name=n,
                                     metric_value=v) for t, n, v in evals],
        )
        details = dict(
            summary=f"timm `{results['model']}` (32x32 stem) trained from scratch on {dataset_name}.",
            model_description=f"timm `{results['model']}` registered by `koala_hf.vision` (CIFAR stem for 32x32 inputs)",
            parameters=results["parameters"],
            data_description=f"{dataset_name}: {results['train_samples']:,} training and {results['test_samples']:,} "
                             f"test images; {results['augmentation']}",
            schedule=results["schedule"],
            metrics=[("top-1 error (%)", f"{results['test_top1_error']:.2f}"),
                     ("top-5 error (%)", f"{results['test_top5_error']:.2f}"),
                     ("images / s (training)", _fmt(results.get("images_per_second"), "{:,.0f}"))],
            load_snippet=(f'import timm\nimport koala_hf.vision  # registers the 32x32 architectures\n\n'
                          f'model = timm.create_model("hf-hub:{repo_id}", pretrained=True).eval()\n'
                          f'config = timm.data.resolve_data_config({{}}, model=model)  # 32x32, CIFAR normalisation'),
            limitations=f"Trained on 32x32 {pretty} images; expects 32x32 inputs normalised as in its "
                        "`pretrained_cfg`. Not for other resolutions or domains without fine-tuning.",
            recipe=schema("timm_vision").recipe,
            data_flag=f"a folder with the original {pretty} archives",
        )
    data_flag = details.pop("data_flag")
    epochs = [e for e in results["epochs"] if e.get("seconds")]
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        model_name=repo_id,
        optimizer=optimizer,
        optimizer_title=title,
        hyperparameters=sorted(hyperparameters.items()),
        preset=results["preset"],
        epochs=_epochs_text(results.get("num_epochs")),
        steps=results.get("steps"),
        batch_size=results["batch_size"],
        seed=results["seed"],
        device=results["device"],
        launch=_launch_text(results),
        date=results["date"],
        seconds_per_epoch=results.get("seconds_per_epoch") or 0.0,
        total_minutes=sum(e["seconds"] for e in epochs) / 60,
        command=results["command"],
        reproduce=reproduction(results, repo_id, data_flag, recipe_shipped),
        **details,
    )


def _embeddings_text(model: dict) -> str:
    source = f" from `{model['embeddings_from']}`" if model.get("embeddings_from") else ""
    if model.get("frozen_embeddings"):
        return (f"; token and position embeddings{source}, frozen (the output layer is tied to them): "
                f"{model.get('trainable_parameters', 0):,} trainable parameters")
    return f"; embeddings initialised{source}" if source else ""


def _launch_text(results: dict) -> str:
    launched = results.get("launcher", "python")
    processes = results.get("processes", 1)
    precision = results.get("mixed_precision", "no")
    return f"{launched}, {_plural(processes, 'process', 'processes')}, mixed precision: {precision}"


# Each recipe's page in the docs (docs/recipes.md; tests/test_hub.py checks that the anchors exist).
RECIPE_DOCS = {"wikitext2_gpt.py": "docs/recipes.md#wikitext-2-gpt-recipeswikitext2_gptpy",
               "timm_vision.py": "docs/recipes.md#timm-vision-recipestimm_visionpy"}


def reproduction(results: dict, repo_id: str, data_flag: str, recipe_shipped: bool = True) -> str:
    """Shell lines that rerun the run from what the Hub repository holds (its ``recipe/`` folder), or, when the
    card was prepared without the recipe scripts at hand, from a checkout of koala_hf's source."""
    args = shlex.split(results["command"])[2:]  # drop "python recipes/<script>.py"
    script = Path(shlex.split(results["command"])[1]).name
    kept, skip = [], False
    local_data = False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg in ("--output_dir", "--data_dir", "--resume_from_checkpoint"):
            local_data |= arg == "--data_dir"
            skip = True
            continue
        if arg.startswith(("--output_dir=", "--data_dir=", "--resume_from_checkpoint=")):
            local_data |= arg.startswith("--data_dir=")
            continue
        kept.append(arg)
    if local_data:
        kept += ["--data_dir", "DATA_DIR"]
    kept += ["--output_dir", "rerun"]
    install = ("# koala_hf is not on PyPI yet: in a checkout of its source, pip install '.[recipes]' "
               "(once published: pip install 'koala_hf[recipes]')")
    if recipe_shipped:
        lines = [
            install,
            f'hf download {repo_id} --include "recipe/*" --local-dir {repo_id.split("/")[-1]}',
            f'cd {repo_id.split("/")[-1]}',
            shlex.join(["python", f"recipe/{script}"] + kept),
        ]
    else:
        lines = ["# in a checkout of the koala_hf source repository:", "pip install '.[recipes]'",
                 shlex.join(["python", f"recipes/{script}"] + kept)]
    if local_data:
        lines.insert(0, f"# DATA_DIR: {data_flag} (the run read a local copy; without --data_dir the recipe loads the Hub's)")
    lines.insert(0, f"# the recipe and its options: {RECIPE_DOCS[script]} in koala_hf's source (its docs site: Recipes)")
    return "\n".join(lines)


def _lm_data(data: dict) -> str:
    if data["halve_test_split"]:
        split = (f"trained on the {data['train_split']} text, validated on the first half of the test text, "
                 "tested on its second half")
    else:
        split = f"trained on the {data['train_split']} split, validated on validation, tested on test"
    return (f"WikiText-2 (classic tokenised release) from `{data['source']}`: {split}; "
            f"{data['train_blocks']:,} training blocks")


def _fmt(value, pattern: str = "{:.2f}") -> str:
    return "-" if value is None else pattern.format(value)


def push(folder: str | Path, repo_id: str, private: bool | None = None, token: str | None = None) -> str:
    """Create ``repo_id`` if needed and upload ``folder``; return the commit URL."""
    folder = Path(folder)
    if not (folder / "README.md").exists():
        raise FileNotFoundError(f"{folder} has no model card: run `python -m koala_hf.hub prepare` first")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                               commit_message="Upload a koala_hf recipe run")
    return str(getattr(commit, "commit_url", commit))


def prepare_and_push(run_dir, repo_id: str, private: bool | None = None, token: str | None = None,
                     recipe: str | Path | None = None) -> str:
    return push(prepare(run_dir, repo_id=repo_id, recipe=recipe), repo_id, private=private, token=token)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="write the push folder and model card, without pushing")
    prep.add_argument("run_dir")
    prep.add_argument("--output", default=None, help="default: RUN_DIR/hub")
    prep.add_argument("--hub_model_id", default=None, help="the repository id the card names")
    prep.add_argument("--recipe", default=None, help="the recipe script to push beside the model (default: the "
                                                    "one the run's command names, from the current directory)")
    up = commands.add_parser("push", help="prepare (if needed) and push a run folder")
    up.add_argument("run_dir")
    up.add_argument("--hub_model_id", required=True)
    up.add_argument("--hub_private_repo", action="store_true")
    up.add_argument("--hub_token", default=None)
    args = parser.parse_args(argv)
    if args.command == "prepare":
        print(prepare(args.run_dir, args.output, args.hub_model_id, args.recipe))
    else:
        print(prepare_and_push(args.run_dir, args.hub_model_id, args.hub_private_repo or None, args.hub_token))


if __name__ == "__main__":
    main()
