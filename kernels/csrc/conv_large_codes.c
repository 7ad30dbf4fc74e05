/* The parts of kernels/int_conv.py's split convolution (AVX2 CPUs) that oneDNN does not compute.
 *
 * Codes are uint8 [B, H, W, C] (channels-last) with zero point z. Around a centre c (64 <= c <= 192,
 * the caller picks it near the codes) each code splits into
 *     small = clamp(code, c - 64, c + 63),   big = code - small,
 * and the convolution of (code - z) is that of (small - c) (oneDNN, on the 7-bit small - c + 64:
 * exact on AVX2, as no 16-bit pair sum of vpmaddubsw passes 2 * 127 * 128), plus that of big (here),
 * minus (z - c) times the sum of the weights whose taps fall inside the image (here: padding holds
 * the zero point, so padded taps add nothing).
 *
 * fxq_low_codes: low[i] = small(codes[i]) - c + 64, uint8 in [0, 127].
 *
 * fxq_add_large_codes_conv: per sample, the convolution of the big values with the weight codes and
 * the zero-point term, summed in int32 and added to out (float32 [B, OH, OW, O], channels-last,
 * holding oneDNN's sums of the small part). table holds the weight codes as int8
 * [G, C / G, KH, KW, O / G] (output channels innermost), tap_sums the int32 sums over each output
 * channel's input channels [KH, KW, O]. Geometry: stride, padding, dilation and groups, as PyTorch
 * defines them. Samples are shared among the OpenMP threads of the process (torch's own runtime).
 *
 * The result is exact when every value of out, before and after, is below 2^24 in magnitude (the
 * int32 sums then convert to float32 exactly, and a rounded int32 sum would have been >= 2^24):
 * returns 0 then, 1 when some value was not (the caller recomputes exactly), 2 when out of memory.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define EXACT 16777216.0f

void fxq_low_codes(const uint8_t *codes, int64_t n, int32_t c, uint8_t *low)
{
    const int32_t lo = c - 64, hi = c + 63;
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; ++i) {
        const int32_t v = codes[i];
        low[i] = (uint8_t)((v < lo ? lo : (v > hi ? hi : v)) - c + 64);
    }
}

typedef struct {
    int64_t h, w, c, groups, kh, kw, oh, ow, o, sy, sx, py, px, dy, dx;
} geometry;

/* the first and one past the last kernel tap of output position t along an axis whose taps read
 * input t * s - p + k * d, inside [0, size) */
static void taps(int64_t t, int64_t s, int64_t p, int64_t d, int64_t k, int64_t size, int64_t *first, int64_t *end)
{
    int64_t a = 0, b = k;
    while (a < k && t * s - p + a * d < 0)
        ++a;
    while (b > a && t * s - p + (b - 1) * d >= size)
        --b;
    *first = a;
    *end = b;
}

/* per output position and channel, shift times the sum of the weights whose taps read inside the
 * image: int32 [OH, OW, O] */
static int zero_point_terms(const geometry *g, int32_t shift, const int32_t *tap_sums, int32_t *terms)
{
    int32_t *full_sums = calloc((size_t)g->o, sizeof(int32_t));
    if (!full_sums)
        return 2;
    for (int64_t t = 0; t < g->kh * g->kw; ++t)
        for (int64_t j = 0; j < g->o; ++j)
            full_sums[j] += tap_sums[t * g->o + j];
    for (int64_t oy = 0; oy < g->oh; ++oy) {
        int64_t y0, y1;
        taps(oy, g->sy, g->py, g->dy, g->kh, g->h, &y0, &y1);
        for (int64_t ox = 0; ox < g->ow; ++ox) {
            int64_t x0, x1;
            taps(ox, g->sx, g->px, g->dx, g->kw, g->w, &x0, &x1);
            int32_t *row = terms + (oy * g->ow + ox) * g->o;
            if (!y0 && !x0 && y1 == g->kh && x1 == g->kw) {
                for (int64_t j = 0; j < g->o; ++j)
                    row[j] = shift * full_sums[j];
                continue;
            }
            memset(row, 0, (size_t)g->o * sizeof(int32_t)); /* the window overhangs the image */
            for (int64_t ky = y0; ky < y1; ++ky)
                for (int64_t kx = x0; kx < x1; ++kx) {
                    const int32_t *tap = tap_sums + (ky * g->kw + kx) * g->o;
                    for (int64_t j = 0; j < g->o; ++j)
                        row[j] += tap[j];
                }
            for (int64_t j = 0; j < g->o; ++j)
                row[j] *= shift;
        }
    }
    free(full_sums);
    return 0;
}

