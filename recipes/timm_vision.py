"""timm vision models on CIFAR-10, CIFAR-100 and ImageNet32 with KOALA++ and its baselines.

    python -m koala_hf.recipe_support.archives digits data/digits   # real digit images as a CIFAR-10 archive
    python recipes/timm_vision.py --preset smoke --data_dir data/digits --optimizer koala++ --output_dir runs/smoke
    accelerate launch recipes/timm_vision.py --preset koala_cifar100 --optimizer sgd --output_dir runs/c100-sgd

Data: CIFAR from the Hub through ``datasets`` (default), or ``--data_dir`` holding
the original python-pickle archives (``cifar-10-batches-py``,
``cifar-100-python``); ImageNet32 from ``--data_dir`` holding the official
downsampled batches (``train_data_batch_1..10``, ``val_data``) or from the Hub
copy named by ``--hub_dataset``.

Presets are the papers' protocols (spec, last section); every optimizer runs
with its papers' settings (``optimizer_settings``), the same data order,
schedule and seed. Outputs: ``results.json`` (top-1/top-5 error per epoch
through ``evaluate``, images/s of the data pipeline and of training, seconds
per epoch, the command, device and date), ``curves.png`` and the checkpoints.
"""

from __future__ import annotations

import math
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path

from koala_hf.recipe_support.extras import require_extras  # noqa: E402

require_extras("timm", "torchvision", "evaluate", "matplotlib", extra="recipes")

import evaluate  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402
from torchvision.transforms import v2  # noqa: E402
from transformers import HfArgumentParser, set_seed  # noqa: E402

from koala_hf.recipe_support.arguments import explicitly_given, RecipeTrainingArguments  # noqa: E402
from koala_hf.recipe_support.history import epoch_table, run_record, RunHistory, train_losses  # noqa: E402
from koala_hf.recipe_support.machine import require_hub, use_the_machines_cores  # noqa: E402
from koala_hf.recipe_support.optimizers import all_hyperparameters, canonical_optimizer_name, OPTIMIZER_CHOICES, parse_optimizer_kwargs  # noqa: E402
from koala_hf.recipe_support.plots import plot_curves  # noqa: E402
from koala_hf.recipe_support.results import provenance, record, write_results  # noqa: E402

from koala_hf import KoalaTrainer  # noqa: E402
from koala_hf.hub import prepare_and_push  # noqa: E402
from koala_hf.metrics import TOP_K_ERROR  # noqa: E402
from koala_hf.vision import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD, ImageClassifier, create_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]  # the repository: commands are recorded from there
DATASETS = {
    # name: (classes, Hub id, image column, label column, normalisation)
    "cifar10": (10, "uoft-cs/cifar10", "img", "label", (CIFAR_MEAN, CIFAR_STD)),
    "cifar100": (100, "uoft-cs/cifar100", "img", "fine_label", (CIFAR_MEAN, CIFAR_STD)),
    "imagenet32": (1000, "benjamin-paine/imagenet-1k-32x32", "image", "label", (IMAGENET_MEAN, IMAGENET_STD)),
}

# The papers' protocols. milestones: LR x gamma at these epochs (MultiStep); else the named schedule.
PRESETS = {
    "koala_cifar10": dict(dataset="cifar10", model="resnet18_cifar", batch_size=128, epochs=200, milestones=(100, 150)),
    "koala_cifar100": dict(dataset="cifar100", model="resnet50_cifar", batch_size=128, epochs=100, milestones=(30, 60, 90)),
    "adafisher_cifar10": dict(dataset="cifar10", model="resnet50_cifar", batch_size=256, epochs=200, schedule="cosine", cutout=True),
    "imagenet32": dict(dataset="imagenet32", model="resnet18_cifar", batch_size=128, epochs=100, milestones=(30, 60, 90)),
    "smoke": dict(dataset="cifar10", model="resnet18_cifar", batch_size=32, epochs=2, milestones=(1,),
                  max_train_samples=128, max_eval_samples=32),
}


