"""GPT-style language modelling on WikiText-2 with KOALA++ and its baselines.

    python recipes/wikitext2_gpt.py --preset smoke --optimizer koala++ --output_dir runs/smoke-koala
    accelerate launch recipes/wikitext2_gpt.py --preset paper --optimizer adamw --output_dir runs/paper-adamw

Data: the Hub's WikiText-2 through ``datasets`` (default), or ``--data_dir`` with
``train.txt`` / ``valid.txt`` / ``test.txt`` in the classic tokenised format, or
with the Hub's parquet files. Without a training text (as in the copy kept in
``recipes/data/wikitext-2``) train on the validation text and halve the test
text: ``--train_split validation --halve_test_split``.

Tokenizer: a word-level vocabulary built from the training text (the classic
setting), saved with the model; or ``--tokenizer_name`` for any tokenizer.

Every optimizer runs with its papers' settings (``OPTIMIZER_SETTINGS``), the
same data order, schedule and seed. Outputs in ``--output_dir``: the model and
tokenizer of the best-validation epoch, ``results.json`` (validation perplexity
per epoch, test perplexity of the best-validation model, tokens/s, seconds per
epoch, the command, device and date) and ``curves.png``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from koala_hf.recipe_support.extras import require_extras  # noqa: E402

require_extras("datasets", "matplotlib", extra="recipes")

import torch  # noqa: E402
from datasets import DatasetDict, load_dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    OpenAIGPTConfig,
    OpenAIGPTLMHeadModel,
    HfArgumentParser,
    PreTrainedTokenizerFast,
    default_data_collator,
    set_seed,
)

from koala_hf.recipe_support.arguments import explicitly_given, RecipeTrainingArguments  # noqa: E402
from koala_hf.recipe_support.history import epoch_table, perplexity, run_record, RunHistory, train_losses  # noqa: E402
from koala_hf.recipe_support.machine import require_hub, use_the_machines_cores  # noqa: E402
from koala_hf.recipe_support.optimizers import all_hyperparameters, canonical_optimizer_name, OPTIMIZER_CHOICES, parse_optimizer_kwargs  # noqa: E402
from koala_hf.recipe_support.plots import plot_curves  # noqa: E402
from koala_hf.recipe_support.results import provenance, record, write_results  # noqa: E402

from koala_hf import KoalaTrainer  # noqa: E402
from koala_hf.hub import prepare_and_push  # noqa: E402

# Model, data layout and schedule per preset.
# "paper" is the papers' WikiText-2 run (spec, "What the papers' WikiText-2 run actually was"): GPT-1's
# post-LayerNorm blocks with GPT-1's pretrained token and position embeddings, frozen, the output layer tied
# to them; consecutive (context + 1)-token chunks, the last one padded and masked; constant lr, no clipping.
# "paper_cpu" is the same protocol at a size a 2-core CPU trains in minutes (embeddings from --embeddings_from).
# "small" and "smoke" train a GPT-2 from scratch on blocks of the word-level text.
PRESETS = {
    "paper": dict(architecture="openai-gpt", n_layer=4, n_head=12, n_embd=768, block_size=256, batch_size=32,
                  epochs=50, chunks="paper", schedule="constant", clip=False, freeze_embeddings=True,
                  embeddings_from="openai-community/openai-gpt"),
    "paper_cpu": dict(architecture="openai-gpt", n_layer=2, n_head=4, n_embd=128, block_size=64, batch_size=32,
                      epochs=6, chunks="paper", schedule="constant", clip=False),
    "small": dict(architecture="gpt2", n_layer=2, n_head=8, n_embd=256, block_size=128, batch_size=32, epochs=10),
    "smoke": dict(architecture="gpt2", n_layer=1, n_head=2, n_embd=64, block_size=64, batch_size=16, epochs=2,
                  max_train_blocks=320, max_eval_blocks=64),
}

# The papers' settings for this task (spec, "Paper settings"). KOALA-V and KOALA-M keep
# their official defaults; AdamW and SGD use the papers' baseline settings.
OPTIMIZER_SETTINGS = {
    "koala++": dict(lr=2e-3, sigma=0.1, q=0.1, weight_decay=1e-4),
    "koala++ns": dict(lr=2e-3, sigma=0.1, q=0.1, weight_decay=1e-4),
    "koala-v": dict(lr=0.1, sigma=0.1, q=1.0, weight_decay=1e-4),
    "koala-m": dict(lr=1.0, weight_decay=1e-4),
    "adamw": dict(lr=3e-4, weight_decay=5e-4),
    "adam": dict(lr=3e-4, weight_decay=5e-4),
    "sgd": dict(lr=0.1, momentum=0.9, weight_decay=5e-4),
}
# The official language-model scripts (spec): KOALA++ with the noise measurement they effectively ran (E1c),
# AdamW with its script's lr and weight decay.
PAPER_OPTIMIZER_SETTINGS = {
    **OPTIMIZER_SETTINGS,
    "koala++": dict(lr=2e-3, sigma=0.1, q=0.1, weight_decay=1e-4, noise="none"),
    "koala++ns": dict(lr=2e-3, sigma=0.1, q=0.1, weight_decay=1e-4, noise="none"),
    "adamw": dict(lr=1e-5, weight_decay=0.1),
}
ROOT = Path(__file__).resolve().parents[1]  # the repository: commands are recorded from there
LOCAL_FILES = {"train": "train.txt", "validation": "valid.txt", "test": "test.txt"}
EOS = "<eos>"
UNK = "<unk>"
IGNORE_INDEX = -100


@dataclass
class DataArguments:
    dataset_name: str = field(default="Salesforce/wikitext", metadata={"help": "Hub dataset (used without --data_dir)."})
    dataset_config: str = field(default="wikitext-2-v1", metadata={"help": "Hub config: the classic tokenised text."})
    data_dir: str | None = field(
        default=None,
        metadata={"help": "Local folder: train.txt/valid.txt/test.txt (classic format) or the Hub's parquet files."},
    )
    train_split: str = field(default="train", metadata={"help": "Split to train on (train, validation or test)."})
    halve_test_split: bool = field(
        default=False,
        metadata={"help": "Validate on the first half of the test text and test on the second half."},
    )
    max_train_blocks: int | None = field(default=None, metadata={"help": "Keep only this many training blocks."})
    max_eval_blocks: int | None = field(default=None, metadata={"help": "Keep only this many validation/test blocks."})


@dataclass
class ModelArguments:
    preset: str = field(default="small", metadata={"help": f"One of {', '.join(PRESETS)}."})
    optimizer: str = field(default="koala++", metadata={"help": f"One of {', '.join(OPTIMIZER_CHOICES)}."})
    optimizer_kwargs: str | None = field(default=None, metadata={"help": "JSON overriding optimizer settings."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Any tokenizer; default: word level from the training text."})
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    block_size: int | None = field(default=None, metadata={"help": "Context length."})
    embeddings_from: str | None = field(
        default=None,
        metadata={"help": "Hub id or local folder of a checkpoint whose token and position embeddings (and tokenizer) "
                          "the model starts from; the paper preset: openai-community/openai-gpt."},
    )
    freeze_embeddings: bool = field(
        default=False, metadata={"help": "Freeze the token and position embeddings (and so the tied output layer)."}
    )
    trainable_embeddings: bool = field(default=False, metadata={"help": "Train the embeddings even where the preset freezes them."})


def read_splits(data: DataArguments) -> DatasetDict:
    """The three splits as ``text`` datasets (one line per row), from the Hub or a local folder."""
    if data.data_dir is None:
        require_hub(f"Loading {data.dataset_name}/{data.dataset_config}",
                    "Pass --data_dir with train.txt/valid.txt/test.txt or the Hub's parquet files.")
        try:
            raw = load_dataset(data.dataset_name, data.dataset_config)
        except Exception as error:  # offline, or the Hub unreachable
            raise SystemExit(
                f"Could not load {data.dataset_name}/{data.dataset_config} from the Hub ({type(error).__name__}: "
                f"{error}). Offline? Pass --data_dir with train.txt/valid.txt/test.txt or the Hub's parquet files."
            ) from error
    else:
        raw = read_local(Path(data.data_dir))
    if data.train_split not in raw:
        hint = " Without a training text, pass --train_split validation --halve_test_split." if data.train_split == "train" else ""
        where = f"--data_dir {data.data_dir} has no {LOCAL_FILES.get(data.train_split, data.train_split)}" if data.data_dir \
            else f"{data.dataset_name} has no {data.train_split!r} split"
        raise SystemExit(f"{where} to train on (--train_split {data.train_split}).{hint}")
    needed = ["test"] if data.halve_test_split else ["validation", "test"]
    missing = [split for split in needed if split not in raw]
    if missing:
        raise SystemExit(f"--data_dir {data.data_dir} lacks {', '.join(LOCAL_FILES[m] for m in missing)}"
                         + ("" if data.halve_test_split else " (or pass --halve_test_split to validate and test on test.txt)"))
    if data.halve_test_split:
        test = raw["test"]
        half = len(test) // 2
        raw = DatasetDict(train=raw[data.train_split], validation=test.select(range(half)),
                          test=test.select(range(half, len(test))))
    elif data.train_split != "train":
        raw = DatasetDict(train=raw[data.train_split], validation=raw["validation"], test=raw["test"])
    return raw


def read_local(folder: Path) -> DatasetDict:
    if not folder.is_dir():
        raise SystemExit(f"--data_dir {folder} is not a folder")
    text_files = {split: folder / name for split, name in LOCAL_FILES.items() if (folder / name).exists()}
    for path in text_files.values():
        if not path.read_text(encoding="utf-8", errors="replace").strip():
            raise SystemExit(f"{path} is empty or blank: it must hold WikiText-2 text (one paragraph per line)")
    if text_files:
        return load_dataset("text", data_files={k: str(v) for k, v in text_files.items()}, keep_linebreaks=True)
    parquet = {split: sorted(str(p) for p in folder.rglob(f"{split}-*.parquet")) for split in LOCAL_FILES}
    parquet = {split: files for split, files in parquet.items() if files}
    if parquet:
        return load_dataset("parquet", data_files=parquet)
    raise SystemExit(
        f"--data_dir {folder} holds neither {', '.join(LOCAL_FILES.values())} nor the Hub's "
        "<split>-*.parquet files"
    )


def word_level_tokenizer(lines) -> PreTrainedTokenizerFast:
    """The classic WikiText-2 vocabulary: every whitespace-separated word of the training text, plus <eos>."""
    vocabulary = {UNK: 0, EOS: 1}
    for line in lines:
        for word in line.split():
            vocabulary.setdefault(word, len(vocabulary))
    backend = Tokenizer(models.WordLevel(vocab=vocabulary, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=UNK, eos_token=EOS, pad_token=EOS)


def tokenize_lines(lines, tokenizer) -> list[list[int]]:
    """Every non-empty line, followed by the end-of-sequence token when the tokenizer has one."""
    suffix = f" {EOS}" if tokenizer.eos_token == EOS else (tokenizer.eos_token or "")
    texts = [line.strip() + suffix for line in lines if line.strip()]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def paper_chunks(split, tokenizer, block_size: int, limit: int | None):
    """The papers' layout: consecutive chunks of ``block_size + 1`` tokens, inputs ``chunk[:-1]`` and next-token
    targets ``chunk[1:]`` (``shift_labels``); the last chunk is padded and its padding masked (spec)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    size = block_size + 1

    def group(batch):
        ids = [token for row in batch["input_ids"] for token in row]
        out = {"input_ids": [], "attention_mask": [], "labels": [], "shift_labels": []}
        for start in range(0, len(ids), size):
            chunk = ids[start : start + size]
            if len(chunk) < 2:
                continue
            missing = size - len(chunk)
            padded = chunk + [pad] * missing
            out["input_ids"].append(padded[:-1])
            out["attention_mask"].append([1] * (len(chunk) - 1) + [0] * missing)
            out["labels"].append(chunk[:-1] + [IGNORE_INDEX] * missing)  # the model needs labels to return a loss
            out["shift_labels"].append(chunk[1:] + [IGNORE_INDEX] * missing)
        return out

    tokens = split.map(lambda batch: {"input_ids": tokenize_lines(batch["text"], tokenizer)}, batched=True,
                       remove_columns=split.column_names)
    grouped = tokens.map(group, batched=True, batch_size=None, remove_columns=tokens.column_names)
    return grouped.select(range(min(limit, len(grouped)))) if limit else grouped


