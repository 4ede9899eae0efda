"""KOALA in training stacks built on transformers' Trainer or with their own loops.

* ``trl``: ``KoalaSFTTrainer`` (TRL's SFTTrainer; other TRL trainers combine with KoalaTrainer the same way);
* ``seq2seq``: ``KoalaSeq2SeqTrainer``;
* ``timm``: timm's ``train.py``, run through ``python -m koala_hf.integrations.timm train.py ...``.

Each imports its library only when used; without it, one line names the extra to install.
"""
