/* y (m, N) = x (m, K) . W^T + b with W stored in float16 and every product and sum in float32
 * (engine/model/half_linear.py).
 *
 * An update of the fast mode multiplies a few rows per matrix, so its time is the time to read
 * the weights: MiniLM's Q/K/V and feed-forward matrices are 39 MB in float32, more than many
 * CPUs' last-level cache, and 19.5 MB in float16. Rounding a weight to float16 moves it by at
 * most 2^-11 of itself; nothing else is rounded.
 *
 * Layout: W is stored in panels of BLOCK = 32 outputs, (N / 32, K, 32): panel p holds
 * W[32p .. 32p+31, k] for k = 0..K-1 one after the other, so a pass over a panel reads it
 * front to back. For each panel and each group of up to ROWS rows, the 32 outputs of every row
 * are accumulated in registers: y[r, 32p + j] += x[r, k] * W[32p + j, k], one broadcast of
 * x[r, k] against 32 widened weights, with no sum across a vector. The panel (24-96 KB) stays
 * in the core's cache while the row groups go over it, so the weights come from memory once
 * per call, whatever m is.
 */

#include <stdint.h>
#ifdef __F16C__
#include <immintrin.h>
#endif

typedef _Float16 half;

#define BLOCK 32  /* outputs per panel */
#define INLINE static inline __attribute__((always_inline))

#if defined(__AVX512F__)
#define ROWS 12  /* 2 x 12 accumulators + 2 weight registers of AVX-512's 32 */

INLINE void panel(const int rows, int64_t K, const float *x, const half *wp, const float *b,
                  float *y, int64_t ldy) {
    __m512 acc[ROWS][2];
    for (int r = 0; r < rows; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        __m512 w0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(wp + k * BLOCK)));
        __m512 w1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(wp + k * BLOCK + 16)));
        for (int r = 0; r < rows; r++) {
            __m512 xv = _mm512_set1_ps(x[r * K + k]);
            acc[r][0] = _mm512_fmadd_ps(xv, w0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(xv, w1, acc[r][1]);
        }
    }
    for (int r = 0; r < rows; r++) {
        __m512 b0 = b ? _mm512_loadu_ps(b) : _mm512_setzero_ps();
        __m512 b1 = b ? _mm512_loadu_ps(b + 16) : _mm512_setzero_ps();
        _mm512_storeu_ps(y + r * ldy, _mm512_add_ps(acc[r][0], b0));
        _mm512_storeu_ps(y + r * ldy + 16, _mm512_add_ps(acc[r][1], b1));
    }
}
#elif defined(__F16C__) && defined(__FMA__)
#define ROWS 3  /* 4 x 3 accumulators + 4 weight registers of AVX2's 16 */

INLINE void panel(const int rows, int64_t K, const float *x, const half *wp, const float *b,
                  float *y, int64_t ldy) {
    __m256 acc[ROWS][4];
    for (int r = 0; r < rows; r++)
        for (int q = 0; q < 4; q++) acc[r][q] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        __m256 w[4];
        for (int q = 0; q < 4; q++)
            w[q] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wp + k * BLOCK + 8 * q)));
        for (int r = 0; r < rows; r++) {
            __m256 xv = _mm256_set1_ps(x[r * K + k]);
            for (int q = 0; q < 4; q++) acc[r][q] = _mm256_fmadd_ps(xv, w[q], acc[r][q]);
        }
    }
    for (int r = 0; r < rows; r++)
        for (int q = 0; q < 4; q++) {
            __m256 bq = b ? _mm256_loadu_ps(b + 8 * q) : _mm256_setzero_ps();
            _mm256_storeu_ps(y + r * ldy + 8 * q, _mm256_add_ps(acc[r][q], bq));
        }
}
#else
#define ROWS 4  /* plain C: the compiler vectorizes what it can */

INLINE void panel(const int rows, int64_t K, const float *x, const half *wp, const float *b,
                  float *y, int64_t ldy) {
    float acc[ROWS][BLOCK] = {{0.0f}};
    for (int64_t k = 0; k < K; k++)
        for (int r = 0; r < rows; r++)
            for (int j = 0; j < BLOCK; j++) acc[r][j] += x[r * K + k] * (float)wp[k * BLOCK + j];
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < BLOCK; j++) y[r * ldy + j] = acc[r][j] + (b ? b[j] : 0.0f);
}
#endif

/* 1 where a row's sums are written out with intrinsics, one accumulator per output and row, in
 * the order of k whatever the row group: a row's result then does not depend on the rows
 * sharing its call (engine.incremental.fast_chunk batches documents on that). The plain-C loop
 * is left to the compiler's vectorizer, allowed to reassociate (c_kernels.FLAGS), which may
 * treat each row count's copy differently: 0. */
int half_linear_rows_alone(void) {
#if defined(__AVX512F__) || (defined(__F16C__) && defined(__FMA__))
    return 1;
#else
    return 0;
#endif
}

/* one copy of `panel` per row count, so that the accumulators stay in registers */
#define CASE(R) case R: panel(R, K, xr, wp, bp, yr, N); break;