def blocks(split, tokenizer, block_size: int, limit: int | None):
    """Every non-empty line plus <eos>, concatenated and cut into blocks of ``block_size`` tokens."""
    tokens = split.map(lambda batch: {"input_ids": tokenize_lines(batch["text"], tokenizer)}, batched=True,
                       remove_columns=split.column_names)

    def group(batch):
        ids = [token for row in batch["input_ids"] for token in row]
        usable = len(ids) // block_size * block_size
        chunks = [ids[i : i + block_size] for i in range(0, usable, block_size)]
        return {"input_ids": chunks, "labels": [list(c) for c in chunks]}

    grouped = tokens.map(group, batched=True, batch_size=100_000, remove_columns=tokens.column_names)
    grouped = grouped.map(lambda batch: {"attention_mask": [[1] * len(ids) for ids in batch["input_ids"]]}, batched=True)
    return grouped.select(range(min(limit, len(grouped)))) if limit else grouped


def require_blocks(splits: dict, block_size: int, data: DataArguments) -> None:
    """Every split must give at least one block: say which text is too short, and what to do."""
    for name, split in splits.items():
        if len(split) == 0:
            source = {"train": data.train_split, "validation": "validation", "test": "test"}[name]
            if data.halve_test_split and name != "train":
                source = "test"
            where = f"{data.data_dir}/{LOCAL_FILES.get(source, source)}" if data.data_dir else f"the {source} split"
            raise SystemExit(f"{where} is too short for the {name} split: it gives no block of {block_size} tokens. "
                             "Use the full WikiText-2 file or a smaller --block_size.")


