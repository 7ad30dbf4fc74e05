"""GPTQ's column loop over one block, by the C kernel csrc/gptq_block.c (fxquant/keep_acc/gptq.py
runs the same steps as torch ops where the kernel does not build)."""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch

from . import c_kernels


def native_gptq_block(w: torch.Tensor, h_rows: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None,
                      zs: torch.Tensor | None, qmin: int, qmax: int, half_even: bool, codes: torch.Tensor,
                      err: torch.Tensor) -> bool:
    """Round the block's rows w float64 [b, n] (contiguous, updated in place) one at a time, each
    row's rounding error going onto the later rows through h_rows float64 [b, b] (H^-1 factor rows
    over their diagonal); writes codes and err float64 [b, n]. s, z, zs (z * s): float64 [b, n],
    or [n] expanded over the rows (stride 0); z, zs None for symmetric weights. False (nothing
    done) where the kernel does not build here."""
    run = _native_gptq_block()
    if run is None:
        return False
    b, n = w.shape
    qstride = s.stride(0)
    operands = [w, h_rows, s, codes, err] + [t for t in (z, zs) if t is not None]
    fits = (all(t.dtype == torch.float64 for t in operands) and h_rows.shape == (b, b) and h_rows.is_contiguous()
            and all(t.shape == (b, n) and t.is_contiguous() for t in (w, codes, err))
            and all(t.shape == (b, n) and t.stride(0) == qstride and (t.stride(1) == 1 or n == 1)
                    for t in (s, z, zs) if t is not None)
            and qstride in (0, n) and (z is None) == (zs is None))
    if not fits:
        raise ValueError(f"gptq_block's C kernel takes contiguous float64 w / codes / err [b, n], h_rows [b, b] and "
                         f"s / z / zs [b, n] with row stride 0 or n; got w {w.dtype} {tuple(w.shape)}, h_rows "
                         f"{tuple(h_rows.shape)}, s {s.dtype} {tuple(s.shape)} strides {s.stride()}")
    z_ptr, zs_ptr = (None, None) if z is None else (z.data_ptr(), zs.data_ptr())
    status = run(w.data_ptr(), b, n, h_rows.data_ptr(), s.data_ptr(), z_ptr, zs_ptr, qstride, float(qmin),
                 float(qmax), int(half_even), codes.data_ptr(), err.data_ptr())
    if status:
        raise ValueError(f"gptq_block's C kernel refused w {tuple(w.shape)}, row stride {qstride} (status {status})")
    return True


def _native_gptq_block() -> Callable[..., int] | None:
    """csrc/gptq_block.c's fxq_gptq_block, or None where it does not build."""
    i64, ptr, f64 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double
    return c_kernels.function("gptq_block", "fxq_gptq_block",
                              (ptr, i64, i64, ptr, ptr, ptr, ptr, i64, f64, f64, ctypes.c_int, ptr, ptr))
