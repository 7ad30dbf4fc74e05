/* The large-code part of kernels/onednn_split.py's exact int8 GEMM on AVX2 CPUs.
 *
 * For each row i of big (int8 [m, k], row-major, mostly zero) it adds
 *     sum over c with big[i, c] != 0 of big[i, c] * (table[c, j] - 128),   j < n,
 * to the oneDNN sums in out (float32 [m, n], exact integers). table is the byte table of the
 * weight: uint8 [k, ldt], codes + 128 in the first n bytes of each row.
 *
 * out_int == NULL: the sums are added to out in place (the caller knows they stay below 2^24).
 * out_int != NULL: out_int (int32 [m, n]) receives (int32) out + the sums; out is left as it is.
 *
 * Rows are shared among the OpenMP threads of the process (torch's own runtime). Zero bytes are
 * skipped 8 at a time; each large code adds its table row to an int32 row of sums (vectorized).
 * Returns 0, or 1 when a thread could not allocate its row of sums.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static void add_row(const int8_t *row, int64_t k, const uint8_t *table, int64_t ldt, int64_t n,
                    int32_t *acc, float *out, int32_t *out_int)
{
    int32_t bias = 0; /* sum of the row's large codes: the -128 of the table, applied once */
    int any = 0;
    for (int64_t c = 0; c < k; c += 8) {
        const int64_t width = k - c < 8 ? k - c : 8;
        uint64_t word = 0;
        memcpy(&word, row + c, (size_t)width);
        if (!word)
            continue;
        for (int64_t b = 0; b < width; ++b) {
            const int32_t v = row[c + b];
            if (!v)
                continue;
            if (!any) {
                memset(acc, 0, (size_t)n * sizeof(int32_t));
                any = 1;
            }
            const uint8_t *w = table + (c + b) * ldt;
            for (int64_t j = 0; j < n; ++j)
                acc[j] += v * (int32_t)w[j];
            bias += v;
        }
    }
    if (out_int) {
        for (int64_t j = 0; j < n; ++j)
            out_int[j] = (int32_t)out[j] + (any ? acc[j] - 128 * bias : 0);
    } else if (any) {
        for (int64_t j = 0; j < n; ++j)
            out[j] += (float)(acc[j] - 128 * bias);
    }
}

int fxq_add_large_codes(const int8_t *big, int64_t m, int64_t k, const uint8_t *table, int64_t ldt,
                        int64_t n, float *out, int32_t *out_int)
{
    int failed = 0;
#pragma omp parallel
    {
        int32_t *acc = malloc((size_t)n * sizeof(int32_t));
        if (!acc) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t i = 0; i < m; ++i)
            if (acc)
                add_row(big + i * k, k, table, ldt, n, acc, out + i * n, out_int ? out_int + i * n : NULL);
        free(acc);
    }
    return failed;
}