def build_model(architecture: str, shape: dict, vocab_size: int, tokenizer):
    """A GPT-1 (post-LayerNorm, ``OpenAIGPTLMHeadModel``) or GPT-2 decoder with the output layer tied to the tokens."""
    common = dict(vocab_size=vocab_size, n_positions=shape["block_size"], n_embd=shape["n_embd"],
                  n_layer=shape["n_layer"], n_head=shape["n_head"], bos_token_id=tokenizer.eos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if architecture == "openai-gpt":
        return OpenAIGPTLMHeadModel(OpenAIGPTConfig(**common))
    return GPT2LMHeadModel(GPT2Config(**common))


def embedding_tables(model) -> tuple[torch.nn.Embedding, torch.nn.Embedding]:
    """The token and position embeddings of a GPT-1 or GPT-2 style model."""
    body = model.transformer
    positions = getattr(body, "positions_embed", None) or getattr(body, "wpe", None)
    if positions is None:
        raise SystemExit(f"{type(model).__name__} has no position embeddings this recipe knows (GPT-1 or GPT-2 style)")
    return model.get_input_embeddings(), positions


def load_embedding_source(source: str):
    """``(model, tokenizer)`` of ``--embeddings_from``: a local checkpoint folder, or a Hub id."""
    from transformers import AutoModelForCausalLM

    if not Path(source).is_dir():
        require_hub(f"--embeddings_from {source}",
                    "Pass --embeddings_from with a local folder holding that checkpoint (config, weights and tokenizer).")
    try:
        return AutoModelForCausalLM.from_pretrained(source), AutoTokenizer.from_pretrained(source)
    except OSError as error:
        raise SystemExit(f"--embeddings_from {source}: no checkpoint with a tokenizer there ({error}). "
                         "Give a folder saved by this recipe or a Hub id such as openai-community/openai-gpt.") from None


def copy_embeddings(model, source_model, source: str) -> None:
    """Start from the source's token and position embeddings (the output layer is tied to the tokens)."""
    tokens, positions = embedding_tables(model)
    source_tokens, source_positions = embedding_tables(source_model)
    if source_tokens.weight.shape[1] != tokens.weight.shape[1]:
        raise SystemExit(f"--embeddings_from {source} has width {source_tokens.weight.shape[1]}, the model "
                         f"{tokens.weight.shape[1]}: pass --n_embd {source_tokens.weight.shape[1]}")
    if source_positions.weight.shape[0] < positions.weight.shape[0]:
        raise SystemExit(f"--embeddings_from {source} has {source_positions.weight.shape[0]} positions, fewer than "
                         f"the context {positions.weight.shape[0]}: pass a smaller --block_size")
    with torch.no_grad():
        tokens.weight.copy_(source_tokens.weight)
        positions.weight.copy_(source_positions.weight[: positions.weight.shape[0]])
    model.tie_weights()


def freeze_embeddings(model) -> None:
    for table in embedding_tables(model):
        table.weight.requires_grad_(False)


def main(argv=None) -> dict:
    parser = HfArgumentParser((DataArguments, ModelArguments, RecipeTrainingArguments))
    data, model_args, training = parser.parse_args_into_dataclasses(args=argv)
    if model_args.preset not in PRESETS:
        raise SystemExit(f"--preset must be one of {', '.join(PRESETS)}")
    preset = PRESETS[model_args.preset]
    shape = {k: getattr(model_args, k) or preset[k] for k in ("n_layer", "n_head", "n_embd", "block_size")}
    data.max_train_blocks = data.max_train_blocks or preset.get("max_train_blocks")
    data.max_eval_blocks = data.max_eval_blocks or preset.get("max_eval_blocks")
    embeddings_from = model_args.embeddings_from or preset.get("embeddings_from")
    frozen = (model_args.freeze_embeddings or preset.get("freeze_embeddings", False)) and not model_args.trainable_embeddings
    training.apply_preset(batch_size=preset["batch_size"], epochs=preset["epochs"])
    if preset.get("schedule") and not explicitly_given(argv, "lr_scheduler_type"):
        training.lr_scheduler_type = type(training.lr_scheduler_type)(preset["schedule"])
    if preset.get("clip") is False and not explicitly_given(argv, "max_grad_norm"):
        training.max_grad_norm = 0.0  # no gradient clipping
    settings = PAPER_OPTIMIZER_SETTINGS if preset.get("chunks") == "paper" else OPTIMIZER_SETTINGS
    optimizer_cls, optimizer_kwargs = training.resolve_optimizer(
        model_args.optimizer, settings, parse_optimizer_kwargs(model_args.optimizer_kwargs)
    )
    push_request = training.take_push_request()
    use_the_machines_cores()
    set_seed(training.seed)

    raw = read_splits(data)
    source_model = None
    if embeddings_from:
        source_model, tokenizer = load_embedding_source(embeddings_from)
    if model_args.tokenizer_name:
        tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name)
    elif not embeddings_from:
        tokenizer = word_level_tokenizer(raw["train"]["text"])
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    layout = paper_chunks if preset.get("chunks") == "paper" else blocks
    splits = {
        "train": layout(raw["train"], tokenizer, shape["block_size"], data.max_train_blocks),
        "validation": layout(raw["validation"], tokenizer, shape["block_size"], data.max_eval_blocks),
        "test": layout(raw["test"], tokenizer, shape["block_size"], data.max_eval_blocks),
    }
    require_blocks(splits, shape["block_size"], data)

    vocab_size = len(tokenizer)
    if source_model is not None:
        vocab_size = max(vocab_size, embedding_tables(source_model)[0].weight.shape[0])
    model = build_model(preset["architecture"], shape, vocab_size, tokenizer)
    if source_model is not None:
        copy_embeddings(model, source_model, embeddings_from)
        del source_model
    if frozen:
        freeze_embeddings(model)
    if preset.get("chunks") == "paper":
        training.remove_unused_columns = False  # keep shift_labels: the targets of the papers' chunks
    global_batch = training.per_device_train_batch_size * training.world_size
    training.scale_logging(math.ceil(len(splits["train"]) / global_batch) // training.gradient_accumulation_steps)
    trainer = KoalaTrainer(
        model=model,
        args=training,
        train_dataset=splits["train"],
        eval_dataset=splits["validation"],
        data_collator=default_data_collator,
        processing_class=tokenizer,
        optimizer_cls_and_kwargs=(optimizer_cls, optimizer_kwargs),
    )
    initial = None if training.resume_from_checkpoint else trainer.evaluate()  # epoch 0: the untrained model
    trainer.add_callback(RunHistory(items_per_epoch=len(splits["train"]) * shape["block_size"], initial_metrics=initial))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trainer.train(resume_from_checkpoint=training.resume_from_checkpoint)
    trainer.save_model()  # the best-validation model (or the final one without checkpoints); KOALA-M: posterior weights
    tokenizer.save_pretrained(training.output_dir)
    test = trainer.evaluate(splits["test"], metric_key_prefix="test")

    epochs, totals = epoch_table(trainer.state.log_history, "tokens_per_second")
    for entry in epochs:
        if "validation_loss" in entry:
            entry["validation_perplexity"] = perplexity(entry["validation_loss"])
    best = min((e for e in epochs if e["epoch"] > 0 and "validation_loss" in e), key=lambda e: e["validation_loss"], default=None)
    results = record(
        "wikitext2_gpt",
        preset=model_args.preset,
        optimizer=canonical_optimizer_name(model_args.optimizer),
        optimizer_kwargs=optimizer_kwargs,
        hyperparameters=all_hyperparameters(optimizer_cls, {**optimizer_kwargs, "weight_decay": training.weight_decay}),
        learning_rate=training.learning_rate,
        weight_decay=training.weight_decay,
        model={"architecture": type(model).__name__, **shape, "vocab_size": vocab_size,
               "parameters": sum(p.numel() for p in model.parameters()),
               "trainable_parameters": trainable,
               "frozen_parameters": sum(p.numel() for p in model.parameters()) - trainable,
               "embeddings_from": embeddings_from, "frozen_embeddings": frozen},
        data={"source": data.data_dir or f"{data.dataset_name}/{data.dataset_config}",
              "hub_dataset": None if data.data_dir else data.dataset_name, "train_split": data.train_split,
              "halve_test_split": data.halve_test_split, "layout": preset.get("chunks", "blocks"),
              **{f"{k}_blocks": len(v) for k, v in splits.items()}},
        batch_size=training.per_device_train_batch_size * training.gradient_accumulation_steps * training.world_size,
        **run_record(trainer, training),
        lr_scheduler=str(getattr(training.lr_scheduler_type, "value", training.lr_scheduler_type)),
        max_grad_norm=training.max_grad_norm,
        seed=training.seed,
        epochs=epochs,
        best_epoch=best["epoch"] if best else None,
        best_validation_perplexity=best["validation_perplexity"] if best else None,
        test_loss=test["test_loss"],
        test_perplexity=perplexity(test["test_loss"]),
        **totals,
        train_loss_curve=train_losses(trainer.state.log_history),
    )
    if trainer.is_world_process_zero():
        write_results(training.output_dir, results, provenance(__file__, argv, root=ROOT))
        plot_curves([results], "validation_perplexity", Path(training.output_dir) / "curves.png", "validation perplexity")
        if push_request:
            print(f"pushed: {prepare_and_push(training.output_dir, **push_request, recipe=__file__)}")
    return results


if __name__ == "__main__":
    main()
