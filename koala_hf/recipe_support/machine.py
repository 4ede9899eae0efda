"""The machine a recipe runs on: accelerator, CPU threads, launcher, and whether the Hub can be reached."""

from __future__ import annotations

import os
import socket

import torch


def accelerator_available() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return accelerator.is_available()
    return torch.cuda.is_available()


def use_the_machines_cores() -> int:
    """On CPU, one thread per core for each local process; return the threads in use.

    ``accelerate launch`` sets ``OMP_NUM_THREADS=1`` unless told otherwise, which
    trains on one core; a value the user exported is left alone.
    """
    if accelerator_available():
        return torch.get_num_threads()
    launched_by_accelerate = "ACCELERATE_MIXED_PRECISION" in os.environ
    if launched_by_accelerate and os.environ.get("OMP_NUM_THREADS") == "1":
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    return torch.get_num_threads()


def launcher() -> str:
    """How this process was started: ``accelerate launch``, ``torchrun`` or ``python``."""
    if "ACCELERATE_MIXED_PRECISION" in os.environ:
        return "accelerate launch"
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return "torchrun"
    return "python"


def hub_unreachable() -> str | None:
    """Why the Hub cannot be used now (``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` set, or its host not reached
    within 5 s), or ``None`` when it can."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE"):
        return "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set"
    endpoint = constants.ENDPOINT.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = endpoint.partition(":")
    try:
        socket.create_connection((host, int(port or 443)), timeout=5).close()
    except OSError as error:
        return f"{host} cannot be reached ({error})"
    return None


def require_hub(what: str, fix: str) -> None:
    """Fail at once, not after minutes of retries, when the Hub is off (``HF_HUB_OFFLINE``) or unreachable."""
    reason = hub_unreachable()
    if reason is not None:
        raise SystemExit(f"{what} needs the Hub, but {reason}. {fix}")