/* x (m, K) float32, w (N / 32, K, 32) float16 panels, b (N) float32 or NULL, y (m, N) float32;
 * N a multiple of 32. */
void half_linear(int64_t m, int64_t N, int64_t K, const float *x, const half *w,
                 const float *b, float *y) {
    for (int64_t p = 0; p < N / BLOCK; p++) {
        const half *wp = w + p * K * BLOCK;
        const float *bp = b ? b + p * BLOCK : 0;
        for (int64_t r0 = 0; r0 < m; r0 += ROWS) {
            const float *xr = x + r0 * K;
            float *yr = y + r0 * N + p * BLOCK;
            switch (m - r0 < ROWS ? m - r0 : ROWS) {
                CASE(1)
#if ROWS >= 2
                CASE(2)
#endif
#if ROWS >= 3
                CASE(3)
#endif
#if ROWS >= 4
                CASE(4)
#endif
#if ROWS >= 12
                CASE(5) CASE(6) CASE(7) CASE(8) CASE(9) CASE(10) CASE(11) CASE(12)
#endif
            }
        }
    }
}

/* ----- The rest of a transformer block for a few rows, in one call (feed_forward_rows).
 *
 * What engine/model/minilm.py's feed_forward_block does after the attention output of the
 * fast mode (a sum of code table rows): attn = bo + sum_h table[h * K + code[h]];
 * h = LN1(x + attn); out = LN2(h + W_down GELU(W_up h + b_up) + b_down), with the two products
 * through half_linear. For the 1-10 rows of a typed word's update, PyTorch spends more on
 * dispatching these ten operations than on their arithmetic. */

#include <stdlib.h>

#include "../kernel_math.h"  /* exp_approx */

/* GELU(v) = v (1 + erf(v / sqrt 2)) / 2 (PyTorch's exact GELU), erf by Abramowitz and Stegun
 * 7.1.26 (absolute error below 1.5e-7, float32's own rounding of erf near 1). */
INLINE float gelu(float v) {
    float z = v * 0.70710678f, a = fabsf(z);
    float t = 1.0f / (1.0f + 0.3275911f * a);
    float poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f
                 + t * (-1.453152027f + t * 1.061405429f))));
    float erf_a = 1.0f - poly * exp_approx(-a * a);  /* 0 below e^-60: erf is 1 there */
    return 0.5f * v * (1.0f + copysignf(erf_a, z));
}

/* out = LN(in) with weights w, b over C values (mean and biased variance, as PyTorch) */
INLINE void layer_norm_row(int64_t C, const float *in, const float *w, const float *b, float eps,
                           float *out) {
    float mean = 0.0f, var = 0.0f;
    for (int64_t c = 0; c < C; c++) mean += in[c];
    mean /= (float)C;
    for (int64_t c = 0; c < C; c++) var += (in[c] - mean) * (in[c] - mean);
    float inv = 1.0f / sqrtf(var / (float)C + eps);
    for (int64_t c = 0; c < C; c++) out[c] = (in[c] - mean) * inv * w[c] + b[c];
}

static __thread float *ff_scratch = NULL;
static __thread size_t ff_scratch_size = 0;

/* m rows: x (m, C) the block's inputs, codes (m, H) their attention codes (head h's code c is
 * row h * K + c of tables (H * K, C)), bo (C); w_up (F / 32, C, 32) and w_down (C / 32, F, 32)
 * float16 panels; out (m, C). Returns 0, or -1 without memory. */
int feed_forward_rows(int64_t m, int64_t C, int64_t F, int64_t H, int64_t K, const float *x,
                      const int64_t *codes, const float *tables, const float *bo,
                      const half *w_up, const float *b_up, const half *w_down,
                      const float *b_down, const float *ln1_w, const float *ln1_b,
                      const float *ln2_w, const float *ln2_b, float eps, float *out) {
    size_t floats = (size_t)(m * C + m * F + C);
    if (floats > ff_scratch_size) {
        free(ff_scratch);
        ff_scratch = malloc(sizeof(float) * floats);
        ff_scratch_size = ff_scratch ? floats : 0;
        if (!ff_scratch) return -1;
    }
    float *h = ff_scratch, *up = h + m * C, *row = up + m * F;
    for (int64_t r = 0; r < m; r++) {
        for (int64_t c = 0; c < C; c++) row[c] = x[r * C + c] + bo[c];
        for (int64_t k = 0; k < H; k++) {
            const float *table = tables + (k * K + codes[r * H + k]) * C;
            for (int64_t c = 0; c < C; c++) row[c] += table[c];
        }
        layer_norm_row(C, row, ln1_w, ln1_b, eps, h + r * C);
    }
    half_linear(m, F, C, h, w_up, b_up, up);
    for (int64_t i = 0; i < m * F; i++) up[i] = gelu(up[i]);
    half_linear(m, C, F, up, w_down, b_down, out);
    for (int64_t r = 0; r < m; r++) {
        for (int64_t c = 0; c < C; c++) row[c] = h[r * C + c] + out[r * C + c];
        layer_norm_row(C, row, ln2_w, ln2_b, eps, out + r * C);
    }
    return 0;
}
