"""scikit-learn's digits (8x8 images) and a few seconds of training for the CNN tests."""

from __future__ import annotations

import torch


def digits_split(seed: int = 0):
    """(x_train, y_train, x_test, y_test): x float [n, 1, 8, 8] scaled to [0, 1], y int64 [n]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    return xtr, ytr, xte, yte


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 12, seed: int = 0,
          lr: float = 3e-3) -> torch.nn.Module:
    """Adam, batch 64, cross-entropy (also quantization-aware training of a prepared model, with a
    smaller lr); returns the model in eval mode."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * float((model(x).argmax(dim=1) == y).float().mean())


@torch.no_grad()
def held_out_nll(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean cross-entropy (nats) of the model's logits on x [n, 1, 8, 8] against labels y [n]."""
    return float(torch.nn.functional.cross_entropy(model(x), y))
