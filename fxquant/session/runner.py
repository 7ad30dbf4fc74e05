"""fxquant.session.run: a SessionConfig turned into a pass list (seed 002)."""

from __future__ import annotations

import logging

import torch
from torch import fx

from fxquant.passes import AWQScale, FlexSmooth, HadamardRotation, IterSmooth

from ..api import quantize
from ..calib_data import synthetic_example
from ..errors import CalibrationDataError, ConfigError
from ..formats.ascend_checkpoint import save_ascend
from ..install import apply
from ..keep_acc import weight_rounding
from ..schemes import SchemeOptions
from .config import (
    SUPPRESSION_PROCESSORS,
    M3ProcessorConfig,
    M4ProcessorConfig,
    M6ProcessorConfig,
    QuaRotProcessorConfig,
    SaveProcessorConfig,
    SessionConfig,
)

log = logging.getLogger(__name__)


def _suppression(session: SessionConfig):
    """The outlier-suppression pass the session asks for, or None."""
    name = next((n for n in SUPPRESSION_PROCESSORS if n in session.processor_cfg_map), None)
    if name is None:
        return None
    if session.calib_data is None:
        raise CalibrationDataError(f"outlier suppression {name!r} needs calib_data to measure activations")
    cfg = session.processor_cfg_map[name]
    if isinstance(cfg, M3ProcessorConfig):
        return AWQScale(session.calib_data)
    if isinstance(cfg, M4ProcessorConfig):
        return IterSmooth(session.calib_data)
    assert isinstance(cfg, M6ProcessorConfig)
    return FlexSmooth(session.calib_data, alpha=cfg.cfg.alpha, beta=cfg.cfg.beta)


def _rotation(session: SessionConfig) -> HadamardRotation | None:
    """The rotation pass the quarot processor asks for, or None."""
    cfg = session.processor_cfg_map.get("quarot")
    if not isinstance(cfg, QuaRotProcessorConfig):
        return None
    return HadamardRotation(session.calib_data, seed=cfg.seed, value_heads=cfg.value_heads, online=list(cfg.online))


def run(model: torch.nn.Module, session_config: SessionConfig, progress: bool = True,
        inplace: bool = False, mix_cfg: dict[str, str] | None = None) -> fx.GraphModule | torch.nn.Module:
    """Quantize `model` as the session says and write what its save processor asks.

    Returns the quantized GraphModule, called like `model`. Pass list: capture, resolve schemes
    (the quant processor's disable_names stay float), rotation (quarot), outlier suppression (m3 / m4 / m6), insert
    QuantOprs (Ascend rounding order), fa3 attention quantizers, layerwise calibration (with GPTQ
    weight rounding when the quant config's w_method is "gptq"), freeze. inplace: as in
    fxquant.quantize, install the quantized layers into `model` and return it (smoothing then
    folds into the model's own weights: less memory); the checkpoint is saved all the same.
    mix_cfg: {layer name or pattern: scheme} for layers that take another scheme than the quant
    processor's (seed 000's mix_cfg, e.g. {"*down_proj": "w8a8_dynamic"}); the Ascend checkpoint
    records each layer's type.
    """
    procs = session_config.processor_cfg_map
    if inplace and "fa3" in procs:
        raise ConfigError("inplace=True installs the quantized layers into the model, which has no place for "
                          "fa3's attention inputs; run the session with inplace=False")
    name = session_config.quant_processor
    quant = procs[name]
    options = SchemeOptions(act_method=quant.cfg.observer, offset_in_rounding=True,
                            timestep_sep=getattr(quant, "timestep_sep", 0))
    calib = session_config.calib_data
    example = None
    if calib is None:
        if quant.cfg.w_method != "minmax":
            raise CalibrationDataError(f"w_method={quant.cfg.w_method!r} rounds weights on calibration inputs: "
                                       "pass calib_data")
        example = synthetic_example(model)
    gm = quantize(model, calib, scheme=name, mix_cfg=mix_cfg, disable_names=list(quant.disable_names),
                  options=options, example_inputs=example, rotation=_rotation(session_config) or False,
                  suppression=_suppression(session_config),
                  attention_quant="fa3" in procs, device=session_config.device, progress=progress,
                  weight_optimizers=weight_rounding(quant.cfg.w_method), consume_model=inplace)
    save = procs.get("save")
    if isinstance(save, SaveProcessorConfig):
        save_ascend(gm, model, save.output_path, default_scheme=name, save_type=list(save.save_type),
                    safetensors_name=save.safetensors_name, json_name=save.json_name,
                    part_file_size=save.part_file_size)
    if not inplace:
        return gm
    return apply(model, gm)