def optimizer_settings(dataset: str) -> dict:
    """The papers' settings per optimizer (spec: "Paper settings" and "Baseline settings")."""
    wd = 1e-4 if dataset == "imagenet32" else 5e-4
    koala = dict(lr=2.0, sigma=0.2, q=0.2) if dataset == "cifar100" else dict(lr=1.0, sigma=0.1, q=0.1)
    return {
        "koala++": dict(koala, weight_decay=wd),
        "koala++ns": dict(koala, weight_decay=wd),
        "koala-v": dict(lr=0.1, sigma=0.1, q=1.0, weight_decay=wd),
        "koala-m": dict(lr=1.0, weight_decay=wd),
        "sgd": dict(lr=0.1, momentum=0.9, weight_decay=wd),
        "adam": dict(lr=3e-4, weight_decay=wd),
        "adamw": dict(lr=3e-4, weight_decay=wd),
    }


@dataclass
class DataArguments:
    data_dir: str | None = field(default=None, metadata={"help": "Folder with the CIFAR pickles or ImageNet32 batches."})
    hub_dataset: str | None = field(default=None, metadata={"help": "Override the Hub dataset id."})
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    measure_batches: int = field(default=20, metadata={"help": "Batches timed to measure the data pipeline alone."})


@dataclass
class ModelArguments:
    preset: str = field(default="smoke", metadata={"help": f"One of {', '.join(PRESETS)}."})
    dataset: str | None = field(default=None, metadata={"help": f"Override the preset's: {', '.join(DATASETS)}."})
    model: str | None = field(default=None, metadata={"help": "A 32x32 timm model (resnet18_cifar, ... or its timm name)."})
    optimizer: str = field(default="koala++", metadata={"help": f"One of {', '.join(OPTIMIZER_CHOICES)}."})
    optimizer_kwargs: str | None = field(default=None, metadata={"help": "JSON overriding optimizer settings."})
    cutout: bool = field(default=False, metadata={"help": "Cutout 16x16 (on in the adafisher_cifar10 preset)."})
    no_cutout: bool = field(default=False, metadata={"help": "No Cutout, even where the preset uses it."})


@dataclass
class VisionTrainingArguments(RecipeTrainingArguments):
    load_best_model_at_end: bool = False  # the papers report the final model
    metric_for_best_model: str | None = "eval_top1_error"
    greater_is_better: bool | None = False


# ------------------------------------------------------------------ data
def _unpickle(path: Path, keys: tuple[str, ...]) -> dict:
    """One python-pickle batch, with ``keys`` checked: a damaged or foreign file is named, not a traceback."""
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError) as error:
        raise SystemExit(f"{path} is not a readable python-pickle batch ({type(error).__name__}: {error}); "
                         "it may be truncated: download and unpack the archive again") from None
    if not isinstance(batch, dict):
        raise SystemExit(f"{path} holds a {type(batch).__name__}, not a dataset batch")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    missing = [k for k in keys if k not in batch]
    if missing:
        hint = ""
        if "fine_labels" in batch:
            hint = " It looks like CIFAR-100: pass --dataset cifar100."
        elif "labels" in batch and "fine_labels" in keys:
            hint = " It looks like CIFAR-10 or ImageNet32: pass --dataset cifar10 or imagenet32."
        raise SystemExit(f"{path} has no {', '.join(missing)} (keys: {', '.join(map(str, batch))}).{hint}")
    return batch


def _check_labels(path_hint: str, labels: np.ndarray, classes: int, first: int = 0) -> None:
    if labels.size and (labels.min() < first or labels.max() >= classes + first):
        raise SystemExit(f"{path_hint}: labels run from {labels.min()} to {labels.max()}, not {first}..{classes - 1 + first}: "
                         "is this the right dataset for --dataset?")


def _as_images(rows) -> torch.Tensor:
    return torch.from_numpy(np.asarray(rows, dtype=np.uint8).reshape(-1, 3, 32, 32))


