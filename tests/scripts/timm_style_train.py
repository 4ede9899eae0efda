"""A stand-in for timm's train.py loop (written for these tests): a timm ClassificationTask computes each
micro-batch's loss, ``create_optimizer_v2`` builds the optimizer, the loop divides the loss for gradient
accumulation, back-propagates and steps; nothing passes the loss to the optimizer unless ``--feed line`` adds
koala_hf's one line. Writes what it saw as JSON: each micro-batch's loss and an independent computation of its
per-sample losses, what the optimizer was handed, and what each step measured.

    python tests/scripts/timm_style_train.py --opt koalapp --out result.json
"""

import argparse
import json

import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.task import ClassificationTask

parser = argparse.ArgumentParser()
parser.add_argument("--opt", default="koalapp")
parser.add_argument("--lr", type=float, default=0.5)
parser.add_argument("--steps", type=int, default=3)
parser.add_argument("--accum", type=int, default=2)
parser.add_argument("--criterion", default="ce", choices=["ce", "smoothing", "torch_smoothing", "soft", "bce"])
parser.add_argument("--feed", default="none", choices=["none", "line"])
parser.add_argument("--out", required=True)
args = parser.parse_args()
if args.feed == "line":  # what a user adds at the top of train.py: registers koalapp ... in timm's factory
    import koala_hf.integrations.timm

CLASSES, SMOOTHING = 3, 0.1
torch.manual_seed(0)
model = timm.create_model("resnet10t", num_classes=CLASSES)
criterion = torch.nn.CrossEntropyLoss(label_smoothing=SMOOTHING) if args.criterion == "torch_smoothing" else None
criterion_kwargs = {"ce": {}, "torch_smoothing": {}, "smoothing": {"smoothing": SMOOTHING},
                    "soft": {"soft_targets": True}, "bce": {"loss_type": "bce"}}[args.criterion]
task = ClassificationTask(model, criterion=criterion, criterion_kwargs=criterion_kwargs, verbose=False)
optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=1e-4)
if args.feed == "line":
    koala_hf.integrations.timm.feed_losses(task, optimizer)  # the one added line

handed = []
if hasattr(optimizer, "observe"):
    observe = optimizer.observe

    def recording_observe(loss, per_sample_losses=None):
        handed.append(None if per_sample_losses is None else per_sample_losses.tolist())
        observe(loss, per_sample_losses)

    optimizer.observe = recording_observe


def independent_per_sample(logits, y):
    """Each sample's loss, computed here from the logits without the criterion."""
    logits = logits.detach().double()
    if args.criterion == "soft":
        return (-(y.double() * logits.log_softmax(-1)).sum(-1)).tolist()
    smoothing = SMOOTHING if args.criterion in ("smoothing", "torch_smoothing") else 0.0
    return F.cross_entropy(logits, y, reduction="none", label_smoothing=smoothing).tolist()


generator = torch.Generator().manual_seed(1)
images = torch.randn(args.steps * args.accum, 4, 3, 32, 32, generator=generator)
targets = torch.randint(0, CLASSES, (args.steps * args.accum, 4), generator=generator)
if args.criterion in ("soft", "bce"):  # Mixup-style soft targets: two one-hot labels mixed
    lam = torch.rand(args.steps * args.accum, 4, 1, generator=generator)
    other = torch.randint(0, CLASSES, targets.shape, generator=generator)
    targets = lam * F.one_hot(targets, CLASSES) + (1 - lam) * F.one_hot(other, CLASSES)
losses, per_sample, measured = [], [], []
optimizer.zero_grad()
for index, (x, y) in enumerate(zip(images, targets)):
    result = task(x, y)
    loss = result["loss"] / args.accum
    loss.backward()
    losses.append(result["loss"].item())
    per_sample.append(independent_per_sample(result["output"], y))
    if (index + 1) % args.accum == 0:
        optimizer.step()
        optimizer.zero_grad()
        if "koala" in optimizer.state:
            measured.append(optimizer.state["koala"]["loss"].item())
handed_in_training = len(handed)
task.eval()
with torch.no_grad():  # validation, as train.py's validate() runs it
    task(images[0], targets[0])
task.train()
with torch.no_grad():
    task(images[0], targets[0])
with open(args.out, "w") as f:
    json.dump({"optimizer": type(optimizer).__name__, "micro_batch_losses": losses, "per_sample": per_sample,
               "handed": handed, "handed_in_training": handed_in_training, "measured": measured}, f)
