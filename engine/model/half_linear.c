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
