/* Dynamic per-token W8A8 linear of a few rows (decode), for kernels/token_linear.py:
 *
 *     s[r]       = max(max_c |x[r, c]| / qmax, min_scale)
 *     code[r, c] = clamp(round(x[r, c] / s[r]), qmin, qmax)
 *     acc[r, j]  = sum_c code[r, c] * w[j, c]                      (int32: exact)
 *     y[r, j]    = (float)acc[r, j] * w_scale[j] * s[r] + bias[j]
 *
 * for x float32 [m, k] (m <= MAX_ROWS), weight codes int8 [n, k] row-major, w_scale float32 [n],
 * bias float32 [n] or NULL, y float32 [m, n]. round is half to even (mode 0: rintf under the default
 * rounding mode) or floor(v + 0.5) (mode 1). Each step is the float32 operation, in the order, that
 * the layer's torch path takes (DynamicQuantizer.quantize, then the int32 sums scaled by the weight
 * scale, then by the token's scale, then the bias added; built without -ffast-math and, as ISO C,
 * without contracting a * b + c): the outputs are the same floats. The codes are kept as int16, so
 * that the compiler multiplies and adds pairs into int32 (vpmaddwd: no saturation).
 *
 * Output rows are shared among the OpenMP threads of the process (torch's own runtime), in chunks
 * of CHUNK. Returns 0; 1 for a row count or width it does not take; 2 when out of memory.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define MAX_ROWS 8
#define CHUNK 32

int fxq_token_codes_linear(const float *x, int64_t m, int64_t k, const int8_t *w, int64_t n, const float *w_scale,
                           const float *bias, float qmin, float qmax, float min_scale, int mode, float *y)
{
    if (m < 1 || m > MAX_ROWS || k < 1 || n < 1)
        return 1;
    int16_t *codes = malloc((size_t)(m * k) * sizeof(int16_t));
    if (!codes)
        return 2;
    float s[MAX_ROWS];
    for (int64_t r = 0; r < m; ++r) {
        const float *xr = x + r * k;
        float amax = 0.0f;
        int nan = 0;
        for (int64_t c = 0; c < k; ++c) {
            const float a = fabsf(xr[c]);
            amax = a > amax ? a : amax;
            nan |= a != a;
        }
        const float scale = amax / qmax;
        s[r] = nan ? NAN : (scale < min_scale ? min_scale : scale); /* a NaN input gives a NaN row */
        for (int64_t c = 0; c < k; ++c) {
            float v = xr[c] / s[r];
            v = mode ? floorf(v + 0.5f) : rintf(v);
            codes[r * k + c] = v != v ? 0 : (int16_t)(v < qmin ? qmin : (v > qmax ? qmax : v));
        }
    }
    const int64_t chunks = (n + CHUNK - 1) / CHUNK;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < chunks; ++i) {
        const int64_t end = (i + 1) * CHUNK < n ? (i + 1) * CHUNK : n;
        for (int64_t j = i * CHUNK; j < end; ++j) {
            const int8_t *wj = w + j * k;
            for (int64_t r = 0; r < m; ++r) {
                const int16_t *cr = codes + r * k;
                int32_t acc = 0;
                for (int64_t c = 0; c < k; ++c)
                    acc += (int32_t)cr[c] * (int32_t)wj[c];
                float v = (float)acc * w_scale[j];
                v = v * s[r];
                y[r * n + j] = bias ? v + bias[j] : v;
            }
        }
    }
    free(codes);
    return 0;
}
