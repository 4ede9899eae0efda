"""Small models, data and training steps shared by the tests."""

from __future__ import annotations

import torch
from torch import nn


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


def train_step(model: nn.Module, optimizer, x, y) -> torch.Tensor:
    """One KOALA step on (x, y) through the public protocol: backward, observe, step."""
    optimizer.zero_grad()
    losses = per_sample_losses(model, x, y)
    loss = losses.mean()
    loss.backward()
    optimizer.observe(loss, losses)
    optimizer.step()
    return loss.detach()


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
