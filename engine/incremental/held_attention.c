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
 *                                  get their new values (rounded) from qkv_s here first
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
 * replaced), flips[0] (how many recomputed rows flipped), f_rows and flips[1] (the recomputed
 * rows outside S that flipped, in u_idx order, and their count: they need the rest of the
 * block), and qkv, lse, slack and codes updated in place.
 *
 * With AVX-512, step 2 keeps the heads of a row in the lanes of a vector (drift_of_row) and
 * step 3 takes a group of a few rows one row at a time with keys in the lanes
 * (context_of_row); elsewhere both run the plain loops below.
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __F16C__
#include <immintrin.h>
#endif

#include "../kernel_math.h"  /* exp_approx */

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
/* Rows recomputed together in step 3. Its scores, softmax and codebook search keep the group's
 * rows in the lanes of a vector (layouts (..., UB)): a key or code entry is broadcast and
 * multiplied into all rows at once, so no dot product ends in a horizontal sum. 16 = one
 * AVX-512 vector of floats; a layer recomputes ~10 rows (median, peps-typing), one group. */
#define UB 16

#ifndef D
#error "compile with -DD=<head width>"
#endif
#if D % 4 != 0
#error "the head width must be a multiple of 4 (dot_lanes)"
#endif

/* The lanes of step 3: one float per row of a group (GCC/Clang vector extensions: one AVX-512
 * register, two AVX ones, or plain loops where neither exists). `lanes_u` reads and writes
 * them anywhere in the scratch memory (no alignment assumed). */
typedef float lanes __attribute__((vector_size(UB * sizeof(float))));
typedef int32_t lanes_int __attribute__((vector_size(UB * sizeof(int32_t))));
typedef float lanes_u __attribute__((vector_size(UB * sizeof(float)), aligned(4)));

static inline lanes_u *lanes_at(float *base, int64_t index) {  /* base[index * UB ...] */
    return (lanes_u *)(base + index * UB);
}

static inline lanes lanes_select(lanes_int mask, lanes a, lanes b) {  /* mask ? a : b */
    return (lanes)(((lanes_int)a & mask) | ((lanes_int)b & ~mask));
}

static inline lanes lanes_max(lanes a, lanes b) { return lanes_select(a > b, a, b); }

/* exp_approx in every lane (same range reduction and polynomial) */
static inline lanes lanes_exp(lanes x) {
    lanes lo = (lanes){0.0f} - 60.0f, hi = (lanes){0.0f} + 88.0f;
    lanes xc = lanes_select(x < lo, lo, lanes_select(x > hi, hi, x));
    lanes y = xc * 1.44269504f + 0.5f;
    lanes_int ki = __builtin_convertvector(y, lanes_int);  /* toward zero, */
    lanes k = __builtin_convertvector(ki, lanes);
    lanes_int below = k > y;  /* then down: floor */
    ki += below;  /* (true lanes are -1) */
    k = __builtin_convertvector(ki, lanes);
    lanes r = xc - k * 0.693145752f - k * 1.42860677e-06f;
    lanes p = 1.0f + r * (1.0f + r * (0.5f + r * (1.6666667e-1f + r * (4.1666668e-2f
              + r * (8.3333338e-3f + r * 1.3888889e-3f)))));
    lanes scale = (lanes)((ki + 127) << 23);
    return lanes_select(x < lo, (lanes){0.0f}, p * scale);
}

/* sum_t a[t] * b[t] for every lane, a (D) broadcast into b (D, UB): four running sums, so that
 * each multiply-add waits for the one four before it, not for the last (its latency, ~4
 * cycles, would otherwise set the pace). */
static inline lanes dot_lanes(const float *a, const lanes_u *b) {
    lanes s0 = a[0] * b[0], s1 = a[1] * b[1], s2 = a[2] * b[2], s3 = a[3] * b[3];
    for (int t = 4; t < D; t += 4) {
        s0 += a[t] * b[t];
        s1 += a[t + 1] * b[t + 1];
        s2 += a[t + 2] * b[t + 2];
        s3 += a[t + 3] * b[t + 3];
    }
    return (s0 + s1) + (s2 + s3);
}

static inline float dot_f(const float *a, const float *b) {
    float s = 0.0f;
    for (int t = 0; t < D; t++) s += a[t] * b[t];
    return s;
}

#ifdef __AVX512F__
/* Step 3 one row at a time, for groups of at most ROW_PATH_MAX rows (a typed word's update
 * recomputes ~3 rows a layer): the group path below keeps 16 rows in the lanes of a vector, so
 * for 3 rows it computes 13 lanes of nothing. Here the lanes hold 16 keys instead: the score
 * of each key is its query . key product folded into 16 partial sums (two vectors of D = 32),
 * and sum16 adds 16 such vectors lane by lane into one vector of 16 scores. */
