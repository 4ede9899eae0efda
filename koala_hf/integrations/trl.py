"""``KoalaSFTTrainer``: TRL's SFTTrainer feeding KOALA the per-token losses it trains on.

TRL's SFTTrainer computes its loss from a fused LM head that returns per-token log-probabilities, not logits.
KoalaTrainer reads them from the training forward itself (no extra forward pass, no ``return_outputs=True``),
and this class turns them into the per-token losses of the ``loss_type`` trained on: ``nll``, ``-log p``;
``dft``, ``-log p * p`` (the probability taken as a constant, as TRL does). A loss TRL adds to them (the MoE
auxiliary loss, a ``compute_loss_func``) is measured as back-propagated, with a notice.

Other TRL trainers built on Trainer combine the same way, ``class MyDPO(KoalaTrainer, DPOTrainer)``: where
no per-sample losses can be derived (DPO's batches have no labels), KOALA measures the back-propagated loss
exactly, with a notice.
"""

from __future__ import annotations

import torch

try:
    from trl import SFTTrainer
except ImportError as error:  # pragma: no cover - exercised without the extra
    raise ImportError(f"koala_hf.KoalaSFTTrainer needs TRL ({error}): pip install 'koala_hf[trl]'") from None

from koala_hf.per_sample import fused_negative_log_likelihood
from koala_hf.trainer import KoalaTrainer


class KoalaSFTTrainer(KoalaTrainer, SFTTrainer):
    """``trl.SFTTrainer`` for the KOALA optimizers; takes SFTTrainer's arguments (``SFTConfig`` included)."""

    def per_sample_losses(self, model, outputs, labels, inputs) -> torch.Tensor | None:
        nll = fused_negative_log_likelihood(outputs)
        if nll is None:  # the full-logits forward (label smoothing, compute_loss_func): KoalaTrainer's own reading
            return super().per_sample_losses(model, outputs, labels, inputs)
        loss_type = getattr(self.args, "loss_type", "nll")
        if loss_type == "nll":
            return nll
        if loss_type == "dft":  # DFT: the NLL weighted by the token's probability, detached
            return nll * torch.exp(-nll)
        return None  # a loss type this class does not know: measured as back-propagated, with a notice
