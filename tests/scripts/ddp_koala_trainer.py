"""Run by tests/test_trainer_distributed.py under torchrun (KoalaTrainer on two CPU processes, gloo) and as one
process on the whole batch: ``ddp_koala_trainer.py OUTPUT_DIR PER_DEVICE_BATCH STEPS``."""

import sys

import torch
import transformers

from koala_hf import KoalaTrainer, KoalaTrainingArguments
from tests.helpers import exit_distributed_process, counting_sequences, tiny_gpt2

transformers.logging.set_verbosity_error()
output_dir, per_device, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
args = KoalaTrainingArguments(
    output_dir=output_dir, per_device_train_batch_size=per_device, max_steps=steps, logging_steps=steps // 3,
    report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
)
trainer = KoalaTrainer(model=tiny_gpt2(torch.float64), args=args, train_dataset=counting_sequences(512))
trainer.train()
torch.save(
    {
        "params": torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()]),
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "world_size": trainer.args.world_size,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "measured_per_sample": trainer.measurement.route.per_sample,
    },
    f"{output_dir}/rank{trainer.args.process_index}.pt",
)
exit_distributed_process()
