"""Small real architectures built in the tests: ResNet-style, MobileNet-style, functional ops, a tiny Llama."""

from __future__ import annotations

import copy

import torch
from torch import nn


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn + identity (or 1x1 projection), then relu."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.down is None else self.down(x)
        return torch.relu(out + identity)


class ResNetStyle(nn.Module):
    """ResNet-style CNN: stem, `blocks` stages of BasicBlocks with residual adds, pool, fc.

    x float [b, cin, h, w] -> logits [b, classes].
    """

    def __init__(self, cin: int = 1, classes: int = 10, widths=(16, 32, 64), blocks: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(cin, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, c = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks):
                layers.append(BasicBlock(c, w, stride=2 if (i > 0 and j == 0) else 1))
                c = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def resnet18_sized(classes: int = 1000) -> ResNetStyle:
    """ResNet-18 widths and depth (2 blocks per stage) on 3-channel input."""
    return ResNetStyle(cin=3, classes=classes, widths=(64, 128, 256, 512), blocks=2)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 project, residual add when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.block = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return torch.add(x, y) if self.use_res else y


class MobileNetStyle(nn.Module):
    """Depthwise-separable CNN: x float [b, cin, h, w] -> logits [b, classes]."""

    def __init__(self, cin: int = 1, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(cin, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.blocks = nn.Sequential(InvertedResidual(16, 16, 1), InvertedResidual(16, 24, 2),
                                    InvertedResidual(24, 24, 1), InvertedResidual(24, 32, 2))
        self.head = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


class FunctionalOps(nn.Module):
    """Uses +, torch.add, torch.bmm, torch.matmul and @ on activations: x [b, n, d] -> [b, n, d]."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        scores = torch.bmm(q, k.transpose(1, 2)) / 4.0
        attn = torch.softmax(scores, dim=-1)
        ctx = torch.matmul(attn, v)
        ctx2 = attn @ v
        h = torch.add(ctx, ctx2) + x
        return self.out(h) + h


class RMSNorm(nn.Module):
    """x [..., d] -> weight * x / sqrt(mean(x^2) + eps), weight [d] random in [0.5, 1.5)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class TinyLlama(nn.Module):
    """ids [b, t] -> logits [b, t, vocab]: pre-RMSNorm blocks with grouped-query attention and a
    gated MLP, head tied to the embedding, widths that are not powers of two (d 48, head 12)."""

    def __init__(self, vocab=64, d=48, heads=4, kv=2, hidden=96, layers=2, norm=RMSNorm):
        super().__init__()
        self.heads, self.kv, self.hd = heads, kv, d // heads
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            b = nn.Module()
            b.n1, b.n2 = norm(d), norm(d)
            b.q, b.k = nn.Linear(d, d, bias=False), nn.Linear(d, kv * self.hd, bias=False)
            b.v, b.o = nn.Linear(d, kv * self.hd, bias=False), nn.Linear(d, d, bias=False)
            b.gate, b.up, b.down = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False), nn.Linear(hidden, d)
            self.blocks.append(b)
        self.norm = norm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        x = self.embed(ids)
        bsz, t = ids.shape
        for b in self.blocks:
            n = b.n1(x)
            q = b.q(n).view(bsz, t, self.heads, self.hd).transpose(1, 2)
            k = b.k(n).view(bsz, t, self.kv, self.hd).transpose(1, 2)
            v = b.v(n).view(bsz, t, self.kv, self.hd).transpose(1, 2)
            rep = self.heads // self.kv
            k = k[:, :, None].expand(bsz, self.kv, rep, t, self.hd).reshape(bsz, self.heads, t, self.hd)
            v = v[:, :, None].expand(bsz, self.kv, rep, t, self.hd).reshape(bsz, self.heads, t, self.hd)
            a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + b.o(a.transpose(1, 2).reshape(bsz, t, -1))
            n = b.n2(x)
            x = x + b.down(nn.functional.silu(b.gate(n)) * b.up(n))
        return self.head(self.norm(x))


def truncated_smollm2(model: nn.Module, layers: int = 2, dtype: torch.dtype | None = None) -> nn.Module:
    """A copy of SmolLM2 with its real weights but only its first `layers` decoder layers (fast to
    quantize and compile), in `dtype` if given."""
    small = copy.deepcopy(model)
    small.model.layers = small.model.layers[:layers]
    small.config.num_hidden_layers = layers
    return small if dtype is None else small.to(dtype)
