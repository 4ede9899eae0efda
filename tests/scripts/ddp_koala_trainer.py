"""Run by tests/test_trainer_distributed.py under torchrun: KoalaTrainer on two CPU processes (gloo)."""

import sys

import torch
import transformers

from koala_hf import KoalaTrainer, KoalaTrainingArguments
from tests.helpers import exit_distributed_process, counting_sequences, tiny_gpt2

transformers.logging.set_verbosity_error()
output_dir = sys.argv[1]
args = KoalaTrainingArguments(
    output_dir=output_dir, per_device_train_batch_size=8, max_steps=24, logging_steps=8, report_to=[],
    use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
)
trainer = KoalaTrainer(model=tiny_gpt2(), args=args, train_dataset=counting_sequences(512))
trainer.train()
torch.save(
    {
        "params": torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()]),
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "world_size": trainer.args.world_size,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "measured_per_sample": trainer._derive_per_sample,
    },
    f"{output_dir}/rank{trainer.args.process_index}.pt",
)
exit_distributed_process()
