"""linger's flow (seed 001): init -> load_state_dict -> `with calibration(): model(x)` -> training.

`init` traces the model into fxquant's IR and wraps every quantizable layer in a QuantOpr whose
quantizers follow linger's arithmetic (power-of-two steps, floor_add rounding, top_10 / abs_max
calibration, MOM or TQT while training). The first forward inside `calibration()` clamps the
weights as clamp_info says, turns functional add / bmm / matmul into small-op modules (now that
real inputs give their shapes), and calibrates every quantizer on that one round of input. After
it the model runs quantized; in training mode the quantizers keep learning (QAT).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from typing import Any

import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

from fxquant.capture import capture
from fxquant.errors import ConfigError
from fxquant.ir import bind_inputs
from fxquant.passes import Calibrate, InsertQuantOprs, ResolveSchemes, functional_to_modules
from fxquant.quant_opr import QuantOpr
from fxquant.quant_opr_table import RECURRENT_LAYERS
from fxquant.quantizer import QuantSpec
from fxquant.schemes import Scheme, SchemeOptions

from .config import CONV_LIMITS, ClampInfo, LingerConfig
from .constrain import strip_constraints
from .selection import check_disable_module, check_disable_submodel, is_disabled, load_config

log = logging.getLogger(__name__)

META_CONFIG, META_STATE = "linger_config", "linger_state"
_QUANTIZABLE = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)


class _CalibrationBlock:
    """What one `with calibration():` block saw."""

    def __init__(self) -> None:
        self.calibrated: list[str] = []


#: the calibration block the current thread / task is inside (None outside every block)
_ACTIVE_BLOCK: ContextVar[_CalibrationBlock | None] = ContextVar("fxquant_linger_calibration", default=None)


def linger_scheme(cfg: LingerConfig) -> Scheme:
    """The Scheme a linger config gives every quantized layer: per-tensor symmetric power-of-two
    weights (weight_bits) and activations (activate_bits; 32 leaves activations float), floor_add
    rounding, the configured calibrators and QAT method."""
    qi = cfg.quant_info
    qat = qi.qat_method.lower()

    def observer(name: str) -> tuple[str, dict]:
        return {"top_10": ("top_k", {"k": 10}), "w_like": ("w_like", {})}.get(name, ("minmax", {}))

    w_obs, w_kw = observer(qi.w_calibrate_name)
    a_obs, a_kw = observer(qi.a_calibrate_name)
    weight = QuantSpec(bits=qi.weight_bits, symmetric=True, granularity="tensor", rounding="floor_add",
                       observer=w_obs, observer_kwargs=w_kw, qat=qat)
    act = None if qi.activate_bits == 32 else QuantSpec(
        bits=qi.activate_bits, symmetric=True, granularity="tensor", rounding="floor_add", observer=a_obs,
        observer_kwargs=a_kw, qat=qat)
    return Scheme(f"linger_w{qi.weight_bits}a{qi.activate_bits}", weight, act)


def init(model: torch.nn.Module, config_file: str | None = None, disable_module: Sequence[type] = (),
         disable_submodel: Sequence[str] = (), *, config: LingerConfig | None = None) -> torch.nn.Module:
    """Prepare `model` for linger quantization: a GraphModule called like `model`, with every
    Linear / Conv1d / Conv2d wrapped in a QuantOpr (not yet calibrated), trainable.

    config_file: linger YAML (default: linger's defaults; or pass `config`). disable_module:
    module types kept float, e.g. (nn.LSTM, nn.Linear). disable_submodel: names where 'name*'
    matches that module and everything below it. The user's model is not modified (a copy is
    traced). With open_quant: false the model comes back unchanged.
    """
    cfg = load_config(config_file, config)
    types = check_disable_module(disable_module)
    patterns = check_disable_submodel(model, disable_submodel)
    if not cfg.open_quant:
        log.info("open_quant is false: %s is left float", type(model).__name__)
        return model
    torch.manual_seed(cfg.seed)
    model = strip_constraints(copy.deepcopy(model))
    _check_platform(model, cfg, types, patterns)
    scheme = linger_scheme(cfg)
    gm = capture(model)
    resolve = ResolveSchemes(default=scheme.name, disabled_types=types, disabled_submodules=patterns,
                             disable_last_layer=False, small_op_scheme=scheme.name, custom_schemes=(scheme.name,),
                             extra_layer_types=RECURRENT_LAYERS)
    gm = resolve(gm)
    gm = InsertQuantOprs(SchemeOptions(conv_w_per_channel=False), schemes={scheme.name: scheme})(gm)
    gm.meta[META_CONFIG] = cfg
    gm.meta[META_STATE] = {"calibrated": False, "disabled_types": types, "disabled_submodules": patterns}
    gm.register_forward_pre_hook(_calibrate_on_first_forward, with_kwargs=True)
    gm.register_load_state_dict_pre_hook(_keep_own_quantizer_state)
    gm.to(cfg.device)
    return gm.train(model.training)


@contextlib.contextmanager
def calibration() -> Iterator[None]:
    """Inside the block, the first forward of each prepared model calibrates it (one round of
    input, as linger does: call the model once with every calibration sample in the batch).
    Leaving a block in which no prepared model ran is an error."""
    block = _CalibrationBlock()
    token = _ACTIVE_BLOCK.set(block)
    try:
        yield
    finally:
        _ACTIVE_BLOCK.reset(token)
    if not block.calibrated:
        raise ConfigError("calibration() ran no forward of a model prepared by fxquant.linger.init: call "
                          "model(x) inside the block")


def config_save_to_yaml(path: str, model_or_config: torch.nn.Module | LingerConfig) -> None:
    """Write the config in force for a prepared model (or a LingerConfig) to `path` as YAML;
    init(model, path) with it prepares the same model."""
    cfg = model_or_config if isinstance(model_or_config, LingerConfig) else config_of(model_or_config)
    cfg.save_yaml(path)


def config_of(model: torch.nn.Module) -> LingerConfig:
    """The LingerConfig a model was prepared with."""
    cfg = getattr(model, "meta", {}).get(META_CONFIG)
    if cfg is None:
        raise ConfigError(f"{type(model).__name__} was not prepared by fxquant.linger.init")
    return cfg


def _check_platform(model: torch.nn.Module, cfg: LingerConfig, types: tuple, patterns: tuple) -> None:
    """The NPU's convolution limits (kernel 1..12, padding 0..11, stride 1/2/4) for quantized convs."""
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.modules.conv._ConvNd) or isinstance(m, types):
            continue
        if is_disabled(name, patterns):
            continue
        lo, hi = CONV_LIMITS["kernel_size"]
        pad_lo, pad_hi = CONV_LIMITS["padding"]
        padding = m.padding if isinstance(m.padding, tuple) else ()
        if any(not lo <= k <= hi for k in m.kernel_size) or any(s not in CONV_LIMITS["stride"] for s in m.stride) \
                or any(not pad_lo <= p <= pad_hi for p in padding):
            raise ConfigError(f"{name}: kernel {m.kernel_size}, stride {m.stride}, padding {m.padding} is outside "
                              f"what {cfg.platform} runs (kernel {lo}..{hi}, stride {CONV_LIMITS['stride']}, "
                              f"padding {pad_lo}..{pad_hi}); disable it with disable_submodel")


