/* W8A8 linear of a few rows (decode) in one call, for kernels/int8_decode.py: the input codes,
 * their int32 sums against the int8 weight codes, and the output scaling.
 *
 * Per-token inputs (per_token = 1):
 *     s[r]       = max(max_c |x[r, c]| / qmax, min_scale)
 *     code[r, c] = clamp(round(x[r, c] / s[r]), qmin, qmax)
 *     y[r, j]    = (float)(sum_c code[r, c] * w[j, c]) * out_scale[j] * s[r] + bias[j]
 * Static per-tensor inputs (per_token = 0), scale s and zero point z:
 *     code[r, c] = clamp(round(x[r, c] / s) + z, qmin, qmax)        (offset_in_rounding = 0)
 *                  clamp(round(x[r, c] / s + z), qmin, qmax)        (offset_in_rounding = 1)
 *     y[r, j]    = (float)(sum_c (code[r, c] - centre) * w[j, c] + qbias[j]) * out_scale[j]
 *
 * x float32 [m, k] (m <= MAX_ROWS), w int8 [n, k] row-major, out_scale float32 [n] (the weight
 * scale; static: deq = input scale x weight scale), bias float32 [n] or NULL, qbias int32 [n] or
 * NULL, y float32 [m, n]. round is half to even (mode 0: rintf under the default rounding mode) or
 * floor(v + 0.5) (mode 1). Each step is the float32 operation, in the order, that QLinear's torch
 * path takes (DynamicQuantizer / quantize_codes, the exact integer sums, the scalings, the bias):
 * built without -ffast-math and, as ISO C, without contracting a * b + c, the outputs are the same
 * floats. Codes are kept as int16, so that the compiler multiplies and adds pairs into int32
 * (vpmaddwd: exact, no saturation); a NaN in a row of x gives a NaN row of y.
 *
 * Output rows are shared among the OpenMP threads of the process (torch's own runtime), CHUNK at
 * a time. Returns 0; 1 for a row count or width it does not take; 2 when out of memory.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define MAX_ROWS 8
#define CHUNK 32

/* the operands of one layer, bound once (kernels/int8_decode.py mirrors this layout) */
struct fxq_int8_decode {
    int64_t k, n;
    const int8_t *w;
    const float *out_scale, *bias;
    const int32_t *qbias;
    int32_t per_token, mode, offset_in_rounding, centre;
    float scale, zero, qmin, qmax, min_scale;
};

static inline float rounded(float v, int mode) { return mode ? floorf(v + 0.5f) : rintf(v); }

static inline float clamped(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

/* per-token codes of row xr into codes; its scale, NaN where the row holds a NaN */
static float token_codes(const struct fxq_int8_decode *p, const float *xr, int16_t *codes)
{
    float amax = 0.0f;
    int nan = 0;
    for (int64_t c = 0; c < p->k; ++c) {
        const float a = fabsf(xr[c]);
        amax = a > amax ? a : amax;
        nan |= a != a;
    }
    const float scale = amax / p->qmax;
    const float s = nan ? NAN : (scale < p->min_scale ? p->min_scale : scale);
    for (int64_t c = 0; c < p->k; ++c) {
        const float v = rounded(xr[c] / s, p->mode);
        codes[c] = v != v ? 0 : (int16_t)clamped(v, p->qmin, p->qmax);
    }
    return s;
}

/* static codes of row xr, less the centre, into codes; 1.0, or NaN where the row holds a NaN */
static float static_codes(const struct fxq_int8_decode *p, const float *xr, int16_t *codes)
{
    const float before = p->offset_in_rounding ? p->zero : 0.0f, after = p->offset_in_rounding ? 0.0f : p->zero;
    int nan = 0;
    for (int64_t c = 0; c < p->k; ++c) {
        const float v = rounded(xr[c] / p->scale + before, p->mode) + after;
        nan |= v != v;
        codes[c] = v != v ? 0 : (int16_t)((int32_t)clamped(v, p->qmin, p->qmax) - p->centre);
    }
    return nan ? NAN : 1.0f;
}

int fxq_int8_decode(const struct fxq_int8_decode *p, const float *x, int64_t m, float *y)
{
    const int64_t k = p->k, n = p->n;
    if (m < 1 || m > MAX_ROWS || k < 1 || n < 1)
        return 1;
    int16_t *codes = malloc((size_t)(m * k) * sizeof(int16_t));
    if (!codes)
        return 2;
    float s[MAX_ROWS];
    for (int64_t r = 0; r < m; ++r) {
        if (p->per_token)
            s[r] = token_codes(p, x + r * k, codes + r * k);
        else
            s[r] = static_codes(p, x + r * k, codes + r * k);
    }
    const int64_t chunks = (n + CHUNK - 1) / CHUNK;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < chunks; ++i) {
        const int64_t end = (i + 1) * CHUNK < n ? (i + 1) * CHUNK : n;
        for (int64_t j = i * CHUNK; j < end; ++j) {
            const int8_t *wj = p->w + j * k;
            for (int64_t r = 0; r < m; ++r) {
                const int16_t *cr = codes + r * k;
                int32_t acc = 0;
                for (int64_t c = 0; c < k; ++c)
                    acc += (int32_t)cr[c] * (int32_t)wj[c];
                float v;
                if (p->per_token) {
                    v = (float)acc * p->out_scale[j];
                    v = v * s[r];
                    if (p->bias)
                        v = v + p->bias[j];
                } else {
                    v = (float)(p->qbias ? acc + p->qbias[j] : acc) * p->out_scale[j];
                    if (s[r] != s[r])
                        v = s[r];
                }
                y[r * n + j] = v;
            }
        }
    }
    free(codes);
    return 0;
}
