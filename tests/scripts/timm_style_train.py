"""A stand-in for timm's train.py loop (written for these tests): a timm ClassificationTask computes each
micro-batch's loss, ``create_optimizer_v2`` builds the optimizer, the loop divides the loss for gradient
accumulation, back-propagates and steps; nothing passes the loss to the optimizer. Writes what it saw as JSON.

    python tests/scripts/timm_style_train.py --opt koalapp --out result.json
"""

import argparse
import json

import timm
import torch
from timm.optim import create_optimizer_v2
from timm.task import ClassificationTask

parser = argparse.ArgumentParser()
parser.add_argument("--opt", default="koalapp")
parser.add_argument("--lr", type=float, default=0.5)
parser.add_argument("--steps", type=int, default=3)
parser.add_argument("--accum", type=int, default=2)
parser.add_argument("--out", required=True)
args = parser.parse_args()

torch.manual_seed(0)
model = timm.create_model("resnet10t", num_classes=3)
task = ClassificationTask(model, verbose=False)
optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=1e-4)
generator = torch.Generator().manual_seed(1)
images, targets = torch.randn(args.steps * args.accum, 4, 3, 32, 32, generator=generator), torch.randint(0, 3, (args.steps * args.accum, 4), generator=generator)
step_losses, measured = [], []
optimizer.zero_grad()
for index, (x, y) in enumerate(zip(images, targets)):
    result = task(x, y)
    loss = result["loss"] / args.accum
    loss.backward()
    step_losses.append(result["loss"].item())
    if (index + 1) % args.accum == 0:
        optimizer.step()
        optimizer.zero_grad()
        if "koala" in optimizer.state:
            measured.append(optimizer.state["koala"]["loss"].item())
with open(args.out, "w") as f:
    json.dump({"optimizer": type(optimizer).__name__, "micro_batch_losses": step_losses, "measured": measured}, f)
