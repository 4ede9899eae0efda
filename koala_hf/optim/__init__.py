"""The KOALA optimizers: ``torch.optim.Optimizer`` subclasses (spec E1-E36)."""

from koala_hf.optim.base import KoalaOptimizer
from koala_hf.optim.koala_m import KOALAM
from koala_hf.optim.koala_plus_plus import KOALAPlusPlus
from koala_hf.optim.koala_v import KOALAV

__all__ = ["KoalaOptimizer", "KOALAPlusPlus", "KOALAV", "KOALAM"]