#define ROW_PATH_MAX 6

/* The lane sums of 16 vectors as one vector: lane 4k + l holds the sum of p[4l + k], so a
 * caller stores the vector whose sum belongs in lane i at p[LANE(i)]. Four rounds of "add the
 * two halves of a pair of vectors, each half into its own slot". */
#define LANE(i) (4 * ((i) % 4) + (i) / 4)  /* where sum16 wants the vector for lane i */

static inline __m512 sum16(const __m512 *p) {
    __m512 t[8], u[4], v[2];
    for (int i = 0; i < 8; i++)  /* 256-bit halves: t[i] = p[2i] folded | p[2i+1] folded */
        t[i] = _mm512_add_ps(_mm512_shuffle_f32x4(p[2 * i], p[2 * i + 1], 0x44),
                             _mm512_shuffle_f32x4(p[2 * i], p[2 * i + 1], 0xEE));
    for (int i = 0; i < 4; i++)  /* 128-bit blocks: block k of u[i] sums to p[4i + k] */
        u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0xDD));
    for (int i = 0; i < 2; i++)  /* pairs inside each block */
        v[i] = _mm512_add_ps(_mm512_unpacklo_ps(u[2 * i], u[2 * i + 1]),
                             _mm512_unpackhi_ps(u[2 * i], u[2 * i + 1]));
    return _mm512_add_ps(_mm512_shuffle_ps(v[0], v[1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(v[0], v[1], _MM_SHUFFLE(3, 2, 3, 2)));
}

static inline __m512 load_half16(const half *src) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)src));
}

/* One row's whole context in every head over all n keys and values of qkv: qs its scaled
 * queries (H * D); writes the score maxima top (H), the normalisers z (H, of exp(score - top))
 * and the unnormalised contexts ctx (H * D), as the group path does for one lane; scores is
 * scratch for n floats. */
static void context_of_row(int64_t n, int64_t H, const half *qkv, const float *qs,
                           float *scores, float *top, float *z, float *ctx) {
    const int64_t row = 3 * H * D;
    for (int64_t h = 0; h < H; h++) {
        const half *keys = qkv + H * D + h * D, *vals = qkv + 2 * H * D + h * D;
        __m512 q0 = _mm512_loadu_ps(qs + h * D), q1 = _mm512_loadu_ps(qs + h * D + 16);
        __m512 top16 = _mm512_set1_ps(-INFINITY);
        int64_t j = 0;
        for (; j + 16 <= n; j += 16) {
            __m512 p[16];
            for (int jj = 0; jj < 16; jj++) {
                const half *k = keys + (j + jj) * row;
                p[LANE(jj)] = _mm512_fmadd_ps(q1, load_half16(k + 16),
                                                           _mm512_mul_ps(q0, load_half16(k)));
            }
            __m512 s = sum16(p);
            _mm512_storeu_ps(scores + j, s);
            top16 = _mm512_max_ps(top16, s);
        }
        float m = _mm512_reduce_max_ps(top16);
        for (; j < n; j++) {  /* the last n % 16 keys */
            __m512 prod = _mm512_fmadd_ps(q1, load_half16(keys + j * row + 16),
                                          _mm512_mul_ps(q0, load_half16(keys + j * row)));
            scores[j] = _mm512_reduce_add_ps(prod);
            m = scores[j] > m ? scores[j] : m;
        }
        __m512 sum16v = _mm512_setzero_ps();
        j = 0;
        for (; j + 16 <= n; j += 16) {
            __m512 e = (__m512)lanes_exp((lanes)(_mm512_loadu_ps(scores + j) - m));
            _mm512_storeu_ps(scores + j, e);
            sum16v = _mm512_add_ps(sum16v, e);
        }
        float sum = _mm512_reduce_add_ps(sum16v);
        for (; j < n; j++) {
            scores[j] = exp_approx(scores[j] - m);
            sum += scores[j];
        }
        /* two pairs of accumulators, so that each multiply-add waits on the one two keys back */
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
        j = 0;
        for (; j + 2 <= n; j += 2) {
            __m512 e0 = _mm512_set1_ps(scores[j]), e1 = _mm512_set1_ps(scores[j + 1]);
            const half *v0 = vals + j * row, *v1 = v0 + row;
            a0 = _mm512_fmadd_ps(e0, load_half16(v0), a0);
            a1 = _mm512_fmadd_ps(e0, load_half16(v0 + 16), a1);
            b0 = _mm512_fmadd_ps(e1, load_half16(v1), b0);
            b1 = _mm512_fmadd_ps(e1, load_half16(v1 + 16), b1);
        }
        if (j < n) {
            __m512 e0 = _mm512_set1_ps(scores[j]);
            a0 = _mm512_fmadd_ps(e0, load_half16(vals + j * row), a0);
            a1 = _mm512_fmadd_ps(e0, load_half16(vals + j * row + 16), a1);
        }
        _mm512_storeu_ps(ctx + h * D, _mm512_add_ps(a0, b0));
        _mm512_storeu_ps(ctx + h * D + 16, _mm512_add_ps(a1, b1));
        top[h] = m;
        z[h] = sum;
    }
}

