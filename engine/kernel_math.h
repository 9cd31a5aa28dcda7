/* Math shared by the compiled kernels (engine/c_kernels.py folds this file into every
 * kernel's build key, so an edit here rebuilds them).
 *
 * exp_approx(x) for float32, vectorizable (libm's expf is a call per element): x = k ln2 + r
 * with |r| <= ln2 / 2, exp(r) by its degree-6 Taylor polynomial (relative error ~2e-7), times
 * 2^k built in the exponent bits. Below -60 it returns 0: an attention weight under 1e-26
 * changes nothing, and products of weights near float32's smallest normal would be subnormal
 * numbers, which the CPU computes a hundred times slower. (Plain comparisons, not fminf/fmaxf:
 * those honour NaN and stay library calls.) */
#ifndef INCSTREAM_KERNEL_MATH_H
#define INCSTREAM_KERNEL_MATH_H

#include <math.h>
#include <stdint.h>
#include <string.h>

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

#endif