def _calibrate_on_first_forward(gm: fx.GraphModule, args: tuple, kwargs: dict) -> None:
    state = gm.meta[META_STATE]
    block = _ACTIVE_BLOCK.get()
    if block is None:
        if not state["calibrated"]:
            raise ConfigError("this linger model has not been calibrated: call it once inside "
                              "`with fxquant.linger.calibration():` before using it")
        return
    if state["calibrated"]:
        raise ConfigError("this linger model is already calibrated: linger calibrates on one round of "
                          "input (put every calibration sample in one batch)")
    _calibrate(gm, args, kwargs)
    block.calibrated.append(type(gm).__name__)


@torch.no_grad()
def _calibrate(gm: fx.GraphModule, args: tuple, kwargs: dict) -> None:
    cfg: LingerConfig = gm.meta[META_CONFIG]
    state = gm.meta[META_STATE]
    was_training = gm.training
    _clamp_weights(gm, cfg)
    bound = bind_inputs(gm, args, kwargs)
    ShapeProp(gm).propagate(*bound.values())
    scheme = linger_scheme(cfg)
    functional_to_modules(gm)
    gm.recompile()
    ResolveSchemes(default=scheme.name, disabled_types=state["disabled_types"],
                   disabled_submodules=state["disabled_submodules"], disable_last_layer=False,
                   small_op_scheme=scheme.name, custom_schemes=(scheme.name,),
                             extra_layer_types=RECURRENT_LAYERS)(gm)
    InsertQuantOprs(SchemeOptions(conv_w_per_channel=False), schemes={scheme.name: scheme})(gm)
    gm.to(cfg.device)
    # layerwise: this runs inside gm's own forward pre-hook, which a streaming forward would re-enter
    Calibrate([{p.target: v for p, v in bound.items()}], device=cfg.device, progress=False, streaming=False)(gm)
    state["calibrated"] = True
    gm.train(was_training)
    log.info("calibrated %d quantized operators", sum(isinstance(m, QuantOpr) for m in gm.modules()))


def _clamp_weights(gm: fx.GraphModule, cfg: LingerConfig) -> None:
    """linger initialises each weight from clamp_info before calibrating it: clamp to
    +-clamp_weight_value, else to +-clamp_factor_value * mean|W|."""
    ci = cfg.clamp_info
    for m in gm.modules():
        if not isinstance(m, QuantOpr):
            continue
        for name in getattr(m, "weight_names", ["weight"]):
            _clamp_weight(getattr(m, name, None), ci)


def _clamp_weight(w: torch.Tensor | None, ci: ClampInfo) -> None:
    """Clamp one weight in place (no-op for None)."""
    if isinstance(w, torch.Tensor):
        bound = ci.clamp_weight_value if ci.clamp_weight_value is not None else (
            float(w.abs().mean()) * ci.clamp_factor_value if ci.clamp_factor_value is not None else None)
        if bound is not None:
            w.clamp_(-bound, bound)


def _keep_own_quantizer_state(module: torch.nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """A float checkpoint (no quantizer entries) loads strictly into the prepared model: quantizer
    state missing from `state_dict` keeps its current value; a prepared model's checkpoint loads
    everything."""
    for name, value in module.state_dict().items():
        if ("_quantizer" in name) and prefix + name not in state_dict:
            state_dict[prefix + name] = value
