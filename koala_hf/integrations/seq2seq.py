"""``KoalaSeq2SeqTrainer``: transformers' Seq2SeqTrainer (generation in evaluation) for the KOALA optimizers.

Encoder-decoder models (T5, BART) take ``**kwargs`` but ignore ``num_items_in_batch``; KoalaTrainer measures
their per-token losses over the whole step and rescales their loss to the step's token normalisation, so that
gradient accumulation trains on the step's token mean (see koala_hf.trainer).
"""

from __future__ import annotations

from transformers import Seq2SeqTrainer

from koala_hf.trainer import KoalaTrainer


class KoalaSeq2SeqTrainer(KoalaTrainer, Seq2SeqTrainer):
    """``transformers.Seq2SeqTrainer`` for the KOALA optimizers; takes Seq2SeqTrainer's arguments."""
