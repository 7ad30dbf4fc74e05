"""Orthogonal rotations for outlier spreading: Hadamard matrices of many orders, randomised.

A Hadamard matrix H [n, n] has entries +-1 and H H^T = n I, so H / sqrt(n) is orthogonal and spreads
every input channel evenly over all outputs: an outlier channel of x becomes n channels of size
|x_j| / sqrt(n) in x H / sqrt(n). Orders built here: 2^k (Sylvester), q + 1 for a prime q = 3 mod 4
(Paley I), 2 (q + 1) for a prime q = 1 mod 4 (Paley II), and their products with powers of two
(Kronecker), which covers the hidden sizes of common transformers (576 = 72 x 8, 1536 = 12 x 128,
896 = 28 x 32, 3072 = 12 x 256). Other orders fall back to a random orthogonal matrix (QR of a
Gaussian), which rotates as well but spreads outliers less evenly.
"""

from __future__ import annotations

import logging
from functools import lru_cache

import torch
from torch import fx

log = logging.getLogger(__name__)

#: the Hadamard matrix of order 2
_H2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % p for p in range(2, int(q ** 0.5) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q [q, q] with Q[i, j] = chi(j - i), chi the quadratic character mod the prime q (chi(0) = 0)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if r in squares else -1 for r in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _paley(m: int) -> torch.Tensor | None:
    """A Hadamard matrix of order m from a Paley construction, or None if m has none."""
    q = m - 1
    if _is_prime(q) and q % 4 == 3:  # Paley I: I + [[0, 1^T], [-1, Q]] with Q skew
        s = torch.zeros(m, m, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
        return torch.eye(m, dtype=torch.float64) + s
    q = m // 2 - 1
    if m % 2 == 0 and _is_prime(q) and q % 4 == 1:  # Paley II from the symmetric conference matrix
        c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
        b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, _H2) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)
    return None


def _sylvester(p: int) -> torch.Tensor:
    """The Sylvester Hadamard matrix of order p = 2^k, float64."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.kron(h, _H2)
    return h


@lru_cache(maxsize=16)
def hadamard_factors(n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(B [m, m], S [p, p]) with n = m p, B a Paley (or 1 x 1) and S a Sylvester Hadamard matrix:
    kron(B, S) is a Hadamard matrix of order n. None when no m here fits."""
    power = 1
    while n % (power * 2) == 0:
        power *= 2
    while power >= 1:
        m = n // power
        base = torch.ones(1, 1, dtype=torch.float64) if m == 1 else _paley(m)
        if base is not None:
            return base, _sylvester(power)
        power //= 2
    return None


def hadamard_matrix(n: int) -> torch.Tensor | None:
    """A Hadamard matrix float64 [n, n] (entries +-1, H H^T = n I), or None when no construction
    here reaches order n."""
    if n < 1:
        raise ValueError(f"order must be positive, got {n}")
    factors = hadamard_factors(n)
    return None if factors is None else torch.kron(*factors)


def random_rotation(n: int, seed: int = 0) -> torch.Tensor:
    """An orthogonal float64 [n, n]: diag(random signs) H / sqrt(n) with H a Hadamard matrix of
    order n, or, where none is known, Q of the QR decomposition of a Gaussian matrix. Deterministic
    for a given (n, seed)."""
    factors = hadamard_factors(n)
    if factors is not None:
        signs = _random_signs(n, torch.Generator().manual_seed(seed))
        return signs[:, None] * torch.kron(*factors) / n ** 0.5
    log.info("no Hadamard matrix of order %d is built here; rotating with a random orthogonal matrix", n)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


def _random_signs(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, (n,), generator=gen, dtype=torch.float64) * 2 - 1


class KroneckerRotation(torch.nn.Module):
    """x [..., m p] -> x R at run time, R = kron(M, N) with M [m, m] and N [p, p] orthogonal: x viewed
    [..., m, p] becomes M^T X N, two small matmuls, m + p multiply-adds per element instead of
    m p. What msModelSlim's Ascend checkpoint stores as a layer's `kronecker_rotation_m` (M) and
    `kronecker_rotation_n` (N), with this meaning. Raises ValueError when a factor is not square
    and orthogonal (within 1e-4)."""

    def __init__(self, left: torch.Tensor, right: torch.Tensor) -> None:
        super().__init__()
        for name, f in (("M", left), ("N", right)):
            if f.dim() != 2 or f.shape[0] != f.shape[1] or not torch.allclose(
                    f.double() @ f.double().T, torch.eye(f.shape[0], dtype=torch.float64), atol=1e-4):
                raise ValueError(f"rotation factor {name} {tuple(f.shape)} is not a square orthogonal matrix")
        self.n = left.shape[0] * right.shape[0]
        self.register_buffer("left", left.detach().float().clone())
        self.register_buffer("right", right.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, p = self.left.shape[0], self.right.shape[0]
        y = x.reshape(*x.shape[:-1], m, p)
        y = torch.matmul(self.left.t().to(x.dtype), torch.matmul(y, self.right.to(x.dtype)))
        return y.reshape(x.shape)

    def matrix(self) -> torch.Tensor:
        """R = kron(M, N) as a dense float64 [n, n]."""
        return torch.kron(self.left.double(), self.right.double())

    def extra_repr(self) -> str:
        return f"n={self.n} ({self.left.shape[0]} x {self.right.shape[0]})"


class HadamardTransform(KroneckerRotation):
    """The randomised Hadamard KroneckerRotation of order n = m p: M = diag(signs) B / sqrt(m),
    N = diag(signs) S / sqrt(p) (B Paley or 1 x 1, S Sylvester, signs drawn from `seed`). The online
    rotation of an input whose producer cannot absorb one (the gated product before an MLP's down
    projection); the consumer's weight takes R (W R)."""

    def __init__(self, n: int, seed: int = 0) -> None:
        factors = hadamard_factors(n)
        if factors is None:
            raise ValueError(f"no Hadamard matrix of order {n} is built here (orders m 2^k, m = 1 or a Paley "
                             "order q + 1 / 2 (q + 1))")
        gen = torch.Generator().manual_seed(seed)
        super().__init__(*(_random_signs(f.shape[0], gen)[:, None] * f / f.shape[0] ** 0.5 for f in factors))


class RotatedInput(torch.nn.Module):
    """layer(transform(x)): a layer whose input is rotated online, installed under the layer's own
    name when a graph with an online rotation is written back into its model (fxquant.apply) or
    loaded from an Ascend checkpoint that lists the layer in metadata.quarot (load_ascend)."""

    def __init__(self, transform: KroneckerRotation, layer: torch.nn.Module) -> None:
        super().__init__()
        self.transform = transform
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(self.transform(x))


def online_rotations(gm: fx.GraphModule) -> dict[fx.Node, fx.Node]:
    """{layer node: the KroneckerRotation node that feeds it and nothing else}: the online input
    rotations (OnlineHadamard) of a graph, each installable as RotatedInput(transform, layer)."""
    out = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), KroneckerRotation) \
                and len(node.users) == 1:
            user = next(iter(node.users))
            if user.op == "call_module" and user.args[:1] == (node,):
                out[user] = node
    return out