/* Step 2 for one row i outside S, the heads in the lanes (H <= 16): each moved key's weight
 * in every head from one sum16 of the per-head query . key products, and the drift of every
 * head's context from a second one. Same arithmetic as the scalar loop in held_attention
 * (which runs where H > 16), a few times fewer instructions. qrow: the row's queries (H * D,
 * float16); w: scratch for 16 * J floats. Returns whether some head's slack ran out. */
static int drift_of_row(int64_t H, int64_t J, int64_t m_s, int64_t K, const half *qrow,
                        const float *kv, const float *lse_i, half *slack_i,
                        const int64_t *codes_i, const float *cb, float scale, float *w) {
    __m512 p[16];
    for (int64_t h = H; h < 16; h++) p[LANE(h)] = _mm512_setzero_ps();
    float tmp[16] = {0.0f};
    memcpy(tmp, lse_i, sizeof(float) * H);
    __m512 lse_v = _mm512_loadu_ps(tmp), w_sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < J; j++) {
        const float *k = kv + j * 2 * H * D;
        for (int64_t h = 0; h < H; h++)
            p[LANE(h)] = _mm512_fmadd_ps(load_half16(qrow + h * D + 16),
                                         _mm512_loadu_ps(k + h * D + 16),
                                         _mm512_mul_ps(load_half16(qrow + h * D),
                                                       _mm512_loadu_ps(k + h * D)));
        __m512 s = _mm512_sub_ps(_mm512_mul_ps(sum16(p), _mm512_set1_ps(scale)), lse_v);
        __m512 wj = (__m512)lanes_exp((lanes)s);
        if (j >= m_s) wj = _mm512_sub_ps(_mm512_setzero_ps(), wj);  /* a key that left */
        _mm512_storeu_ps(w + j * 16, wj);
        w_sum = _mm512_add_ps(w_sum, wj);
    }
    _mm512_storeu_ps(tmp, w_sum);
    for (int64_t h = 0; h < H; h++) {  /* sum_j w_j v_j - w_sum c, per head */
        int64_t c = codes_i[h] < 0 ? 0 : codes_i[h];
        const float *cv = cb + (h * K + c) * D;
        __m512 ws = _mm512_set1_ps(-tmp[h]);
        __m512 a0 = _mm512_mul_ps(ws, _mm512_loadu_ps(cv));
        __m512 a1 = _mm512_mul_ps(ws, _mm512_loadu_ps(cv + 16));
        for (int64_t j = 0; j < J; j++) {
            const float *v = kv + ((j * 2 + 1) * H + h) * D;
            __m512 wj = _mm512_set1_ps(w[j * 16 + h]);
            a0 = _mm512_fmadd_ps(wj, _mm512_loadu_ps(v), a0);
            a1 = _mm512_fmadd_ps(wj, _mm512_loadu_ps(v + 16), a1);
        }
        p[LANE(h)] = _mm512_fmadd_ps(a1, a1, _mm512_mul_ps(a0, a0));
    }
    __m512 move = _mm512_sqrt_ps(sum16(p));
    __m512 den = _mm512_max_ps(_mm512_add_ps(_mm512_set1_ps(1.0f), w_sum), _mm512_set1_ps(1e-6f));
    half old[16] = {0};
    memcpy(old, slack_i, sizeof(half) * H);
    __m512 left = _mm512_sub_ps(load_half16(old), _mm512_div_ps(move, den));
    _mm256_storeu_si256((__m256i *)old, _mm512_cvtps_ph(left, _MM_FROUND_TO_NEAREST_INT));
    memcpy(slack_i, old, sizeof(half) * H);
    __mmask16 heads = (__mmask16)((1u << H) - 1);
    return (_mm512_cmp_ps_mask(left, _mm512_setzero_ps(), _CMP_LT_OQ) & heads) != 0;
}
#endif

