"""Run by tests/test_trainer_fsdp2.py under torchrun: KoalaTrainer with accelerate's FSDP2 on two CPU processes.

accelerate runs DDP instead of FSDP on CPU, so the Trainer subclass below switches its accelerator to FSDP2
after creating it (test only); everything after that (fully_shard, the optimizer's parameter swap, FSDP
checkpoints) is accelerate's and the Trainer's own code.

    fsdp2_koala_trainer.py OUTPUT_DIR SHARDED_STATE_DICT|FULL_STATE_DICT [CHECKPOINT]
"""

import sys

import torch
import transformers
from accelerate import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from koala_hf import KoalaTrainer, KoalaTrainingArguments, koala_optimizer
from tests.helpers import exit_distributed_process, counting_sequences, tiny_gpt2


class CpuFsdp2Trainer(KoalaTrainer):
    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        state = self.accelerator.state
        PartialState._shared_state["distributed_type"] = state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
        self.is_fsdp_enabled = True


transformers.logging.set_verbosity_error()
output_dir, state_dict_type = sys.argv[1], sys.argv[2]
resume = sys.argv[3] if len(sys.argv) > 3 else None
args = KoalaTrainingArguments(
    output_dir=output_dir, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=12,
    logging_steps=4, report_to=[], use_cpu=True, save_strategy="steps", save_steps=6, disable_tqdm=True, seed=0,
    koala_optimizer="koala++", weight_decay=1e-4, fsdp="full_shard",
    fsdp_config={"fsdp_version": 2, "state_dict_type": state_dict_type, "reshard_after_forward": True},
)
trainer = CpuFsdp2Trainer(model=tiny_gpt2(), args=args, train_dataset=counting_sequences(512))
trainer.train(resume_from_checkpoint=resume)
params = torch.cat([p.detach().full_tensor().reshape(-1) for p in trainer.model.parameters()])
torch.save(
    {
        "params": params,
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "distributed_type": str(trainer.accelerator.distributed_type),
        "sharded": type(next(trainer.model.parameters())).__name__,
        "koala_steps": koala_optimizer(trainer.optimizer).state["koala"]["step"].item(),
        "measured_per_sample": trainer.measurement.route.per_sample,
    },
    f"{output_dir}/rank{trainer.args.process_index}{'-resumed' if resume else ''}.pt",
)
exit_distributed_process()
