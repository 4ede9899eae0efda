"""koala_hf: KOALA++, KOALA-V and KOALA-M Kalman-filter optimizers for the Hugging Face ecosystem."""

from koala_hf.loops import koala_optimizer, observe
from koala_hf.measurement import LossMeasurement
from koala_hf.optim import KOALAM, KOALAV, KoalaOptimizer, KOALAPlusPlus
from koala_hf.per_sample import per_sample_losses
from koala_hf.registry import OPTIMIZERS, create_optimizer, install_timm_registration

install_timm_registration()

__version__ = "0.3.0"
__all__ = [
    "KOALAPlusPlus",
    "KOALAV",
    "KOALAM",
    "KoalaOptimizer",
    "KoalaTrainer",
    "KoalaTrainingArguments",
    "KoalaSFTTrainer",
    "KoalaSeq2SeqTrainer",
    "LossMeasurement",
    "OPTIMIZERS",
    "create_optimizer",
    "koala_optimizer",
    "observe",
    "per_sample_losses",
]

# The Trainer integrations import transformers' Trainer (seconds) or an extra (TRL); load them on first use.
_LAZY = {"KoalaTrainer": "koala_hf.trainer", "KoalaTrainingArguments": "koala_hf.training_args",
         "KoalaSFTTrainer": "koala_hf.integrations.trl", "KoalaSeq2SeqTrainer": "koala_hf.integrations.seq2seq"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'koala_hf' has no attribute {name!r}")
