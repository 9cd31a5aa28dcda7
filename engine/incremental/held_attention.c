/* Steps 2 and 3 of one layer of a fast-mode chunk update (engine/incremental/fast_chunk.py,
 * FastSplice.attend), fused into one pass over the chunk for the CPU.
 *
 * The PyTorch version spends ~90 tensor operations a layer on a chunk of a few hundred rows and
 * a handful of changed keys: each operation is microseconds of dispatch for nanoseconds of
 * arithmetic. This file does the same arithmetic in plain loops (compiled at first use by
 * engine/incremental/held_attention.py; the PyTorch version stays the reference and the
 * fallback). Shapes, with n rows, H heads, d = head width, K codes, J keys that moved:
 *
 *   qkv     (n, 3, H, d) float16   queries, keys, values of the chunk; the changed rows S
 *                                  already hold their new (rounded) values
 *   qkv_s   (m_s, 3, H, d) float32 the changed rows' new queries, keys, values (unrounded)
 *   kv      (J, 2, H, d) float32   keys and values that came in (the first m_s) and left
 *   lse     (n, H) float32         log softmax normaliser of each row's stored context
 *   slack   (n, H) float16         how far each context may still move before its code could flip
 *   codes   (n, H) int64           the rows' codes (-1: an inserted row, none yet)
 *   s_idx   (m_s) int64            the rows of S, in the order of qkv_s
 *   cb      (H, K, d) float32      codebooks; sqnorm, gap (H, K): |c|^2 and the distance from
 *                                  each code to its nearest other code
 *
 * For every row outside S and every head: the attention mass w_j = exp(q.k_j / sqrt(d) - lse)
 * of each moved key (negative for keys that left), and the distance the moved values pull the
 * context from its code vector, |sum_j w_j v_j - (sum_j w_j) c| / (1 + sum_j w_j), which is
 * spent from the slack. Rows of S, then rows whose slack ran out in some head (ascending), get
 * their context recomputed over all n keys and re-quantized with hysteresis: a code is
 * replaced only by the nearest one when that is closer by more than tau. Outputs: u_idx (the
 * recomputed rows; returns their count), flipped (per recomputed row: some head's code was
 * replaced), and lse, slack and codes updated in place.
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __F16C__
#include <immintrin.h>
#endif

typedef _Float16 half;

/* float16 -> float32 of `count` values: 16 or 8 at a time with AVX-512 or F16C on x86
 * (compilers do not vectorize _Float16 conversions there without AVX512-FP16), element by
 * element elsewhere. */
static inline void to_float(const half *src, float *dst, int64_t count) {
    int64_t t = 0;
#ifdef __AVX512F__
    for (; t + 16 <= count; t += 16)
        _mm512_storeu_ps(dst + t, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + t))));
#endif
#ifdef __F16C__
    for (; t + 8 <= count; t += 8)
        _mm256_storeu_ps(dst + t, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + t))));
#endif
    for (; t < count; t++) dst[t] = (float)src[t];
}

/* Scratch memory kept between calls (one per thread): a few hundred KB a call would otherwise
 * be mapped and zeroed by the kernel every time. */
static __thread float *scratch = NULL;
static __thread size_t scratch_size = 0;

static float *scratch_floats(size_t count) {
    if (count > scratch_size) {
        free(scratch);
        scratch = malloc(sizeof(float) * count);
        scratch_size = scratch ? count : 0;
    }
    return scratch;
}

/* The head width, fixed at compile time (-DD=32) so that every per-head loop unrolls into a few vector
 * instructions (MiniLM: 384 = 12 heads x 32). held_attention() refuses other widths (returns
 * -2) and engine/incremental/held_attention.py then keeps the PyTorch version. */
#define UB 8  /* rows recomputed together in step 3 */

#ifndef D
#error "compile with -DD=<head width>"
#endif