def read_cifar(folder: Path, dataset: str) -> dict:
    """The original python-pickle archives: ``{split: (uint8 N x 3 x 32 x 32, int64 labels)}``."""
    if dataset == "cifar10":
        root = folder / "cifar-10-batches-py" if (folder / "cifar-10-batches-py").is_dir() else folder
        files = {"train": [root / f"data_batch_{i}" for i in range(1, 6)], "test": [root / "test_batch"]}
        key, classes, other = "labels", 10, ("cifar-100-python", "cifar100")
    else:
        root = folder / "cifar-100-python" if (folder / "cifar-100-python").is_dir() else folder
        files = {"train": [root / "train"], "test": [root / "test"]}
        key, classes, other = "fine_labels", 100, ("cifar-10-batches-py", "cifar10")
    missing = [str(p) for paths in files.values() for p in paths if not p.exists()]
    if missing:
        hint = f" It holds {other[0]}: pass --dataset {other[1]}." if (folder / other[0]).is_dir() else ""
        raise SystemExit(f"--data_dir {folder}: missing {', '.join(missing)} (the original {dataset} python archives).{hint}")
    splits = {}
    for split, paths in files.items():
        batches = [_unpickle(p, ("data", key)) for p in paths]
        labels = np.concatenate([b[key] for b in batches])
        _check_labels(f"--data_dir {folder} ({split})", labels, classes)
        splits[split] = (_as_images(np.concatenate([b["data"] for b in batches])), torch.tensor(labels, dtype=torch.int64))
    return splits


def read_imagenet32(folder: Path) -> dict:
    """The official downsampled ImageNet batches; their labels 1..1000 become 0..999."""
    train = sorted(folder.rglob("train_data_batch_*"), key=lambda p: int(p.name.rsplit("_", 1)[1]))
    val = sorted(folder.rglob("val_data"))
    if not train or not val:
        raise SystemExit(f"--data_dir {folder}: expected train_data_batch_1..10 and val_data (ImageNet32)")
    splits = {}
    for split, paths in (("train", train), ("test", val[:1])):
        batches = [_unpickle(p, ("data", "labels")) for p in paths]
        labels = np.concatenate([b["labels"] for b in batches])
        _check_labels(f"--data_dir {folder} ({split})", labels, 1000, first=1)
        splits[split] = (_as_images(np.concatenate([b["data"] for b in batches])), torch.tensor(labels, dtype=torch.int64) - 1)
    return splits


def read_hub(name: str, image_column: str, label_column: str) -> dict:
    from datasets import load_dataset

    require_hub(f"Loading {name}", "Pass --data_dir with the original archives.")
    try:
        raw = load_dataset(name)
    except Exception as error:  # offline, or the Hub unreachable
        raise SystemExit(
            f"Could not load {name} from the Hub ({type(error).__name__}: {error}). "
            "Offline? Pass --data_dir with the original archives."
        ) from error
    splits = {}
    for split, target in (("train", "train"), ("test", "test"), ("validation", "test")):
        if split in raw and target not in splits:
            part = raw[split].with_format("numpy", columns=[image_column, label_column])
            images = np.stack([np.asarray(img, dtype=np.uint8) for img in part[image_column]])
            splits[target] = (torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
                              torch.as_tensor(part[label_column], dtype=torch.int64))
    return splits


def read_splits(dataset: str, data: DataArguments) -> dict:
    if data.data_dir is not None:
        folder = Path(data.data_dir)
        return read_imagenet32(folder) if dataset == "imagenet32" else read_cifar(folder, dataset)
    _, hub_id, image_column, label_column, _ = DATASETS[dataset]
    return read_hub(data.hub_dataset or hub_id, image_column, label_column)


