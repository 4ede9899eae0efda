"""Small models, data and training steps shared by the tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from koala_hf.measurement import loss_and_noise


def tiny_network(dtype=torch.float64, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3), nn.Tanh(), nn.Linear(3, 1)).to(dtype)


def regression_batches(steps: int, batch: int = 16, dtype=torch.float64, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, batch, 6, generator=generator, dtype=dtype)
    y = torch.sin(x.sum(-1, keepdim=True)) + 0.1 * torch.randn(steps, batch, 1, generator=generator, dtype=dtype)
    return list(zip(x, y))


def per_sample_losses(model: nn.Module, x, y) -> torch.Tensor:
    return ((model(x) - y) ** 2).squeeze(-1)


def observe_batch(model: nn.Module, optimizer, x, y) -> torch.Tensor:
    """A KOALA step's inputs on (x, y) through the public protocol: backward, observe; the step left to the caller."""
    optimizer.zero_grad()
    losses = per_sample_losses(model, x, y)
    loss = losses.mean()
    loss.backward()
    optimizer.observe(loss, losses)
    return loss.detach()


def train_step(model: nn.Module, optimizer, x, y) -> torch.Tensor:
    """One KOALA step on (x, y) through the public protocol: backward, observe, step."""
    loss = observe_batch(model, optimizer, x, y)
    optimizer.step()
    return loss


def weight_and_bias_groups(model: nn.Module, weights: dict, biases: dict) -> list[dict]:
    named = list(model.named_parameters())
    return [
        {"params": [p for n, p in named if n.endswith("weight")], **weights},
        {"params": [p for n, p in named if n.endswith("bias")], **biases},
    ]


def flat_parameters(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def tiny_gpt2(dtype=torch.float32, seed=0, vocab=32, positions=16):
    """A 2-layer GPT-2 without dropout, so trajectories are deterministic."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab, n_positions=positions, n_embd=16, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return GPT2LMHeadModel(config).to(dtype)


def counting_sequences(n: int, length: int = 16, vocab: int = 32, seed: int = 0, pad_some: bool = True):
    """Learnable LM data (each token is the previous plus one), some rows padded with -100 labels."""
    from datasets import Dataset

    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, vocab, (n, 1), generator=generator)
    ids = (starts + torch.arange(length)) % vocab
    labels = ids.clone()
    if pad_some:
        lengths = torch.randint(length // 2, length + 1, (n,), generator=generator)
        labels[torch.arange(length) >= lengths[:, None]] = -100
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(script: str, *args: str) -> None:
    """Run ``tests/scripts/<script>`` on two CPU processes with torchrun (gloo), as ``accelerate launch`` would."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), str(ROOT / "tests" / "scripts" / script), *args,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def exit_distributed_process() -> None:
    """End a multi-process test's worker once every rank has written its results: a barrier, then ``os._exit(0)``.

    A normal exit tears gloo's threads down in static destructors, which on our CI machines now and then aborts a
    rank after its work is done ("terminate called without an active exception").
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def word_tokenizer(words: int = 30):
    """A word-level tokenizer over ``w0 ... w{words-1}`` with ``<pad>`` and ``<eos>`` (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocabulary = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(words)}}
    backend = Tokenizer(models.WordLevel(vocab=vocabulary, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")


def word_texts(n: int, words: int = 30, seed: int = 0, shortest: int = 5, longest: int = 13) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(shortest, longest + 1, (n,), generator=generator)
    return [" ".join(f"w{int(i)}" for i in torch.randint(0, words, (int(k),), generator=generator)) for k in lengths]


class RecordingMeasurements:
    """Wraps an optimizer's measurement so that every (L_k, m_k) its steps consume is kept in ``measured``."""

    def __init__(self, optimizer):
        self.measured = []
        consume = optimizer.measurement.consume_stats

        def recording_consume():
            stats = consume()
            self.measured.append(tuple(t.detach().clone() for t in loss_and_noise(stats)))
            return stats

        optimizer.measurement.consume_stats = recording_consume
