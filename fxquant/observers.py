"""Range observers, registered by name. Each streams: its state does not grow with the data seen.

Every observer takes `update(x)` with `x` of shape [C, N] (C channels, N samples per channel,
any float dtype) and returns `(lo, hi)` float32 tensors of shape [C] from `calc_range()`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .errors import ConfigError
from .fake_quant import qparams_from_range, qrange

OBSERVERS: dict[str, type[Observer]] = {}


def register_observer(name: str) -> Callable[[type[Observer]], type[Observer]]:
    """Class decorator that makes an observer constructible by `name` through `build_observer`."""

    def wrap(cls: type[Observer]) -> type[Observer]:
        OBSERVERS[name] = cls
        cls.name = name
        return cls

    return wrap


def build_observer(name: str, **kwargs) -> Observer:
    """Instantiate the observer registered as `name` (e.g. "minmax", "histogram", "top_10")."""
    if name.startswith("top_") and name[4:].isdigit():
        return OBSERVERS["top_k"](k=int(name[4:]), **kwargs)
    if name not in OBSERVERS:
        valid = ", ".join(sorted(OBSERVERS) + ["top_<k>"])
        raise ConfigError(f"unknown observer {name!r}; valid: {valid}")
    try:
        return OBSERVERS[name](**kwargs)
    except TypeError as exc:
        raise ConfigError(f"observer {name!r}: {exc}") from None


class Observer(torch.nn.Module):
    """Base observer: accumulates statistics of [C, N] tensors, reports a [C] range."""

    name = "base"

    def __init__(self, bits: int = 8, symmetric: bool = True, signed: bool = True) -> None:
        super().__init__()
        self.bits, self.symmetric, self.signed = bits, symmetric, signed
        self.num_updates = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Accumulate statistics of `x` [C, N]."""
        self._update(x.detach().float())
        self.num_updates += 1

    def _update(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def calc_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(lo, hi), each float32 [C]."""
        if self.num_updates == 0:
            raise RuntimeError(f"{type(self).__name__} has seen no data")
        return self._calc_range()

    def _calc_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"bits={self.bits}, symmetric={self.symmetric}"


@register_observer("minmax")
class MinMaxObserver(Observer):
    """Running minimum and maximum per channel."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def _update(self, x: torch.Tensor) -> None:
        lo, hi = x.amin(dim=1), x.amax(dim=1)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def _calc_range(self):
        return self.lo, self.hi


@register_observer("ema")
class EMAObserver(Observer):
    """Exponential moving average of each update's min and max: r <- m*r + (1-m)*r_batch."""

    def __init__(self, momentum: float = 0.9, **kw) -> None:
        super().__init__(**kw)
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"EMA momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def _update(self, x: torch.Tensor) -> None:
        lo, hi = x.amin(dim=1), x.amax(dim=1)
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            m = self.momentum
            self.lo = m * self.lo + (1 - m) * lo
            self.hi = m * self.hi + (1 - m) * hi

    def _calc_range(self):
        return self.lo, self.hi


@register_observer("top_k")
class TopKObserver(Observer):
    """Symmetric range +-(k-th largest |x|) per channel (linger's `top_10`); keeps k values per channel."""

    def __init__(self, k: int = 10, **kw) -> None:
        super().__init__(**kw)
        if k < 1:
            raise ConfigError(f"top_k needs k >= 1, got {k}")
        self.k = k
        self.top: torch.Tensor | None = None

    def _update(self, x: torch.Tensor) -> None:
        a = x.abs()
        if self.top is not None:
            a = torch.cat([self.top, a], dim=1)
        self.top = a.topk(min(self.k, a.shape[1]), dim=1).values

    def _calc_range(self):
        kth = self.top[:, -1]
        return -kth, kth


@register_observer("w_like")
class PowerOfTwoSearchObserver(Observer):
    """linger's `w_like`: the power-of-two step 2^i (i in -10..9) whose symmetric quantization
    (round, clamp) has the least squared error over everything seen, per channel; the range is
    +-step * 2^(bits-1), so that a power-of-two quantizer picks that step. Streams: one error sum
    per candidate and channel."""

    EXPONENTS = tuple(range(-10, 10))

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.errors: torch.Tensor | None = None  # [C, len(EXPONENTS)]

    def _update(self, x: torch.Tensor) -> None:
        qmin, qmax = qrange(self.bits, True)
        errs = []
        for e in self.EXPONENTS:
            step = 2.0 ** e
            errs.append(((x - torch.clamp(torch.round(x / step), qmin, qmax) * step) ** 2).sum(dim=1))
        new = torch.stack(errs, dim=1).double()
        self.errors = new if self.errors is None else self.errors + new

    def _calc_range(self):
        best = self.errors.argmin(dim=1)
        step = torch.exp2(torch.tensor(self.EXPONENTS, dtype=torch.float32)[best])
        threshold = step * 2.0 ** (self.bits - 1)
        return -threshold, threshold


@register_observer("sigma")
class SigmaObserver(Observer):
    """Range mean +- k * std per channel from running sums (msModelSlim's `sigma`), clipped to min/max."""

    def __init__(self, k: float = 25.0, **kw) -> None:
        super().__init__(**kw)
        if k <= 0:
            raise ConfigError(f"sigma observer needs k > 0, got {k}")
        self.k = k
        self.count = 0
        self.sum: torch.Tensor | None = None
        self.sumsq: torch.Tensor | None = None
        self.minmax = MinMaxObserver()

    def _update(self, x: torch.Tensor) -> None:
        x64 = x.double()
        s, sq = x64.sum(dim=1), (x64 * x64).sum(dim=1)
        self.sum = s if self.sum is None else self.sum + s
        self.sumsq = sq if self.sumsq is None else self.sumsq + sq
        self.count += x.shape[1]
        self.minmax.update(x)

    def _calc_range(self):
        mean = self.sum / self.count
        std = torch.sqrt(torch.clamp(self.sumsq / self.count - mean * mean, min=0.0))
        lo, hi = self.minmax.calc_range()
        return (torch.maximum(mean - self.k * std, lo.double()).float(),
                torch.minimum(mean + self.k * std, hi.double()).float())


class _StreamingHistogram:
    """Per-tensor histogram over a range that widens as data arrives (old counts are re-binned)."""

    def __init__(self, bins: int) -> None:
        self.bins = bins
        self.counts: torch.Tensor | None = None  # float64 [bins]
        self.lo = self.hi = 0.0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1)
        lo, hi = float(x.min()), float(x.max())
        if self.counts is None:
            self.lo, self.hi = min(lo, 0.0), max(hi, 0.0)
            if self.hi - self.lo < 1e-12:
                self.hi = self.lo + 1e-12
            self.counts = torch.zeros(self.bins, dtype=torch.float64)
        elif lo < self.lo or hi > self.hi:
            self._widen(min(lo, self.lo), max(hi, self.hi))
        self.counts += torch.histc(x.double(), self.bins, self.lo, self.hi)

    def _widen(self, lo: float, hi: float) -> None:
        old_edges = torch.linspace(self.lo, self.hi, self.bins + 1, dtype=torch.float64)
        old_cdf = torch.cat([torch.zeros(1, dtype=torch.float64), self.counts.cumsum(0)])
        new_edges = torch.linspace(lo, hi, self.bins + 1, dtype=torch.float64)
        cdf = _interp(new_edges, old_edges, old_cdf)
        self.counts = (cdf[1:] - cdf[:-1]).clamp(min=0.0)
        self.lo, self.hi = lo, hi

    def centers(self) -> torch.Tensor:
        width = (self.hi - self.lo) / self.bins
        return self.lo + width * (torch.arange(self.bins, dtype=torch.float64) + 0.5)


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of fp(xp) at x, constant beyond the ends (float64 1-D)."""
    idx = torch.searchsorted(xp, x).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    t = ((x - x0) / (x1 - x0).clamp(min=1e-300)).clamp(0.0, 1.0)
    return f0 + t * (f1 - f0)


class _HistogramBase(Observer):
    """Per-channel streaming histograms (one per channel, `bins` counts each)."""

    def __init__(self, bins: int = 2048, **kw) -> None:
        super().__init__(**kw)
        self.bins = bins
        self.hists: list[_StreamingHistogram] = []

    def _update(self, x: torch.Tensor) -> None:
        if not self.hists:
            self.hists = [_StreamingHistogram(self.bins) for _ in range(x.shape[0])]
        for hist, row in zip(self.hists, x):
            hist.add(row)

    def _calc_range(self):
        ranges = [self._range_of(h) for h in self.hists]
        lo = torch.tensor([r[0] for r in ranges], dtype=torch.float32)
        hi = torch.tensor([r[1] for r in ranges], dtype=torch.float32)
        return lo, hi

    def _range_of(self, hist: _StreamingHistogram) -> tuple[float, float]:
        raise NotImplementedError


@register_observer("histogram")
class HistogramObserver(_HistogramBase):
    """Range minimising the expected quantization MSE (clipping + rounding) over a streamed histogram."""

    def __init__(self, candidates: int = 100, **kw) -> None:
        super().__init__(**kw)
        self.candidates = candidates

    def _range_of(self, hist: _StreamingHistogram) -> tuple[float, float]:
        c, w = hist.centers(), hist.counts
        qmin, qmax = qrange(self.bits, self.signed)
        fr = torch.linspace(1.0 / self.candidates, 1.0, self.candidates, dtype=torch.float64)
        if self.symmetric:
            amax = max(-hist.lo, hist.hi)
            los, his = -fr * amax, fr * amax
        else:  # shrink each end independently: candidates^2 pairs
            los = (fr[:, None] * hist.lo).expand(-1, self.candidates).reshape(-1)
            his = (fr[None, :] * hist.hi).expand(self.candidates, -1).reshape(-1)
        scale, zp = qparams_from_range(los, his, self.bits, self.symmetric, self.signed)
        scale, zp = scale.double(), zp.double()
        errs = []
        for i in range(0, len(scale), 512):  # bounded memory: 512 x bins at a time
            s, z = scale[i:i + 512, None], zp[i:i + 512, None]
            q = torch.clamp(torch.round(c[None] / s) + z, qmin, qmax)
            err = ((q - z) * s - c[None]) ** 2
            inside = (q > qmin) & (q < qmax)
            err = torch.where(inside, s * s / 12.0, err)  # rounding noise inside, clipping outside
            errs.append((err * w[None]).sum(dim=1))
        best = int(torch.cat(errs).argmin())
        return float(los[best]), float(his[best])


@register_observer("percentile")
class PercentileObserver(_HistogramBase):
    """Range from the (100-p) and p percentiles of a streamed histogram (p=99.99 by default)."""

    def __init__(self, percentile: float = 99.99, **kw) -> None:
        super().__init__(**kw)
        if not 50.0 < percentile <= 100.0:
            raise ConfigError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile

    def _range_of(self, hist: _StreamingHistogram) -> tuple[float, float]:
        cdf = hist.counts.cumsum(0) / hist.counts.sum()
        edges = torch.linspace(hist.lo, hist.hi, hist.bins + 1, dtype=torch.float64)[1:]
        q = self.percentile / 100.0
        lo_i = int(torch.searchsorted(cdf, torch.tensor([1.0 - q], dtype=torch.float64)))
        hi_i = int(torch.searchsorted(cdf, torch.tensor([q], dtype=torch.float64)))
        lo = float(edges[min(lo_i, hist.bins - 1)]) if q < 1.0 else hist.lo
        hi = float(edges[min(hi_i, hist.bins - 1)]) if q < 1.0 else hist.hi
        if self.symmetric:
            amax = max(-lo, hi)
            return -amax, amax
        return lo, hi


@register_observer("mixed")
class MixedObserver(Observer):
    """Histogram range when max|x|/std <= threshold (50), min-max otherwise (seed 002's `mixed`)."""

    def __init__(self, threshold: float = 50.0, **kw) -> None:
        super().__init__(**kw)
        self.threshold = threshold
        self.histogram = HistogramObserver(**kw)
        self.sigma = SigmaObserver(k=1.0, **kw)

    def _update(self, x: torch.Tensor) -> None:
        self.histogram.update(x)
        self.sigma.update(x)

    def chosen(self) -> str:
        """"histogram" or "minmax", decided from the statistics seen so far."""
        s = self.sigma
        mean = s.sum / s.count
        std = torch.sqrt(torch.clamp(s.sumsq / s.count - mean * mean, min=1e-30))
        lo, hi = s.minmax.calc_range()
        ratio = torch.maximum(lo.abs(), hi.abs()).double() / std
        return "histogram" if bool((ratio <= self.threshold).all()) else "minmax"

    def _calc_range(self):
        if self.chosen() == "histogram":
            return self.histogram.calc_range()
        return self.sigma.minmax.calc_range()