class Cutout(torch.nn.Module):
    """Zero a ``size`` x ``size`` square at a uniformly random centre, clipped at the borders (DeVries & Taylor)."""

    def __init__(self, size: int = 16):
        super().__init__()
        self.size = size

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        y, x = torch.randint(h, ()).item(), torch.randint(w, ()).item()
        half = self.size // 2
        image = image.clone()
        image[..., max(0, y - half) : y + half, max(0, x - half) : x + half] = 0
        return image


def transforms(train: bool, normalisation, cutout: bool) -> v2.Compose:
    steps = [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()] if train else []
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(*normalisation)]
    if train and cutout:
        steps.append(Cutout(16))
    return v2.Compose(steps)


class ImageTensors(Dataset):
    """uint8 images held in memory, transformed per sample in the DataLoader's workers."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform, limit: int | None = None):
        if limit:
            images, labels = images[:limit], labels[:limit]
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {"pixel_values": self.transform(self.images[index]), "labels": self.labels[index]}


def data_throughput(loader, batches: int) -> float:
    """Images per second of loading plus augmentation alone (the model does not run)."""
    seen, start = 0, None
    for i, batch in enumerate(loader):
        if i == 1:  # the first batch pays for starting the workers
            start, seen = time.perf_counter(), 0
        if i > batches:
            break
        seen += len(batch["labels"])
    return seen / (time.perf_counter() - start) if start and seen else float("nan")


# --------------------------------------------------------------- training
class VisionTrainer(KoalaTrainer):
    """KoalaTrainer with the papers' MultiStep schedule (LR x gamma at given epochs)."""

    def __init__(self, *args, milestones=None, gamma: float = 0.1, **kwargs):
        super().__init__(*args, **kwargs)
        self.milestones, self.gamma = milestones, gamma

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if not self.milestones:
            return super().create_scheduler(num_training_steps, optimizer)
        steps_per_epoch = num_training_steps / self.args.num_train_epochs
        self.lr_scheduler = torch.optim.lr_scheduler.MultiStepLR(
            optimizer or self.optimizer, [round(m * steps_per_epoch) for m in self.milestones], gamma=self.gamma
        )
        return self.lr_scheduler


def top_k_metrics():
    metric = evaluate.load(TOP_K_ERROR)

    def compute(eval_pred):
        return metric.compute(predictions=eval_pred.predictions, references=eval_pred.label_ids)

    return compute


def top5_indices(logits, labels):
    return logits.topk(min(5, logits.shape[-1]), dim=-1).indices


def main(argv=None) -> dict:
    return run(argv)[0]


