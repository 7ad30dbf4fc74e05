/* Weight-only GEMV over integer weight codes in kernels/weight_only.py's GEMV layout.
 *
 *     y[r, j] = sum_g scale[j, g] * (sum_{c in g} x[r, c] * code[j, c] - offset[j, g] * xsum[r, g])
 *               + bias[j]
 *
 * for x float32 [m, k] (m <= MAX_ROWS), codes of n output rows, groups of k / groups columns
 * (groups = 1: per output channel). The codes are the GEMV layout's int32 words [n / B, w, B]:
 * word c of rows B i .. B i + B - 1 side by side, each word holding 4 int8 codes (bits 8, byte t
 * = column 4 c + t) or 8 nibbles (bits 4, nibble t = column 8 c + t, stored as code + 8). offset
 * [n, groups] is what the stored codes carry above the real ones (zero point, + 8 for nibbles);
 * NULL means 0. scale and offset are float32 [n, groups], row-major; bias float32 [n] or NULL;
 * y float32 [m, n].
 *
 * Each block of B rows is read once for all m inputs; B is a compile-time constant (8: AVX2,
 * 16: AVX-512), so the loop over a block's rows is one vector. Blocks are shared among the OpenMP
 * threads of the process (torch's own runtime). The sums differ from a float GEMM's only by their
 * order. Returns 0; 1 for a block size, row count or width it does not take; 2 when out of memory.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_ROWS 8

/* code t of word v: sign-extended byte t (bits 8), or nibble t (bits 4, code + 8) */
#define CODE8(v, t) ((float)((int32_t)((uint32_t)(v) << (24 - 8 * (t))) >> 24))
#define CODE4(v, t) ((float)(((uint32_t)(v) >> (4 * (t))) & 15u))

#define DEFINE_BLOCK(B)                                                                          \
    static void block_##B(const float *x, int64_t m, int64_t k, const int32_t *words, int64_t w, \
                          int bits, int64_t groups, const float *scale, const float *offset,     \
                          const float *xsum, const float *bias, int64_t first_row, int64_t n,    \
                          float *y)                                                              \
    {                                                                                            \
        const int64_t per_word = bits == 8 ? 4 : 8, group_words = w / groups;                   \
        float out[MAX_ROWS][B], acc[MAX_ROWS][B];                                                \
        memset(out, 0, sizeof out);                                                              \
        for (int64_t g = 0; g < groups; ++g) {                                                   \
            memset(acc, 0, sizeof acc);                                                          \
            for (int64_t c = g * group_words; c < (g + 1) * group_words; ++c) {                  \
                const int32_t *v = words + c * B;                                                \
                for (int64_t r = 0; r < m; ++r) {                                                \
                    const float *xr = x + r * k + c * per_word;                                  \
                    float *a = acc[r];                                                           \
                    if (bits == 8) {                                                             \
                        for (int l = 0; l < B; ++l)                                              \
                            a[l] += xr[0] * CODE8(v[l], 0) + xr[1] * CODE8(v[l], 1)              \
                                  + xr[2] * CODE8(v[l], 2) + xr[3] * CODE8(v[l], 3);             \
                    } else {                                                                     \
                        for (int l = 0; l < B; ++l)                                              \
                            a[l] += xr[0] * CODE4(v[l], 0) + xr[1] * CODE4(v[l], 1)              \
                                  + xr[2] * CODE4(v[l], 2) + xr[3] * CODE4(v[l], 3)              \
                                  + xr[4] * CODE4(v[l], 4) + xr[5] * CODE4(v[l], 5)              \
                                  + xr[6] * CODE4(v[l], 6) + xr[7] * CODE4(v[l], 7);             \
                    }                                                                            \
                }                                                                                \
            }                                                                                    \
            for (int64_t r = 0; r < m; ++r)                                                      \
                for (int l = 0; l < B; ++l) {                                                    \
                    const int64_t j = (first_row + l) * groups + g;                              \
                    const float off = offset ? offset[j] * xsum[r * groups + g] : 0.0f;          \
                    out[r][l] += scale[j] * (acc[r][l] - off);                                   \
                }                                                                                \
        }                                                                                        \
        for (int64_t r = 0; r < m; ++r)                                                          \
            for (int l = 0; l < B; ++l)                                                          \
                y[r * n + first_row + l] = out[r][l] + (bias ? bias[first_row + l] : 0.0f);      \
    }

DEFINE_BLOCK(8)
DEFINE_BLOCK(16)

int fxq_codes_gemv(const float *x, int64_t m, int64_t k, const int32_t *words, int64_t n, int64_t block,
                   int bits, int64_t groups, const float *scale, const float *offset, const float *bias,
                   float *y)
{
    if ((block != 8 && block != 16) || m < 1 || m > MAX_ROWS || (bits != 4 && bits != 8) || groups < 1
        || n % block || k % ((bits == 8 ? 4 : 8) * groups))
        return 1;
    const int64_t per_word = bits == 8 ? 4 : 8, w = k / per_word, group_k = k / groups;
    /* per row and group, the sum of x: the offsets are taken off once per group */
    float *sums = NULL;
    if (offset) {
        sums = malloc((size_t)(m * groups) * sizeof(float));
        if (!sums)
            return 2;
        for (int64_t r = 0; r < m; ++r)
            for (int64_t g = 0; g < groups; ++g) {
                float s = 0.0f;
                for (int64_t c = g * group_k; c < (g + 1) * group_k; ++c)
                    s += x[r * k + c];
                sums[r * groups + g] = s;
            }
    }
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n / block; ++i) {
        const int32_t *blk = words + i * w * block;
        if (block == 8)
            block_8(x, m, k, blk, w, bits, groups, scale, offset, sums, bias, i * block, n, y);
        else
            block_16(x, m, k, blk, w, bits, groups, scale, offset, sums, bias, i * block, n, y);
    }
    free(sums);
    return 0;
}
