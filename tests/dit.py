"""A small diffusion transformer (adaLN DiT) trained for seconds on scikit-learn's 8x8 digits, and
a DDIM sampling loop that can record the model's keyword inputs at every step."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

T_TRAIN = 1000


def _alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(1e-4, 0.02, T_TRAIN)
    return torch.cumprod(1.0 - betas, dim=0)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of t [b] (float) -> [b, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class DiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.ada = nn.Linear(dim, 6 * dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(F.silu(c)).unsqueeze(1).chunk(6, dim=-1)
        h = self.norm1(x) * (1 + sc1) + sh1
        q, k, v = self.qkv(h).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + g1 * self.proj(a)
        h = self.norm2(x) * (1 + sc2) + sh2
        return x + g2 * self.fc2(F.gelu(self.fc1(h)))


class TinyDiT(nn.Module):
    """forward(hidden_states [b, 1, 8, 8], timestep [b]) -> predicted noise [b, 1, 8, 8]."""

    def __init__(self, dim: int = 64, depth: int = 3, heads: int = 4, patch: int = 2) -> None:
        super().__init__()
        self.patch, self.dim = patch, dim
        self.embed = nn.Linear(patch * patch, dim)
        self.pos = nn.Parameter(torch.randn(1, (8 // patch) ** 2, dim) * 0.02)
        self.t_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(DiTBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.out = nn.Linear(dim, patch * patch)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        b, p = hidden_states.shape[0], self.patch
        x = hidden_states.reshape(b, 8 // p, p, 8 // p, p).permute(0, 1, 3, 2, 4).reshape(b, -1, p * p)
        x = self.embed(x) + self.pos
        c = self.t_mlp(timestep_embedding(timestep, self.dim))
        for blk in self.blocks:
            x = blk(x, c)
        x = self.out(self.norm(x))
        return x.reshape(b, 8 // p, 8 // p, p, p).permute(0, 1, 3, 2, 4).reshape(b, 1, 8, 8)


def train_dit(steps: int = 600, seed: int = 0) -> TinyDiT:
    """TinyDiT trained as a DDPM noise predictor on the digits (pixels scaled to [-1, 1])."""
    torch.manual_seed(seed)
    images = torch.tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    model = TinyDiT()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    abar = _alphas_cumprod()
    for _ in range(steps):
        x0 = images[torch.randint(0, len(images), (128,))]
        t = torch.randint(0, T_TRAIN, (128,))
        noise = torch.randn_like(x0)
        a = abar[t].reshape(-1, 1, 1, 1)
        loss = F.mse_loss(model(a.sqrt() * x0 + (1 - a).sqrt() * noise, t.float()), noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def ddim_sample(model: nn.Module, noise: torch.Tensor, num_steps: int = 10, on_step=None,
                record: list | None = None) -> torch.Tensor:
    """Deterministic DDIM from `noise` [b, 1, 8, 8]; on_step(i) runs before step i's model call and
    `record` collects each call's keyword inputs."""
    abar = _alphas_cumprod()
    ts = torch.linspace(T_TRAIN - 1, 0, num_steps).long()
    x = noise
    for i, t in enumerate(ts):
        kwargs = {"hidden_states": x, "timestep": torch.full((x.shape[0],), float(t))}
        if record is not None:
            record.append(dict(kwargs))
        if on_step is not None:
            on_step(i)
        eps = model(**kwargs)
        a = abar[t]
        a_prev = abar[ts[i + 1]] if i + 1 < num_steps else torch.tensor(1.0)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x
