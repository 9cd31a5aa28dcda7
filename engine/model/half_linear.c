/* y (m, N) = x (m, K) . W^T + b for a few rows m, with W (N, K) stored in float16 and every
 * product and sum in float32 (engine/model/half_linear.py).
 *
 * An update of the fast mode multiplies 1-16 rows per matrix, so its time is the time to read
 * the weights: MiniLM's Q/K/V and feed-forward matrices are 39 MB in float32, more than many
 * CPUs' last-level cache, and 19.5 MB in float16. Each weight is read once per call, widened to
 * float32 (F16C) and multiplied into every row: with at most ROWS rows per pass the partial sums
 * of one output stay in registers. Rounding a weight to float16 moves it by at most 2^-11 of
 * itself; the products are float32's.
 */

#include <stdint.h>
#include <string.h>
#ifdef __F16C__
#include <immintrin.h>
#endif

typedef _Float16 half;

#define ROWS 8  /* rows per pass over the weights */

#define INLINE static inline __attribute__((always_inline))

#if defined(__AVX512F__)
/* 16 weights at a time */
INLINE void block(const int64_t rows, int64_t N, int64_t K, const float *x, const half *w,
                  const float *b, float *y, int64_t ldy) {
    for (int64_t n = 0; n < N; n++) {
        const half *wn = w + n * K;
        __m512 acc[ROWS];
        for (int r = 0; r < ROWS; r++) acc[r] = _mm512_setzero_ps();
        int64_t k = 0;
        for (; k + 16 <= K; k += 16) {
            __m512 wv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(wn + k)));
            for (int r = 0; r < ROWS; r++)
                if (r < rows) acc[r] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + r * K + k), acc[r]);
        }
        for (int64_t r = 0; r < rows; r++) {
            float s = _mm512_reduce_add_ps(acc[r]);
            for (int64_t t = k; t < K; t++) s += (float)wn[t] * x[r * K + t];
            y[r * ldy + n] = s + (b ? b[n] : 0.0f);
        }
    }
}
#elif defined(__F16C__) && defined(__FMA__)
/* 8 weights at a time */
static float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

INLINE void block(const int64_t rows, int64_t N, int64_t K, const float *x, const half *w,
                  const float *b, float *y, int64_t ldy) {
    for (int64_t n = 0; n < N; n++) {
        const half *wn = w + n * K;
        __m256 acc[ROWS];
        for (int r = 0; r < ROWS; r++) acc[r] = _mm256_setzero_ps();
        int64_t k = 0;
        for (; k + 8 <= K; k += 8) {
            __m256 wv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wn + k)));
            for (int r = 0; r < ROWS; r++)
                if (r < rows) acc[r] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + r * K + k), acc[r]);
        }
        for (int64_t r = 0; r < rows; r++) {
            float s = hsum256(acc[r]);
            for (int64_t t = k; t < K; t++) s += (float)wn[t] * x[r * K + t];
            y[r * ldy + n] = s + (b ? b[n] : 0.0f);
        }
    }
}
#else
/* plain C: the compiler vectorizes what it can */
INLINE void block(const int64_t rows, int64_t N, int64_t K, const float *x, const half *w,
                  const float *b, float *y, int64_t ldy) {
    for (int64_t n = 0; n < N; n++)
        for (int64_t r = 0; r < rows; r++) {
            float s = 0.0f;
            for (int64_t t = 0; t < K; t++) s += (float)w[n * K + t] * x[r * K + t];
            y[r * ldy + n] = s + (b ? b[n] : 0.0f);
        }
}
#endif

/* x (m, K) float32, w (N, K) float16, b (N) float32 or NULL, y (m, N) float32 */
void half_linear(int64_t m, int64_t N, int64_t K, const float *x, const half *w,
                 const float *b, float *y) {
    for (int64_t r0 = 0; r0 < m; r0 += ROWS) {
        const float *xr = x + r0 * K;
        float *yr = y + r0 * N;
        /* one specialised copy per row count: the accumulators stay in registers */
        switch (m - r0 < ROWS ? m - r0 : ROWS) {
            case 1: block(1, N, K, xr, w, b, yr, N); break;
            case 2: block(2, N, K, xr, w, b, yr, N); break;
            case 3: block(3, N, K, xr, w, b, yr, N); break;
            case 4: block(4, N, K, xr, w, b, yr, N); break;
            case 5: block(5, N, K, xr, w, b, yr, N); break;
            case 6: block(6, N, K, xr, w, b, yr, N); break;
            case 7: block(7, N, K, xr, w, b, yr, N); break;
            default: block(8, N, K, xr, w, b, yr, N); break;
        }
    }
}