int64_t held_attention(int64_t n, int64_t H, int64_t d, int64_t K, int64_t m_s, int64_t J,
                       half *qkv, const float *qkv_s, const float *kv, float *lse,
                       half *slack, int64_t *codes, const int64_t *s_idx,
                       const float *cb, const float *sqnorm, const float *gap, float tau,
                       float min_slack, float scale, int64_t *u_idx, uint8_t *flipped,
                       int64_t *f_rows, int64_t *flips) {
    if (d != D) return -2;
    const int64_t row = 3 * H * D;  /* stride of one row of qkv */
    /* q: a row's queries; w: its weights of the moved keys; then for step 3's groups of UB
     * rows: qt their queries (H, D, UB), sc their scores then weights (H, n, UB), top and z
     * their score maxima and normalisers (H, UB), ctx their contexts (UB, H, D) and ctxt the
     * same as (H, D, UB), part the codebook distances of one head (K, UB), kv_row one key or
     * value row of the chunk (all heads); all float32 */
    int64_t w_heads = H < 16 ? 16 : H;  /* drift_of_row keeps a key's weights in 16 lanes */
    size_t floats = H * D + D + w_heads * J + H * D * UB + H * n * UB + 2 * H * UB + 2 * UB * H * D
                    + K * UB + H * D + n / sizeof(float) + 1;
    float *q = scratch_floats(floats);
    if (!q) return -1;
    float *acc = q + H * D, *w = acc + D, *qt = w + w_heads * J, *sc = qt + H * D * UB;
    float *top = sc + H * n * UB, *z = top + H * UB, *ctx = z + H * UB;
    float *ctxt = ctx + UB * H * D, *part = ctxt + H * D * UB, *kv_row = part + K * UB;
    uint8_t *in_s = (uint8_t *)(kv_row + H * D);  /* 1 for the rows of S */
    memset(in_s, 0, (size_t)n);
    for (int64_t t = 0; t < m_s; t++) {
        in_s[s_idx[t]] = 1;
        half *dst = qkv + s_idx[t] * row;  /* the changed rows' new Q/K/V, rounded */
        for (int64_t c = 0; c < row; c++) dst[c] = (half)qkv_s[t * row + c];
    }

    /* Step 2: what the moved keys did to every other row's context. */
    int64_t u = 0;
    for (int64_t t = 0; t < m_s; t++) u_idx[u++] = s_idx[t];
    for (int64_t i = 0; i < n; i++) {
        if (in_s[i]) continue;
#ifdef __AVX512F__
        if (H <= 16) {
            if (drift_of_row(H, J, m_s, K, qkv + i * row, kv, lse + i * H, slack + i * H,
                             codes + i * H, cb, scale, w))
                u_idx[u++] = i;
            continue;
        }
#endif
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
     * widened once for the group. Lanes past the group's rows hold zero queries: they compute
     * harmless numbers that nothing reads. */
    for (int64_t r0 = 0; r0 < u; r0 += UB) {
        int64_t rb = u - r0 < UB ? u - r0 : UB;
#ifdef __AVX512F__
        if (rb <= ROW_PATH_MAX) {  /* a few rows: one at a time, keys in the lanes */
            for (int64_t r = 0; r < rb; r++) {
                const float *qr = q;
                if (r0 + r < m_s) qr = qkv_s + (r0 + r) * row;
                else to_float(qkv + u_idx[r0 + r] * row, q, H * D);
                for (int64_t t = 0; t < H * D; t++) qt[t] = qr[t] * scale;
                context_of_row(n, H, qkv, qt, sc, kv_row, kv_row + H, ctx + r * H * D);
                for (int64_t h = 0; h < H; h++) {
                    top[h * UB + r] = kv_row[h];
                    z[h * UB + r] = kv_row[H + h];
                }
            }
            goto contexts_done;
        }
#endif
        memset(qt, 0, sizeof(float) * H * D * UB);
        for (int64_t r = 0; r < rb; r++) {  /* the group's queries, scaled, as (H, D, UB) */
            const float *qr = q;
            if (r0 + r < m_s) qr = qkv_s + (r0 + r) * row;
            else to_float(qkv + u_idx[r0 + r] * row, q, H * D);
            for (int64_t t = 0; t < H * D; t++) qt[t * UB + r] = qr[t] * scale;
        }
        for (int64_t h = 0; h < H; h++) {
            lanes_at(top, h)[0] = (lanes){0.0f} - INFINITY;
            lanes_at(z, h)[0] = (lanes){0.0f};
        }
        for (int64_t j = 0; j < n; j++) {  /* scores (H, n, UB) and their maxima */
            to_float(qkv + j * row + H * D, kv_row, H * D);
            for (int64_t h = 0; h < H; h++) {
                const float *k = kv_row + h * D;
                const lanes_u *qh = lanes_at(qt, h * D);
                lanes s = dot_lanes(k, qh);
                lanes_at(sc, h * n + j)[0] = s;
                lanes_at(top, h)[0] = lanes_max(s, lanes_at(top, h)[0]);
            }
        }
        for (int64_t h = 0; h < H; h++) {  /* weights exp(score - max) and their sums */
            lanes m = lanes_at(top, h)[0], sum = {0.0f};
            for (int64_t j = 0; j < n; j++) {
                lanes e = lanes_exp(lanes_at(sc, h * n + j)[0] - m);
                lanes_at(sc, h * n + j)[0] = e;
                sum += e;
            }
            lanes_at(z, h)[0] = sum;
        }
        memset(ctx, 0, sizeof(float) * UB * H * D);
        for (int64_t j = 0; j < n; j++) {  /* contexts (rb, H, D), a head's D in the lanes */
            to_float(qkv + j * row + 2 * H * D, kv_row, H * D);
            for (int64_t h = 0; h < H; h++) {
                const float *e = sc + (h * n + j) * UB, *v = kv_row + h * D;
                for (int64_t r = 0; r < rb; r++) {
                    float *c = ctx + (r * H + h) * D, er = e[r];
                    for (int t = 0; t < D; t++) c[t] += er * v[t];
                }
            }
        }
#ifdef __AVX512F__
    contexts_done:
#endif
        for (int64_t r = 0; r < rb; r++)
            for (int64_t h = 0; h < H; h++)
                lse[u_idx[r0 + r] * H + h] = top[h * UB + r] + logf(z[h * UB + r]);
        memset(ctxt, 0, sizeof(float) * H * D * UB);
        for (int64_t r = 0; r < rb; r++)  /* normalised, and as (H, D, UB) for the search */
            for (int64_t h = 0; h < H; h++) {
                float inv = 1.0f / z[h * UB + r];
                const float *c = ctx + (r * H + h) * D;
                for (int t = 0; t < D; t++) ctxt[(h * D + t) * UB + r] = c[t] * inv;
            }
        for (int64_t r = 0; r < rb; r++) flipped[r0 + r] = 0;
        for (int64_t h = 0; h < H; h++) {
            /* every code's distance to every row's context, up to |ctx|^2: part (K, UB) */
            const lanes_u *ch = lanes_at(ctxt, h * D);
            lanes sq = ch[0] * ch[0];
            for (int t = 1; t < D; t++) sq += ch[t] * ch[t];
            lanes best_part = (lanes){0.0f} + INFINITY;
            lanes_int best = {0};
            for (int64_t k = 0; k < K; k++) {
                const float *c = cb + (h * K + k) * D;
                lanes dots = dot_lanes(c, ch);
                lanes p = sqnorm[h * K + k] - 2.0f * dots;
                lanes_at(part, k)[0] = p;
                lanes_int closer = p < best_part;  /* the first nearest, as torch.min */
                best_part = lanes_select(closer, p, best_part);
                best = (closer & ((lanes_int){0} + (int32_t)k)) | (~closer & best);
            }
            for (int64_t r = 0; r < rb; r++) {  /* hysteresis, per row */
                int64_t i = u_idx[r0 + r];
                float d_best = sqrtf(best_part[r] + sq[r] > 0.0f ? best_part[r] + sq[r] : 0.0f);
                int64_t old = codes[i * H + h];
                float p_old = old < 0 ? 0.0f : part[old * UB + r] + sq[r];
                float d_old = old < 0 ? INFINITY : sqrtf(p_old > 0.0f ? p_old : 0.0f);
                int64_t code = old;
                float kept = d_old;
                if (d_old - d_best > tau) { code = best[r]; kept = d_best; }
                if (old >= 0 && code != old) flipped[r0 + r] = 1;
                codes[i * H + h] = code;
                float room = (tau + gap[h * K + code]) / 2.0f - kept;
                slack[i * H + h] = (half)(room > min_slack ? room : min_slack);
            }
        }
    }
    flips[0] = flips[1] = 0;
    for (int64_t r = 0; r < u; r++) {
        flips[0] += flipped[r];
        if (flipped[r] && r >= m_s) f_rows[flips[1]++] = u_idx[r];
    }
    return u;
}
