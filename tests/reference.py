"""Straight-line implementations of the spec, written for the tests only.

They share no code with ``koala_hf``: every quantity is computed the way the
spec writes it (dot products recomputed rather than carried, the first step
spelled out, KOALA-M as the papers' predict / forward / update loop), one
flattened float64 layer at a time. Each layer is a dict with ``theta`` (a 1-D
tensor, updated in place) and its group's hyperparameters.
"""

from __future__ import annotations

import torch


def noise_estimate(previous, noise_measurement, r, alpha_r):
    """E2."""
    if r is not None:
        return torch.tensor(float(r), dtype=torch.float64)
    return alpha_r * previous + (1 - alpha_r) * noise_measurement


def measurement(per_sample_losses):
    """E1: (L_k, mean of squared per-sample losses)."""
    losses = per_sample_losses.double()
    return losses.mean(), (losses * losses).mean()


class KoalaPlusPlusReference:
    """E10-E17."""

    def __init__(self, layers, symmetric=True):
        self.layers = layers
        self.symmetric = symmetric
        self.R = [torch.tensor(1.0, dtype=torch.float64) for _ in layers]

    def step(self, grads, loss, noise_measurement):
        for i, (layer, g) in enumerate(zip(self.layers, grads)):
            self.R[i] = noise_estimate(self.R[i], noise_measurement, layer["r"], layer["alpha_r"])
            R = self.R[i]
            sigma, q, wd, lr = layer["sigma"], layer["q"], layer["weight_decay"], layer["lr"]
            theta = layer["theta"]
            H = g + wd * theta  # E3
            layer_loss = loss + wd / 2 * theta.dot(theta)
            if "H_prev" not in layer:  # E10
                layer["v_prev"] = sigma * H
                layer["H_prev"] = H.clone()
                layer["S_prev"] = layer["v_prev"].dot(layer["H_prev"]) + q * H.dot(H) + R
            v_prev, H_prev, S_prev = layer["v_prev"], layer["H_prev"], layer["S_prev"]
            x = H_prev.dot(H_prev)
            y = H_prev.dot(v_prev)
            a = H.dot(H_prev)
            b = H.dot(v_prev)
            lam = (b + q * a) / S_prev  # E11
            alpha = a / x  # E12
            rho = b / x - a * y / x**2 if self.symmetric else 0.0  # E13
            v = (alpha - lam) * v_prev + q * (H - lam * H_prev) + rho * H_prev  # E14
            S = (v + q * H).dot(H) + R  # E15
            theta -= lr * layer_loss * (v + q * H) / S  # E16
            layer["v_prev"], layer["H_prev"], layer["S_prev"] = v, H.clone(), S  # E17


class KoalaVReference:
    """E20-E22 (one group's hyperparameters shared by all layers for sigma and q)."""

    def __init__(self, layers, sigma, q):
        self.layers = layers
        self.q = q
        self.P = torch.tensor(float(sigma), dtype=torch.float64)
        self.R = [torch.tensor(1.0, dtype=torch.float64) for _ in layers]

    def step(self, grads, loss, noise_measurement):
        P_hat = self.P + self.q  # E20
        ratios = []
        for i, (layer, g) in enumerate(zip(self.layers, grads)):
            self.R[i] = noise_estimate(self.R[i], noise_measurement, layer["r"], layer["alpha_r"])
            theta, wd = layer["theta"], layer["weight_decay"]
            H = g + wd * theta
            layer_loss = loss + wd / 2 * theta.dot(theta)
            s = P_hat * H.dot(H) + self.R[i]
            theta -= layer["lr"] * layer_loss * P_hat / s * H  # E21
            ratios.append(H.dot(H) / s)
        self.P = P_hat - P_hat**2 * max(ratios)  # E22


class KoalaMReference:
    """E30-E36 as the papers' loop: predict, forward/backward, update."""

    def __init__(self, layers, sw, sc, sv, a, qw, qv):
        self.layers = layers
        self.a, self.qv = a, qv
        self.P = torch.tensor([[sw, sc], [sc, sv]], dtype=torch.float64)
        self.qw_avg = torch.tensor(float(qw), dtype=torch.float64)
        self.R = [torch.tensor(1.0, dtype=torch.float64) for _ in layers]
        for layer in layers:
            layer["u"] = torch.zeros_like(layer["theta"])
            layer["w_avg"] = torch.zeros_like(layer["theta"])

    def predict(self):
        n_params = sum(layer["theta"].numel() for layer in self.layers)
        d = torch.stack([(layer["w_avg"] - layer["theta"]).norm() for layer in self.layers]).norm() / n_params
        self.qw_avg = 0.9 * self.qw_avg + 0.1 * d  # E30
        for layer in self.layers:  # E31
            layer["theta"] += layer["u"]
            layer["u"] *= self.a
        F = torch.tensor([[1.0, 1.0], [0.0, self.a]], dtype=torch.float64)
        self.P = F @ self.P @ F.T + torch.diag(torch.stack([self.qw_avg, torch.tensor(self.qv, dtype=torch.float64)]))  # E32

    def update(self, grads, loss, noise_measurement):
        ratios = []
        for i, (layer, g) in enumerate(zip(self.layers, grads)):
            self.R[i] = noise_estimate(self.R[i], noise_measurement, layer["r"], layer["alpha_r"])
            theta, wd = layer["theta"], layer["weight_decay"]
            H = g + wd * theta
            layer_loss = loss + wd / 2 * theta.dot(theta)
            S = H.dot(H) * self.P[0, 0] + self.R[i]
            k1 = layer["lr"] * layer_loss * self.P[0, 0] / S
            k2 = layer["lr"] * layer_loss * self.P[1, 0] / S
            theta -= k1 * H  # E33
            layer["u"] -= k2 * H
            layer["w_avg"] = 0.9 * layer["w_avg"] + 0.1 * theta  # E34
            ratios.append(H.dot(H) / S)
        h = max(ratios)  # E35
        self.P = self.P - self.P @ torch.tensor([[h, 0.0], [0.0, 0.0]], dtype=torch.float64) @ self.P.T  # E36


def add_layers(reference, layers) -> None:
    """Layers joining a reference mid-run (a parameter group added after steps): ``R_0 = 1`` for them (E2);
    KOALA-M's start with ``u = w_avg = 0``."""
    for layer in layers:
        if isinstance(reference, KoalaMReference):
            layer["u"] = torch.zeros_like(layer["theta"])
            layer["w_avg"] = torch.zeros_like(layer["theta"])
        reference.layers.append(layer)
        reference.R.append(torch.tensor(1.0, dtype=torch.float64))
