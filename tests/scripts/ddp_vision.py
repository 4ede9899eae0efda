"""Run by tests/recipes/test_timm_vision.py under torchrun: the vision smoke preset on two CPU processes."""

import sys

import torch

from recipes import timm_vision
from tests.helpers import exit_distributed_process

data_dir, output_dir = sys.argv[1], sys.argv[2]
results, trainer = timm_vision.run([
    "--preset", "smoke", "--data_dir", data_dir, "--output_dir", output_dir, "--optimizer", "koala++",
    "--per_device_train_batch_size", "16", "--save_strategy", "no", "--disable_tqdm", "true", "--measure_batches", "2", "--use_cpu", "true",
])
params = torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()])
torch.save({"params": params, "world_size": trainer.args.world_size}, f"{output_dir}/rank{trainer.args.process_index}.pt")
exit_distributed_process()