static int add_sample(const uint8_t *codes, const geometry *g, int32_t centre, const int8_t *table,
                      const int32_t *terms, float *out)
{
    const int64_t cg = g->c / g->groups, og = g->o / g->groups, n = g->oh * g->ow * g->o;
    const int32_t lo = centre - 64, hi = centre + 63;
    int32_t *acc = NULL;
    for (int64_t iy = 0; iy < g->h; ++iy)
        for (int64_t ix = 0; ix < g->w; ++ix) {
            const uint8_t *pixel = codes + (iy * g->w + ix) * g->c;
            int any = 0;
            for (int64_t ci = 0; ci < g->c; ++ci) /* vectorized: most pixels have no large code */
                any |= (pixel[ci] < lo) | (pixel[ci] > hi);
            if (!any)
                continue;
            if (!acc && !(acc = calloc((size_t)n, sizeof(int32_t))))
                return 2;
            for (int64_t ci = 0; ci < g->c; ++ci) {
                const int32_t v = pixel[ci];
                if (v >= lo && v <= hi)
                    continue;
                const int32_t big = v < lo ? v - lo : v - hi;
                const int64_t grp = ci / cg;
                for (int64_t ky = 0; ky < g->kh; ++ky) {
                    const int64_t ty = iy + g->py - ky * g->dy;
                    if (ty < 0 || ty % g->sy || ty / g->sy >= g->oh)
                        continue;
                    for (int64_t kx = 0; kx < g->kw; ++kx) {
                        const int64_t tx = ix + g->px - kx * g->dx;
                        if (tx < 0 || tx % g->sx || tx / g->sx >= g->ow)
                            continue;
                        const int8_t *row = table + ((ci * g->kh + ky) * g->kw + kx) * og;
                        int32_t *dst = acc + ((ty / g->sy) * g->ow + tx / g->sx) * g->o + grp * og;
                        for (int64_t j = 0; j < og; ++j)
                            dst[j] += big * (int32_t)row[j];
                    }
                }
            }
        }
    int inexact = 0;
    if (!acc && !terms) {
        for (int64_t i = 0; i < n; ++i)
            inexact |= !(fabsf(out[i]) < EXACT);
        return inexact;
    }
    for (int64_t i = 0; i < n; ++i) { /* branch-free, so that it vectorizes */
        const float v = fminf(fmaxf(out[i], -EXACT), EXACT);
        inexact |= !(fabsf(v) < EXACT);
        const int32_t sum = (int32_t)v + (acc ? acc[i] : 0) - (terms ? terms[i] : 0);
        inexact |= !(sum < (1 << 24) && sum > -(1 << 24));
        out[i] = (float)sum;
    }
    free(acc);
    return inexact;
}

int fxq_add_large_codes_conv(const uint8_t *codes, int64_t b, int64_t h, int64_t w, int64_t c, int32_t z,
                             int32_t centre, const int8_t *table, const int32_t *tap_sums, int64_t groups, int64_t kh,
                             int64_t kw, int64_t oh, int64_t ow, int64_t o, int64_t sy, int64_t sx, int64_t py,
                             int64_t px, int64_t dy, int64_t dx, float *out)
{
    const geometry g = {h, w, c, groups, kh, kw, oh, ow, o, sy, sx, py, px, dy, dx};
    int32_t *terms = NULL;
    if (z != centre) {
        if (!(terms = malloc((size_t)(oh * ow * o) * sizeof(int32_t))) || zero_point_terms(&g, z - centre, tap_sums, terms)) {
            free(terms);
            return 2;
        }
    }
    int status = 0;
#pragma omp parallel for schedule(static) reduction(| : status)
    for (int64_t i = 0; i < b; ++i)
        status |= add_sample(codes + i * h * w * c, &g, centre, table, terms, out + i * oh * ow * o);
    free(terms);
    return status & 2 ? 2 : status;
}