def run(argv=None):
    """Train and evaluate; return ``(results, trainer)``."""
    parser = HfArgumentParser((DataArguments, ModelArguments, VisionTrainingArguments))
    data, model_args, training = parser.parse_args_into_dataclasses(args=argv)
    if model_args.preset not in PRESETS:
        raise SystemExit(f"--preset must be one of {', '.join(PRESETS)}")
    preset = PRESETS[model_args.preset]
    dataset = model_args.dataset or preset["dataset"]
    if dataset not in DATASETS:
        raise SystemExit(f"--dataset must be one of {', '.join(DATASETS)}")
    classes, hub_id, _, _, normalisation = DATASETS[dataset]
    architecture = model_args.model or preset["model"]
    cutout = (preset.get("cutout", False) or model_args.cutout) and not model_args.no_cutout
    data.max_train_samples = data.max_train_samples or preset.get("max_train_samples")
    data.max_eval_samples = data.max_eval_samples or preset.get("max_eval_samples")
    # An --lr_scheduler_type on the command line replaces the preset's schedule (its milestones included).
    own_schedule = explicitly_given(argv, "lr_scheduler_type")
    if preset.get("schedule") and not own_schedule:
        training.lr_scheduler_type = type(training.lr_scheduler_type)(preset["schedule"])
    training.apply_preset(batch_size=preset["batch_size"], epochs=preset["epochs"])
    optimizer_cls, optimizer_kwargs = training.resolve_optimizer(
        model_args.optimizer, optimizer_settings(dataset), parse_optimizer_kwargs(model_args.optimizer_kwargs)
    )
    push_request = training.take_push_request()
    use_the_machines_cores()
    set_seed(training.seed)

    splits = read_splits(dataset, data)
    train = ImageTensors(*splits["train"], transforms(True, normalisation, cutout), data.max_train_samples)
    test = ImageTensors(*splits["test"], transforms(False, normalisation, False), data.max_eval_samples)
    model = ImageClassifier(create_model(architecture, num_classes=classes))
    global_batch = training.per_device_train_batch_size * training.world_size
    training.scale_logging(math.ceil(len(train) / global_batch) // training.gradient_accumulation_steps)
    trainer = VisionTrainer(
        model=model,
        args=training,
        train_dataset=train,
        eval_dataset=test,
        optimizer_cls_and_kwargs=(optimizer_cls, optimizer_kwargs),
        callbacks=[RunHistory(items_per_epoch=len(train))],
        compute_metrics=top_k_metrics(),
        preprocess_logits_for_metrics=top5_indices,
        milestones=None if preset.get("schedule") or own_schedule else preset.get("milestones"),
    )
    loading = data_throughput(trainer.get_train_dataloader(), data.measure_batches)
    trainer.train(resume_from_checkpoint=training.resume_from_checkpoint)
    trainer.save_model()
    final = trainer.evaluate(metric_key_prefix="test")

    epochs, totals = epoch_table(trainer.state.log_history, "images_per_second")
    best = min((e for e in epochs if "validation_top1_error" in e), key=lambda e: e["validation_top1_error"], default=None)
    training_speed = totals["images_per_second"]
    source = f"--data_dir {data.data_dir}" if data.data_dir else f"Hub: {data.hub_dataset or hub_id}"
    results = record(
        "timm_vision",
        preset=model_args.preset,
        dataset=dataset,
        num_classes=classes,
        hub_dataset=None if data.data_dir else data.hub_dataset or hub_id,
        data_source=source,
        model=architecture,
        parameters=sum(p.numel() for p in model.parameters()),
        optimizer=canonical_optimizer_name(model_args.optimizer),
        optimizer_kwargs=optimizer_kwargs,
        hyperparameters=all_hyperparameters(optimizer_cls, {**optimizer_kwargs, "weight_decay": training.weight_decay}),
        learning_rate=training.learning_rate,
        weight_decay=training.weight_decay,
        batch_size=training.per_device_train_batch_size * training.gradient_accumulation_steps * training.world_size,
        **run_record(trainer, training),
        schedule=str(getattr(training.lr_scheduler_type, "value", training.lr_scheduler_type)) if own_schedule
        else preset.get("schedule") or f"multistep {list(preset.get('milestones', ()))} x0.1",
        augmentation="random crop 32 (padding 4) + horizontal flip" + (" + cutout 16" if cutout else ""),
        seed=training.seed,
        train_samples=len(train),
        test_samples=len(test),
        epochs=epochs,
        best_epoch=best["epoch"] if best else None,
        best_validation_top1_error=best["validation_top1_error"] if best else None,
        test_top1_error=final["test_top1_error"],
        test_top5_error=final["test_top5_error"],
        test_loss=final["test_loss"],
        **totals,
        data_images_per_second=loading,
        data_pipeline_headroom=loading / training_speed if training_speed else None,
        train_loss_curve=train_losses(trainer.state.log_history),
    )
    if trainer.is_world_process_zero():
        write_results(training.output_dir, results, provenance(__file__, argv, root=ROOT))
        plot_curves([results], "validation_top1_error", Path(training.output_dir) / "curves.png", "top-1 error (%)")
        if push_request:
            print(f"pushed: {prepare_and_push(training.output_dir, **push_request, recipe=__file__)}")
    if math.isfinite(loading) and loading < training_speed:
        print(f"warning: the data pipeline ({loading:,.0f} images/s) is slower than training "
              f"({training_speed:,.0f} images/s); raise --dataloader_num_workers")
    return results, trainer


if __name__ == "__main__":
    main()
