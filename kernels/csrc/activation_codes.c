/* Static per-tensor activation codes in one pass, for kernels/activation_codes.py.
 *
 *     code = clamp(round(x[i] / scale) + zero, qmin, qmax)          (offset_in_rounding = 0)
 *     code = clamp(round(x[i] / scale + zero), qmin, qmax)          (offset_in_rounding = 1)
 *
 * for x float32 [n] and the float32 scale and zero point (an integer value). round is half to even
 * (mode 0: rintf under the default rounding mode) or floor(v + 0.5) (mode 1). Every step is the
 * float32 operation torch performs in fake_quant.quantize_codes (no reciprocal of the scale: built
 * without -ffast-math), so the codes are the same integers.
 *
 * fxq_uint8_codes writes code + shift as uint8 (qmin + shift >= 0, qmax + shift <= 255);
 * fxq_centred_codes writes code - centre as float32 (the integer-valued input of an exact float
 * convolution). Chunks of x are shared among the OpenMP threads of the process (torch's own runtime).
 */
#include <math.h>
#include <stdint.h>

#define CHUNK 16384

static inline float code_of(float x, float scale, float before, float after, float qmin, float qmax, int mode)
{
    float v = x / scale + before;
    v = mode ? floorf(v + 0.5f) : rintf(v);
    v += after;
    return v < qmin ? qmin : (v > qmax ? qmax : v);
}

/* code + add for x[0 .. n), into out8 as uint8 where it is given, else into out32 as float32. */
static void write_codes(const float *x, int64_t n, float scale, float zero, float qmin, float qmax, int mode,
                        int offset_in_rounding, float add, uint8_t *out8, float *out32)
{
    const float before = offset_in_rounding ? zero : 0.0f, after = offset_in_rounding ? 0.0f : zero;
    const int64_t chunks = (n + CHUNK - 1) / CHUNK;
#pragma omp parallel for schedule(static) if (chunks > 1)
    for (int64_t c = 0; c < chunks; ++c) {
        const int64_t end = (c + 1) * CHUNK < n ? (c + 1) * CHUNK : n;
        if (out8)
            for (int64_t i = c * CHUNK; i < end; ++i)
                out8[i] = (uint8_t)(code_of(x[i], scale, before, after, qmin, qmax, mode) + add);
        else
            for (int64_t i = c * CHUNK; i < end; ++i)
                out32[i] = code_of(x[i], scale, before, after, qmin, qmax, mode) + add;
    }
}

void fxq_uint8_codes(const float *x, int64_t n, float scale, float zero, float qmin, float qmax, int mode,
                     int offset_in_rounding, float shift, uint8_t *out)
{
    write_codes(x, n, scale, zero, qmin, qmax, mode, offset_in_rounding, shift, out, 0);
}

void fxq_centred_codes(const float *x, int64_t n, float scale, float zero, float qmin, float qmax, int mode,
                       int offset_in_rounding, float centre, float *out)
{
    write_codes(x, n, scale, zero, qmin, qmax, mode, offset_in_rounding, -centre, 0, out);
}
