"""Quantized recurrent layers: nn.LSTM and nn.GRU as linger quantizes them.

Per time step, the input x_t and the previous hidden state h are quantized (input_quantizer,
hidden_quantizer), the weights are quantized (one quantizer per weight tensor), the biases sit on
the grid of the product they are added to (int32 in the deployed kernel), the gates run in float,
and the new cell state c (LSTM, cell_quantizer) and hidden state h are quantized. One step of an
LSTM layer, with Q a fake quantizer:

    gates = Q(x_t) Q(W_ih)^T + b_ih + Q(h) Q(W_hh)^T + b_hh         i, f, g, o = split(gates)
    c' = Q_c(sigmoid(f) c + sigmoid(i) tanh(g))        h' = Q_h(sigmoid(o) tanh(c'))

and of a GRU layer (PyTorch's gate order r, z, n):

    a = Q(x_t) Q(W_ih)^T + b_ih       b = Q(h) Q(W_hh)^T + b_hh       r, z = sigmoid(a_r + b_r), sigmoid(a_z + b_z)
    n = tanh(a_n + r b_n)             h' = Q_h((1 - z) n + z h)

Layers after the first read the previous layer's (quantized) hidden states; bidirectional layers
run the reversed sequence with their own weights. Packed sequences and LSTM projections are not
supported (NotQuantizableError / TypeError name them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .errors import NotQuantizableError
from .quant_opr import QuantOpr
from .quantizer import IdentityQuantizer, Quantizer, StaticQuantizer
from .quantizer_factory import build_quantizer
from .schemes import Scheme

Quantize = Callable[[torch.Tensor], torch.Tensor]


def _bias_on_grid(bias: torch.Tensor | None, s_in: Any, s_w: Any) -> torch.Tensor | None:
    """bias rounded to the grid s_in * s_w when both are per-tensor scales (floats), else as is."""
    if bias is None or s_in is None or s_w is None:
        return bias
    step = float(s_in) * float(s_w)
    return torch.round(bias / step) * step


def run_recurrent(kind: str, rnn: torch.nn.RNNBase, x: torch.Tensor, hx: Any, qx: Quantize, qh: Quantize,
                  qc: Quantize, weight: Callable[[str], torch.Tensor],
                  grid: Callable[[str], tuple[Any, Any]], training: bool = False) -> tuple[torch.Tensor, Any]:
    """The quantized recurrence of `rnn` (its sizes and flags) on x [T, B, I] or [B, T, I]
    (batch_first); returns what nn.LSTM / nn.GRU return; training applies rnn.dropout between layers. weight(name) gives the (fake-quantized)
    weight called `name` (e.g. "weight_ih_l0"); grid(name) the per-tensor (input, weight) steps of
    that product for its bias (None, None: float bias)."""
    if isinstance(x, torch.nn.utils.rnn.PackedSequence):
        raise TypeError("quantized LSTM / GRU take padded tensors, not PackedSequence")
    seq = x.transpose(0, 1) if rnn.batch_first else x
    unbatched = seq.dim() == 2
    if unbatched:
        seq = seq.unsqueeze(1)
    n_dir = 2 if rnn.bidirectional else 1
    T, B = seq.shape[0], seq.shape[1]
    H = rnn.hidden_size
    if hx is None:
        zeros = seq.new_zeros(rnn.num_layers * n_dir, B, H)
        hx = (zeros, zeros) if kind == "lstm" else zeros
    elif unbatched:
        hx = tuple(h.unsqueeze(1) for h in hx) if kind == "lstm" else hx.unsqueeze(1)
    h0, c0 = hx if kind == "lstm" else (hx, None)
    layer_in = seq
    h_n, c_n = [], []
    for layer in range(rnn.num_layers):
        outs = []
        for d in range(n_dir):
            sfx = f"_l{layer}" + ("_reverse" if d == 1 else "")
            w_ih, w_hh = weight("weight_ih" + sfx), weight("weight_hh" + sfx)
            b_ih = _bias_on_grid(getattr(rnn, "bias_ih" + sfx, None), *grid("weight_ih" + sfx))
            b_hh = _bias_on_grid(getattr(rnn, "bias_hh" + sfx, None), *grid("weight_hh" + sfx))
            idx = layer * n_dir + d
            h = qh(h0[idx])
            c = c0[idx] if c0 is not None else None
            steps = range(T - 1, -1, -1) if d == 1 else range(T)
            ys = [None] * T
            for t in steps:
                a = torch.nn.functional.linear(qx(layer_in[t]) if layer == 0 else layer_in[t], w_ih, b_ih)
                b = torch.nn.functional.linear(h, w_hh, b_hh)
                if kind == "lstm":
                    i, f, g, o = (a + b).chunk(4, dim=-1)
                    c = qc(torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g))
                    h = qh(torch.sigmoid(o) * torch.tanh(c))
                else:
                    ar, az, an = a.chunk(3, dim=-1)
                    br, bz, bn = b.chunk(3, dim=-1)
                    r, z = torch.sigmoid(ar + br), torch.sigmoid(az + bz)
                    n = torch.tanh(an + r * bn)
                    h = qh((1 - z) * n + z * h)
                ys[t] = h
            outs.append(torch.stack(ys))
            h_n.append(h)
            c_n.append(c)
        layer_in = torch.cat(outs, dim=-1) if n_dir == 2 else outs[0]
        if training and rnn.dropout > 0 and layer < rnn.num_layers - 1:
            layer_in = torch.nn.functional.dropout(layer_in, rnn.dropout, training=True)
    out = layer_in.squeeze(1) if unbatched else layer_in
    out = out.transpose(0, 1) if rnn.batch_first and not unbatched else out
    hn = torch.stack(h_n)
    hn = hn.squeeze(1) if unbatched else hn
    if kind == "gru":
        return out, hn
    cn = torch.stack(c_n)
    return out, (hn, cn.squeeze(1) if unbatched else cn)


class _QRecurrent(QuantOpr):
    """QuantOpr of an nn.LSTM / nn.GRU (weights shared with it): input_quantizer for x,
    weight_quantizers (one per weight tensor), hidden_quantizer for h, cell_quantizer for c."""

    kind = "lstm"

    def __init__(self, rnn: torch.nn.RNNBase, scheme: Scheme) -> None:
        super().__init__(scheme)
        if getattr(rnn, "proj_size", 0):
            raise NotQuantizableError("LSTM with proj_size is not supported")
        self.__dict__["_float_module"] = rnn
        self.__dict__["rnn"] = rnn  # not a submodule: its parameters are registered here
        for name, p in rnn.named_parameters(recurse=False):
            self.register_parameter(name, p)
        self.weight_names = [n for n, _ in rnn.named_parameters(recurse=False) if n.startswith("weight_")]
        self.weight_quantizers = torch.nn.ModuleDict({n: build_quantizer(scheme.weight) for n in self.weight_names})
        self.hidden_quantizer = build_quantizer(scheme.activation)
        self.cell_quantizer = build_quantizer(scheme.activation) if self.kind == "lstm" else IdentityQuantizer()

    def _state_quantizers(self) -> list[Quantizer]:
        return [self.hidden_quantizer, self.cell_quantizer]

    def set_quant(self, w_quant: bool = True, a_quant: bool = True) -> QuantOpr:
        super().set_quant(w_quant, a_quant)
        for q in self.weight_quantizers.values():
            q.enabled = w_quant and not isinstance(q, IdentityQuantizer)
        for q in self._state_quantizers():
            q.enabled = a_quant and not isinstance(q, IdentityQuantizer)
        return self

    def freeze(self) -> None:
        super().freeze()
        for q in [*self.weight_quantizers.values(), *self._state_quantizers()]:
            if isinstance(q, StaticQuantizer):
                q.freeze()

    @torch.no_grad()
    def calibrate_from_inputs(self, inputs: list[Any]) -> None:
        """Weights from themselves; hidden and cell states from a float run over the stored
        inputs (every step, layer and direction)."""
        for name, q in self.weight_quantizers.items():
            if isinstance(q, StaticQuantizer):
                q.reset_observer()
                q.observe(getattr(self, name).detach())
                q.calc_qparams()
        observed = [q for q in self._state_quantizers() if isinstance(q, StaticQuantizer)]
        for q in observed:
            q.reset_observer()

        def observer(q: Quantizer) -> Quantize:
            def see(t: torch.Tensor) -> torch.Tensor:
                if isinstance(q, StaticQuantizer):
                    q.observe(t)
                return t
            return see

        for x in inputs:
            run_recurrent(self.kind, self.rnn, x, None, lambda t: t, observer(self.hidden_quantizer),
                          observer(self.cell_quantizer), lambda n: getattr(self, n), lambda n: (None, None))
        for q in observed:
            q.calc_qparams()

    def _grid(self, name: str) -> tuple[Any, Any]:
        """Per-tensor steps (input, weight) of the product `name` feeds, for the int32 bias."""
        wq = self.weight_quantizers[name]
        aq = self.input_quantizer if name.startswith("weight_ih_l0") else self.hidden_quantizer
        ok = all(isinstance(q, StaticQuantizer) and q.enabled and q.calibrated and q.scale.numel() == 1
                 for q in (wq, aq))
        return (aq.scale, wq.scale) if ok else (None, None)

    def _weight(self, name: str) -> torch.Tensor:
        return self.weight_quantizers[name](getattr(self, name))

    def forward(self, x: torch.Tensor, hx: Any = None) -> Any:
        return run_recurrent(self.kind, self.rnn, x, hx, self.input_quantizer, self.hidden_quantizer,
                             self.cell_quantizer, self._weight, self._grid, self.training)

    def extra_repr(self) -> str:
        r = self.rnn
        return (f"{r.input_size}, {r.hidden_size}, num_layers={r.num_layers}, "
                f"bidirectional={r.bidirectional}, scheme={self.scheme}")


class QLSTM(_QRecurrent):
    kind = "lstm"


class QGRU(_QRecurrent):
    kind = "gru"

    def _state_quantizers(self) -> list[Quantizer]:
        return [self.hidden_quantizer]
