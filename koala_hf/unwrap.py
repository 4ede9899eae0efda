"""The model inside its wrappers: accelerate's and torch's (DDP, FSDP, ``torch.compile``) and PEFT's.

``accelerator.unwrap_model`` leaves PEFT's ``PeftModel`` in place, so a LoRA model's class, ``config`` and
``loss_type`` are those of the PEFT wrapper, not of the causal LM inside. What KoalaTrainer asks of a model
(is it a causal LM, which loss does it use) it asks of :func:`innermost_model`.
"""

from __future__ import annotations

from torch import nn


def innermost_model(model: nn.Module) -> nn.Module:
    """``model`` without DDP/FSDP/compile wrappers and PEFT wrappers, however they are nested."""
    from accelerate.utils import extract_model_from_parallel

    for _ in range(16):  # wrappers nest a few levels deep at most
        inner = extract_model_from_parallel(model)
        get_base_model = getattr(inner, "get_base_model", None)  # PeftModel, PeftMixedModel
        if callable(get_base_model) and type(inner).__module__.startswith("peft."):
            inner = get_base_model()
        if inner is model:
            return model
        model = inner
    return model
