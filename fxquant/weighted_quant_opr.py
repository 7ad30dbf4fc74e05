"""WeightedQuantOpr: the part of a quantized layer (Linear, Conv) that holds its weight.

With both weight and activation quantized (int8), a layer runs the deployed arithmetic in every
grad mode: integer accumulation of codes, zero-point correction, then one float multiply by
input_scale * weight_scale (gradients pass straight through the integer accumulation). This class
keeps the weight's codes and qparams, releases the float weight at freeze, and caches the operands
of the device's kernel; QLinear and QConvNd run them.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable, Hashable
from typing import TypeVar

import torch

from fxquant.kernels import code_row_sums
from fxquant.kernels.int_conv import (
    PackedConvWeight,
)
from fxquant.kernels.onednn_split import SplitPackedWeight
from fxquant.kernels.weight_only import (
    from_gemv_layout,
    gemv_block,
    pack_codes,
    to_gemv_layout,
    unpack_codes,
)

from .errors import ConfigError
from .fake_quant import dequantize_codes, round_ste
from .kernel_choice import is_int8_pair, layer_kernel
from .quant_opr import QuantOpr
from .quantizer import DynamicQuantizer, IdentityQuantizer, Quantizer, StaticQuantizer
from .quantizer_factory import build_quantizer
from .schemes import Scheme
from .timestep import TimestepQuantizer

T = TypeVar("T")


class WeightedQuantOpr(QuantOpr):
    """QuantOpr with a weight [out, in, ...] and optional bias, shared with the float layer.

    freeze() caches the weight's integer codes (`weight_codes`: int8, weight's shape; 4-bit codes
    packed two per byte, uint8 [n, k / 2]) and releases the float weight, so that a frozen layer
    holds only codes, qparams and bias; `weight` then reads as the dequantized weight. Weight-only
    linear layers keep those bytes in the GEMV layout instead (`codes_blocked`; see
    kernels/weight_only.py), which compiled decode reads directly.
    """

    codes_blocked = False  # weight_codes in the GEMV layout (layers pickled before it existed: no)

    def __init__(self, layer: torch.nn.Module, scheme: Scheme) -> None:
        super().__init__(scheme)
        self.__dict__["_float_module"] = layer  # not a submodule: no duplicate state
        self.weight = layer.weight
        self.bias = layer.bias
        self.weight_quantizer = build_quantizer(scheme.weight)
        self.register_buffer("weight_codes", None, persistent=False)
        self.register_buffer("weight_row_sums", None, persistent=False)
        self.codes_fixed = False
        self.kernel = "simulated"  # what forward runs; freeze() picks the device's kernel
        self.weight_shape = tuple(layer.weight.shape)
        self.weight_dtype = layer.weight.dtype
        self._input_zero: int | None = None  # frozen static per-tensor zero point, as a Python int

    def __getattr__(self, name: str):
        if name == "weight" and self.float_weight_released:
            return self.quantized_weight()  # the float weight is gone: what it quantized to
        return super().__getattr__(name)

    @property
    def float_weight_released(self) -> bool:
        """True once freeze() dropped the float weight (only codes and qparams remain)."""
        return "weight" not in self._parameters

    def to_float(self) -> torch.nn.Module:
        """The float module this QuantOpr stands for: the original layer (weights shared), or once
        the float weight is released, a copy of its type holding the dequantized weight."""
        layer = self.__dict__["_float_module"]
        if not self.float_weight_released:
            return layer
        out = _released_layer(layer)
        out.weight = torch.nn.Parameter(self.quantized_weight().detach(), requires_grad=False)
        return out

    @property
    def float_type(self) -> type[torch.nn.Module]:
        """The class of the float layer this stands for: to_float()'s type, without dequantizing."""
        return type(self.__dict__["_float_module"])

    def set_quant(self, w_quant: bool = True, a_quant: bool = True) -> QuantOpr:
        """Turn fake quantization of the weight and of the inputs on or off (the weight stays
        quantized once freeze() released its float copy)."""
        if not w_quant and self.float_weight_released:
            raise ConfigError("this layer's float weight was released at freeze; freeze with "
                              "keep_float_weight=True (e.g. for fine-tuning) to switch weight quantization off")
        return super().set_quant(w_quant, a_quant)

    def set_weight_codes(self, codes: torch.Tensor, scale: torch.Tensor | None = None) -> None:
        """Fix the weight's integer codes (weight's shape, integer-valued) and optionally its scale
        (the weight quantizer's scale shape), e.g. learned rounding or GPTQ; calibration keeps
        them. 4-bit codes are stored packed, as freeze() stores them."""
        wq = self.weight_quantizer
        if not isinstance(wq, StaticQuantizer):
            raise TypeError("fixed weight codes need a static weight quantizer")
        if scale is not None:
            wq.scale = scale.to(wq.scale)
        codes = torch.clamp(codes.round(), wq.qmin, wq.qmax).reshape(self.weight_shape)
        self._store_codes(codes)
        self.codes_fixed = True

    def _store_codes(self, codes: torch.Tensor) -> None:
        """Keep integer codes (weight's shape) as weight_codes: pack_codes' storage, in the GEMV
        layout where the layer takes the fused GEMV (_gemv_layout_fits)."""
        self.weight_codes = self._laid_out(pack_codes(codes, self.weight_quantizer.spec.bits))

    def _laid_out(self, stored: torch.Tensor) -> torch.Tensor:
        """pack_codes' storage [n, kb] in this CPU's layout: GEMV blocks where the layer takes the
        fused GEMV, else as it is; codes_blocked follows."""
        block = gemv_block()
        self.codes_blocked = self._gemv_layout_fits(block)
        return to_gemv_layout(stored, block) if self.codes_blocked else stored

    def _gemv_layout_fits(self, block: int) -> bool:
        """True where compiled decode runs codes_gemv over this layer's codes, kept in blocks of
        `block` rows (QLinear overrides)."""
        return False

    def _static_codes(self) -> torch.Tensor:
        """weight_codes; under torch.compile with sizes fixed in the graph (dynamic=True makes
        buffer sizes symbolic, which made tracing each layer several times slower)."""
        if torch.compiler.is_compiling():
            torch._dynamo.mark_static(self.weight_codes)
        return self.weight_codes

    def _row_codes(self) -> torch.Tensor:
        """weight_codes in pack_codes' row order ([n, ...]), whatever layout they are kept in."""
        return from_gemv_layout(self._static_codes()) if self.codes_blocked else self._static_codes()

    def weight_int8(self) -> torch.Tensor:
        """The deployed integer codes of the weight as int8, weight's shape (the frozen codes
        themselves when they are kept unpacked: no float temporaries, no copy)."""
        if self._stored_codes_in_use():
            return unpack_codes(self._row_codes(), self.weight_quantizer.spec.bits, self.weight_shape)
        return self._weight_codes().round().reshape(self.weight_shape).to(torch.int8)

    def calibrate_weight(self) -> None:
        """Observe the weight and set its qparams (kept as they are once set_weight_codes fixed them)."""
        wq = self.weight_quantizer
        if isinstance(wq, StaticQuantizer) and not self.codes_fixed and not self.float_weight_released:
            wq.reset_observer()
            wq.observe(self.weight.detach())
            if wq.spec.clip_search:
                wq.search_clipping(self.weight.detach())
            else:
                wq.calc_qparams(like=self.weight)
            self.weight_codes = None

    def freeze(self, keep_float_weight: bool = False) -> None:
        """Drop observers, cache the weight's integer codes and pick the kernel. Unless
        keep_float_weight (fine-tuning the float weight), release the float weight."""
        super().freeze()
        wq = self.weight_quantizer
        if not (isinstance(wq, StaticQuantizer) and wq.calibrated):
            return
        self._round_scales_to_model_dtype()
        if self.weight_codes is None or (not self.codes_fixed and not self.float_weight_released):
            with torch.no_grad():
                codes = wq.quantize(self.weight)[0].reshape(self.weight_shape)
            self._store_codes(codes)
        aq = self.input_quantizer
        if isinstance(aq, StaticQuantizer) and aq.calibrated and aq.zero_point.numel() == 1:
            self._input_zero = int(aq.zero_point) - (0 if aq.spec.signed else 128)
            if self._input_zero:
                self.weight_row_sums = code_row_sums(self.weight_int8().reshape(self.weight_shape[0], -1))
        self.kernel = layer_kernel(self, self.weight_codes.device)
        if not keep_float_weight and not self.float_weight_released:
            del self._parameters["weight"]
            self.__dict__["_float_module"] = _released_layer(self.__dict__["_float_module"])
            self._non_persistent_buffers_set.discard("weight_codes")
        with torch.no_grad():
            self._packed_weight()  # built now, so that torch.compile finds it

    def _round_scales_to_model_dtype(self) -> None:
        """For a float16 / bfloat16 layer, round the scales a deployed checkpoint keeps in the
        model's dtype to that dtype (static activation scales, every timestep's; the weight scales
        of weight-only layers): the frozen layer then computes with the scales the deployed model
        reads (the Ascend format, docs/formats.md). Scales stay float32 tensors; float32 layers
        are left alone."""
        dtype = self.weight_dtype
        if dtype not in (torch.float16, torch.bfloat16):
            return
        rounded = [q for aq in self.input_quantizers for q in aq.modules()
                   if isinstance(q, StaticQuantizer) and q.calibrated]
        if isinstance(self.input_quantizer, IdentityQuantizer):
            rounded.append(self.weight_quantizer)
        smallest = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps  # the smallest subnormal
        for q in rounded:
            q.scale = q.scale.clamp(min=smallest).to(dtype).to(q.scale.dtype)

    #: the kernels that run on oneDNN's packed copy of the codes (_pack)
    packed_kernels = ("onednn_split",)

    def _pack(self, codes: torch.Tensor) -> SplitPackedWeight | PackedConvWeight:
        """The operands of the layer's kernel (one of packed_kernels) for the stored codes [n, ...]
        (in row order)."""
        return SplitPackedWeight(codes)

    def _packed_weight(self) -> SplitPackedWeight | PackedConvWeight | None:
        """The operands of the layer's kernel (one of packed_kernels) for the stored int8 codes, cached
        in the layer (not saved) and rebuilt when the codes or the kernel change; None for other
        kernels or unfrozen codes."""
        if self.kernel not in self.packed_kernels or not self._stored_codes_in_use():
            return None
        cached = self.__dict__.get("_packed")
        if torch.compiler.is_compiling():
            return cached  # built by freeze(), a copy or a load (packing cannot be traced)
        codes = self._row_codes()
        if cached is None or cached.kernel != self.kernel or not cached.matches(codes):
            cached = self.__dict__["_packed"] = self._pack(codes)
        return cached

    def _needs_grad(self, x: torch.Tensor) -> bool:
        """True when this call's output must carry gradients to x or the bias."""
        return torch.is_grad_enabled() and (x.requires_grad or (self.bias is not None and self.bias.requires_grad))

    def _kept_scaling(self, aq: Quantizer, build: Callable[[], T], key: Hashable) -> T:
        """build() (the output scaling: deq and quantized bias), kept between calls without gradients
        while the input scale, the weight scale and the bias stay as they are; with gradients enabled
        built each call (scales or bias may carry them)."""
        if torch.is_grad_enabled():
            return build()
        sources = (aq.scale, self.weight_quantizer.scale, self.bias)
        return self._derived("_cached_output_scaling", sources, build, key=(id(aq), key))

    def _derived(self, name: str, sources: tuple[torch.Tensor | None, ...], build: Callable[[], T],
                 key: Hashable = None) -> T:
        """build(), kept in the layer under `name` while the tensors of `sources` (or None) stay the
        same objects at the same versions and `key` is the same: eager inference's values derived
        from scales and bias, which took more time than a small layer's GEMM or convolution. Traced
        (torch.compile), build() runs each time. A kept None (a WeightCodesCache after a copy or
        unpickling) is built again."""
        if torch.compiler.is_compiling():
            return build()
        versions = [-1 if t is None else t._version for t in sources]
        cached = self.__dict__.get(name)
        if (cached is not None and cached[3] is not None and cached[1] == versions
                and (cached[2] is key or cached[2] == key)
                and all(map(operator.is_, cached[0], sources))):
            return cached[3]
        value = build()
        self.__dict__[name] = (sources, versions, key, value)
        return value

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> WeightedQuantOpr:
        """`.to(dtype)`, `.half()`, `.bfloat16()`...: the layer then computes in the new float dtype
        (its dequantized weight, bias and scales); the integer codes stay as they are."""
        out = super()._apply(fn, recurse)
        self.weight_dtype = fn(torch.empty(0, dtype=self.weight_dtype)).dtype
        return out

    def __setstate__(self, state: dict) -> None:
        """A copy or an unpickled layer takes this CPU's GEMV layout and rebuilds its own packed
        operands (not copied)."""
        super().__setstate__(state)
        if self.codes_blocked and self.weight_codes is not None:
            self.weight_codes = self._in_this_cpu_layout(self.weight_codes)
        if state.get("kernel") in self.packed_kernels:
            self._packed_weight()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        """weight_codes saved on a CPU of another GEMV block size load in this CPU's layout."""
        key = prefix + "weight_codes"
        codes = state_dict.get(key)
        if codes is not None and self.weight_codes is not None and codes.shape != self.weight_codes.shape:
            state_dict[key] = self._in_this_cpu_layout(codes)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _in_this_cpu_layout(self, codes: torch.Tensor) -> torch.Tensor:
        """Linear weight codes in the GEMV layout of another block size B' ([n / B', w, 4 B'], from
        a CPU with other vectors) re-blocked to this CPU's B, or back in row order where B does not
        fit the weight's shape; codes_blocked follows. Other codes come back as they are."""
        if len(self.weight_shape) != 2 or codes.dim() != 3:
            return codes
        if self.codes_blocked and codes.shape[-1] == 4 * gemv_block():
            return codes
        return self._laid_out(from_gemv_layout(codes))

    def _stored_codes_in_use(self) -> bool:
        """True when forward reads the stored integer codes (frozen, fixed, or released float
        weight), not codes quantized afresh from the float weight."""
        return self.weight_codes is not None and (self.codes_fixed or self.float_weight_released
                                                  or not torch.is_grad_enabled())

    def _weight_codes(self) -> torch.Tensor:
        """Integer codes of the weight (grouped shape [n, k / g, g] for per-group specs): the frozen
        int8 ones (or fixed ones) as float, else quantized from the float weight."""
        wq = self.weight_quantizer
        if self._stored_codes_in_use():
            codes = unpack_codes(self._row_codes(), wq.spec.bits, self.weight_shape).float()
            if wq.spec.granularity == "group":
                codes = codes.reshape(codes.shape[0], -1, wq.spec.group_size)
            return codes
        return wq.quantize(self.weight)[0]

    def quantized_weight(self) -> torch.Tensor:
        """The weight as the deployed model sees it (fake-quantized when enabled), weight's shape."""
        wq = self.weight_quantizer
        if not wq.enabled and not self.float_weight_released:
            return self.weight
        codes = self._weight_codes()
        scale, zp = wq.broadcast_qparams(codes if wq.spec.granularity != "group" else codes[..., 0])
        if self._stored_codes_in_use() and not torch.is_grad_enabled():
            # codes is a float tensor of our own: dequantize it in place (a fresh weight-sized
            # tensor per op costs page faults each call: 3.5 ms instead of 0.12 ms at 1536 x 576)
            weight = codes if wq.spec.symmetric and wq.spec.signed else codes.sub_(zp)
            weight = weight.mul_(scale)
        else:
            weight = dequantize_codes(codes, scale, zp)
        return weight.reshape(self.weight_shape).to(self.weight_dtype)

    def active_input_quantizer(self) -> Quantizer:
        """The input quantizer now in use (a TimestepQuantizer's one for the current step)."""
        aq = self.input_quantizer
        return aq.current() if isinstance(aq, TimestepQuantizer) and aq.enabled else aq

    def _integer_path(self, x: torch.Tensor) -> bool:
        """True when the layer runs the exact int8 x int8 -> int32 arithmetic of the kernel it
        deploys to (in every grad mode: training sees the same values, with straight-through
        gradients)."""
        wq, aq = self.weight_quantizer, self.active_input_quantizer()
        return wq.enabled and aq.enabled and is_int8_pair(wq, aq)

    def _input_codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(codes, scale, zero point) of x as signed int8 values (uint8 codes shift by -128, as
        their zero point does: the same arithmetic). The zero point is a Python int: 0 for
        per-token (symmetric) inputs, the frozen one for static per-tensor inputs."""
        aq = self.active_input_quantizer()
        codes, sx, zx = aq.quantize(x)
        if not aq.spec.signed:
            codes = codes - 128
        if isinstance(aq, DynamicQuantizer):
            return codes, sx, 0
        return codes, sx, self._static_input_zero(aq, zx)

    def _static_input_zero(self, aq: Quantizer, zx: torch.Tensor) -> int:
        """The zero point of static per-tensor input codes as signed int8 values: the frozen one
        for the layer's own quantizer, else zx (uint8 codes shift by -128)."""
        if self._input_zero is not None and aq is self.input_quantizer:
            return self._input_zero
        return int(zx) - (0 if aq.spec.signed else 128)

    def quantized_bias(self, deq: torch.Tensor) -> torch.Tensor | None:
        """Static activations: the bias on the accumulator's grid, round(bias / deq) as float
        integers, deq [n] (or [T, n]) broadcast against bias [n] (what Ascend's quant_bias and
        onnxruntime's QLinearConv add in int32)."""
        if self.bias is None:
            return None
        return round_ste(self.bias.float() / deq)

    def bias_on_grid(self) -> torch.Tensor | None:
        """The bias [n] as the deployed int32 accumulator adds it, round(b / (sx * sw)) * sx * sw,
        where input and weight have static per-tensor / per-channel scales (e.g. linger's 4-bit
        weights with 8-bit activations, which run the float path); else the float bias."""
        aq, wq = self.active_input_quantizer(), self.weight_quantizer
        static = (isinstance(aq, StaticQuantizer) and aq.enabled and aq.calibrated and aq.scale.numel() == 1
                  and isinstance(wq, StaticQuantizer) and wq.enabled and wq.calibrated
                  and wq.spec.granularity != "group")
        if self.bias is None or not static:
            return self.bias
        deq = (aq.scale * wq.scale).reshape(-1)
        return (self.quantized_bias(deq) * deq).to(self.bias.dtype)


def _released_layer(layer: torch.nn.Module) -> torch.nn.Module:
    """A shallow copy of `layer` without its weight: the attributes to_float() rebuilds from."""
    out = copy.copy(layer)
    out._parameters = {k: v for k, v in layer._parameters.items() if k != "weight"}
    return out


def scaled_accumulator(acc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """acc * scale, in place where no gradient needs acc (a fresh [m, n] buffer per step cost eager
    prefill its page faults); the same float products either way."""
    return acc * scale if acc.requires_grad else acc.mul_(scale)