/* exp(x) for float32, vectorizable (libm's expf is a call per element): x = k ln2 + r with
 * |r| <= ln2 / 2, exp(r) by its degree-6 Taylor polynomial (relative error ~2e-7), times 2^k
 * built in the exponent bits. Below -60 it returns 0: an attention weight under 1e-26 changes
 * nothing, and products of weights near float32's smallest normal would be subnormal numbers,
 * which the CPU computes a hundred times slower. (Plain comparisons, not fminf/fmaxf: those
 * honour NaN and stay library calls.) */
static inline float exp_approx(float x) {
    float xc = x < -60.0f ? -60.0f : (x > 88.0f ? 88.0f : x);
    float k = floorf(xc * 1.44269504f + 0.5f);
    float r = xc - k * 0.693145752f - k * 1.42860677e-06f;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.6666667e-1f + r * (4.1666668e-2f
              + r * (8.3333338e-3f + r * 1.3888889e-3f)))));
    int32_t bits = ((int32_t)k + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return x < -60.0f ? 0.0f : p * scale;
}

static inline float dot_f(const float *a, const float *b) {
    float s = 0.0f;
    for (int t = 0; t < D; t++) s += a[t] * b[t];
    return s;
}

int64_t held_attention(int64_t n, int64_t H, int64_t d, int64_t K, int64_t m_s, int64_t J,
                       const half *qkv, const float *qkv_s, const float *kv, float *lse,
                       half *slack, int64_t *codes, const int64_t *s_idx,
                       const float *cb, const float *sqnorm, const float *gap, float tau,
                       float min_slack, float scale, int64_t *u_idx, uint8_t *flipped) {
    if (d != D) return -2;
    const int64_t row = 3 * H * D;  /* stride of one row of qkv */
    /* q: a row's queries; w: its weights of the moved keys; then for step 3's groups of UB
     * rows: qb their queries, sc their scores, zb their normalisers, ctx their contexts, and
     * kv_row one key or value row of the chunk (all heads), in float32 */
    size_t floats = H * D + D + H * J + K + UB * H * D + UB * H * n + UB * H + UB * H * D
                    + H * D + n / sizeof(float) + 1;
    float *q = scratch_floats(floats);
    if (!q) return -1;
    float *acc = q + H * D, *w = acc + D, *part = w + H * J, *qb = part + K;
    float *sc = qb + UB * H * D, *zb = sc + UB * H * n, *ctx = zb + UB * H;
    float *kv_row = ctx + UB * H * D;
    uint8_t *in_s = (uint8_t *)(kv_row + H * D);  /* 1 for the rows of S */
    memset(in_s, 0, (size_t)n);
    for (int64_t t = 0; t < m_s; t++) in_s[s_idx[t]] = 1;

    /* Step 2: what the moved keys did to every other row's context. */
    int64_t u = 0;
    for (int64_t t = 0; t < m_s; t++) u_idx[u++] = s_idx[t];
    for (int64_t i = 0; i < n; i++) {
        if (in_s[i]) continue;
        to_float(qkv + i * row, q, H * D);
        for (int64_t h = 0; h < H; h++)
            for (int64_t j = 0; j < J; j++)
                w[h * J + j] = dot_f(q + h * D, kv + (j * 2 * H + h) * D) * scale - lse[i * H + h];
        for (int64_t t = 0; t < H * J; t++) w[t] = exp_approx(w[t]);
        int spent = 0;
        for (int64_t h = 0; h < H; h++) {
            float w_sum = 0.0f;
            for (int t = 0; t < D; t++) acc[t] = 0.0f;
            for (int64_t j = 0; j < J; j++) {
                float wj = j < m_s ? w[h * J + j] : -w[h * J + j];  /* a key that left takes
                                                                         its mass back */
                const float *v = kv + ((j * 2 + 1) * H + h) * D;
                w_sum += wj;
                for (int t = 0; t < D; t++) acc[t] += wj * v[t];
            }
            int64_t c = codes[i * H + h] < 0 ? 0 : codes[i * H + h];
            const float *cv = cb + (h * K + c) * D;
            float move = 0.0f;
            for (int t = 0; t < D; t++) {
                float diff = acc[t] - w_sum * cv[t];
                move += diff * diff;
            }
            float den = 1.0f + w_sum;
            float left = (float)slack[i * H + h] - sqrtf(move) / (den > 1e-6f ? den : 1e-6f);
            slack[i * H + h] = (half)left;
            if (left < 0.0f) spent = 1;
        }
        if (spent) u_idx[u++] = i;
    }

    /* Step 3: whole contexts of the recomputed rows, re-quantized with hysteresis. Up to UB
     * rows at a time, walking the chunk's rows in order: each key and value row (all heads) is
     * widened once for the group and read front to back. */
    for (int64_t r0 = 0; r0 < u; r0 += UB) {
        int64_t rb = u - r0 < UB ? u - r0 : UB;
        for (int64_t r = 0; r < rb; r++) {  /* the group's queries, (rb, H * D) */
            if (r0 + r < m_s) memcpy(qb + r * H * D, qkv_s + (r0 + r) * row, sizeof(float) * H * D);
            else to_float(qkv + u_idx[r0 + r] * row, qb + r * H * D, H * D);
        }
        for (int64_t j = 0; j < n; j++) {  /* scores, (rb, H, n) */
            to_float(qkv + j * row + H * D, kv_row, H * D);
            for (int64_t r = 0; r < rb; r++)
                for (int64_t h = 0; h < H; h++)
                    sc[(r * H + h) * n + j] = dot_f(qb + r * H * D + h * D, kv_row + h * D) * scale;
        }
        for (int64_t r = 0; r < rb; r++)
            for (int64_t h = 0; h < H; h++) {
                float *s = sc + (r * H + h) * n, top = -INFINITY, z = 0.0f;
                for (int64_t j = 0; j < n; j++) top = s[j] > top ? s[j] : top;
                for (int64_t j = 0; j < n; j++) s[j] = exp_approx(s[j] - top);
                for (int64_t j = 0; j < n; j++) z += s[j];
                lse[u_idx[r0 + r] * H + h] = top + logf(z);
                zb[r * H + h] = z;
            }
        for (int64_t t = 0; t < rb * H * D; t++) ctx[t] = 0.0f;
        for (int64_t j = 0; j < n; j++) {  /* contexts, (rb, H * D) */
            to_float(qkv + j * row + 2 * H * D, kv_row, H * D);
            for (int64_t r = 0; r < rb; r++)
                for (int64_t h = 0; h < H; h++) {
                    float e = sc[(r * H + h) * n + j], *c = ctx + r * H * D + h * D;
                    const float *v = kv_row + h * D;
                    for (int t = 0; t < D; t++) c[t] += e * v[t];
                }
        }
        for (int64_t r = 0; r < rb; r++) {
            int64_t i = u_idx[r0 + r];
            int flip = 0;
            for (int64_t h = 0; h < H; h++) {
                float *c = ctx + r * H * D + h * D, inv = 1.0f / zb[r * H + h];
                for (int t = 0; t < D; t++) c[t] *= inv;
                /* nearest code, and the distance to the held one */
                float sq = dot_f(c, c);
                int64_t best = 0;
                for (int64_t k = 0; k < K; k++) {
                    part[k] = sqnorm[h * K + k] - 2.0f * dot_f(c, cb + (h * K + k) * D);
                    if (part[k] < part[best]) best = k;
                }
                float d_best = sqrtf(part[best] + sq > 0.0f ? part[best] + sq : 0.0f);
                int64_t old = codes[i * H + h];
                float d_old = old < 0 ? INFINITY
                                      : sqrtf(part[old] + sq > 0.0f ? part[old] + sq : 0.0f);
                int64_t code = old;
                float kept = d_old;
                if (d_old - d_best > tau) { code = best; kept = d_best; }
                if (old >= 0 && code != old) flip = 1;
                codes[i * H + h] = code;
                float room = (tau + gap[h * K + code]) / 2.0f - kept;
                slack[i * H + h] = (half)(room > min_slack ? room : min_slack);
            }
            flipped[r0 + r] = (uint8_t)flip;
        }
    }
    return u;
}
