/* One block of GPTQ's column loop (fxquant/keep_acc/gptq.py), over the rows of W^T.
 *
 * For i = 0 .. b - 1, on rows w[i] of the block w float64 [b, n] (row i: weight column i of the
 * block, over the n output channels):
 *
 *     q[i]   = clamp(round(w[i] / s[i]) + z[i], qmin, qmax)      (round: half to even, or floor(v + 0.5))
 *     e[i]   = w[i] - q[i] * s[i] + zs[i]                      (zs = z * s; skipped when symmetric)
 *     w[j]  -= h[i, j] * e[i]        for j = i + 1 .. b - 1
 *
 * h float64 [b, b] row-major: the rows of the block of H^-1's upper Cholesky factor, each divided
 * by its diagonal element. s, z, zs float64 with row stride `qstride` (0: one vector [n] for every
 * row, as per-channel qparams are; n: [b, n]); z and zs may be NULL when symmetric. q and e
 * float64 [b, n]. The output channels are independent, so they are split among the OpenMP
 * threads of the process (torch's own runtime) in runs of CHUNK, each run taken through the whole
 * block while it sits in cache. The same operations, in the same order per element, as the
 * torch-op loop of gptq.py; no multiply-add is contracted (-std=c11). Returns 0; 1 for a shape
 * or stride it does not take.
 */
#include <math.h>
#include <stdint.h>

#define CHUNK 64

int fxq_gptq_block(double *w, int64_t b, int64_t n, const double *h, const double *s, const double *z,
                   const double *zs, int64_t qstride, double qmin, double qmax, int half_even,
                   double *q, double *e)
{
    if (b < 1 || n < 1 || (qstride != 0 && qstride != n) || (!zs) != (!z))
        return 1;
#pragma omp parallel for schedule(static)
    for (int64_t c0 = 0; c0 < n; c0 += CHUNK) {
        const int64_t c1 = c0 + CHUNK < n ? c0 + CHUNK : n;
        for (int64_t i = 0; i < b; ++i) {
            double *wi = w + i * n, *qi = q + i * n, *ei = e + i * n;
            const double *si = s + i * qstride, *zi = z ? z + i * qstride : 0, *zsi = zs ? zs + i * qstride : 0;
            for (int64_t c = c0; c < c1; ++c) {
                double v = wi[c] / si[c];
                v = half_even ? nearbyint(v) : floor(v + 0.5);
                if (zi)
                    v += zi[c];
                v = v < qmin ? qmin : (v > qmax ? qmax : v);
                qi[c] = v;
                double err = wi[c] - v * si[c];
                ei[c] = zsi ? err + zsi[c] : err;
            }
            for (int64_t j = i + 1; j < b; ++j) {
                const double hij = h[i * b + j];
                double *wj = w + j * n;
                for (int64_t c = c0; c < c1; ++c)
                    wj[c] -= hij * ei[c];
            }
        }
    }
    return 0;
}
