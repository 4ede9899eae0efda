"""koala_hf: KOALA++, KOALA-V and KOALA-M Kalman-filter optimizers for the Hugging Face ecosystem."""

from koala_hf.measurement import LossMeasurement
from koala_hf.optim import KOALAM, KOALAV, KoalaOptimizer, KOALAPlusPlus
from koala_hf.registry import OPTIMIZERS, create_optimizer, install_timm_registration

install_timm_registration()

__version__ = "0.1.0"
__all__ = [
    "KOALAPlusPlus",
    "KOALAV",
    "KOALAM",
    "KoalaOptimizer",
    "LossMeasurement",
    "OPTIMIZERS",
    "create_optimizer",
]
