/*
 * The sequential loop of a dense layer chain on CPU, in one call:
 *
 *     z_l = s_{l-1} W_l^T + b_l      (weight_layout 1: W_l is (w, w) as torch.nn.functional.linear takes it)
 *     z_l = s_{l-1} W_l + b_l        (weight_layout 0: s @ W)
 *     s_l = h(z_l),                  l = 1 .. L,
 *
 * for N independent rows of w values, h elementwise (ACTIVATION_* below).
 * A chain of such small steps costs eager PyTorch two operator calls per
 * step (a few microseconds each, whatever the size); here a step costs its
 * N w^2 multiply-adds and N w activations. The dot products accumulate in
 * double (float32 states: closer to the exact value than float32
 * accumulation), z is rounded to SCALAR, and h is evaluated on it in
 * double (activate_row), so a state differs from eager's by a unit or so
 * in the last place per step: the loop serves chains kept sequential for
 * cost, whose errors do not grow (seqpar/runtime/kernels/cpu_dense_loop.py).
 *
 * weight: W_1 .. W_L, (w, w) each, weight_stride apart (0: one W for every
 * step); bias: b_1 .. b_L, bias_stride apart (bias == 0: no bias); s0:
 * (N, w); out: (L, N, w); all contiguous. Compiled per scalar type with
 * -DSCALAR=float or -DSCALAR=double.
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef SCALAR
#error "compile with -DSCALAR=float or -DSCALAR=double"
#endif

#define ACTIVATION_IDENTITY 0
#define ACTIVATION_RELU 1
#define ACTIVATION_TANH 2
#define ACTIVATION_SIGMOID 3
#define ACTIVATION_SILU 4
#define ACTIVATION_GELU 5
#define ACTIVATION_GELU_TANH 6

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
/* One build runs anywhere; where the CPU has AVX2 the loops run 4 doubles at a time. The values are
   the same either way: -std=c99 leaves floating-point contraction off, so no FMA changes a rounding. */
#define VECTOR_CLONES __attribute__((target_clones("arch=haswell", "default")))
#else
#define VECTOR_CLONES
#endif

/* e^y in double: relative error below 1e-14 for y in [-708, 709], 0 below, inf above (what the formulas
   below need to give PyTorch's values at the extremes: sigmoid(-inf) = 0, silu(-inf) = nan). y = n ln2 + r,
   |r| <= ln2 / 2, e^r by its Taylor series to r^11, 2^n built in the exponent bits; no branch and no call,
   so the loops below vectorise. NaN stays NaN. */
static inline double exp_double(double y)
{
    const double shifter = 6755399441055744.0; /* 1.5 * 2^52: y / ln2 + shifter holds round(y / ln2) in its low bits */
    const double clamped = y < -708.0 ? -708.0 : (y > 709.0 ? 709.0 : y);
    double n = clamped * 1.4426950408889634 + shifter;
    uint64_t bits;
    memcpy(&bits, &n, sizeof bits);
    n -= shifter;
    double r = clamped - n * 0.6931471805598903; /* ln 2 in two parts (Cody-Waite): r exact to double */
    r -= n * 5.497923018708371e-14;
    static const double inverse_factorials[] = {1.0 / 3628800, 1.0 / 362880, 1.0 / 40320, 1.0 / 5040, 1.0 / 720,
                                                1.0 / 120, 1.0 / 24, 1.0 / 6, 0.5, 1.0, 1.0};
    double p = 1.0 / 39916800;
    for (int i = 0; i < 11; ++i)
        p = p * r + inverse_factorials[i];
    const uint64_t scale_bits = (bits + 1023) << 52;
    double scale;
    memcpy(&scale, &scale_bits, sizeof scale);
    const double value = p * scale;
    return y < -708.0 ? 0.0 : (y > 709.0 ? HUGE_VAL : value);
}

/* tanh of a float32 value, in double: (1 - e) / (1 + e) with e = e^{-2|x|} (the cancellation in 1 - e costs
   1e-16 / |x| relatively, far below a float's 6e-8 for |x| >= 1e-8; below that tanh(x) rounds to x). */
static inline double tanh_of_float(double x)
{
    const double a = fabs(x), e = exp_double(-2.0 * a);
    const double t = a < 1e-8 ? a : (1.0 - e) / (1.0 + e);
    return copysign(t, x);
}

/* next[j] = h(z[j]) for one row, h as PyTorch defines it (relu keeps NaN: torch.relu(nan) is nan). float32
   states: tanh, sigmoid and silu in double through exp_double (within a float ulp of the exact value
   before the final rounding); erf from the C library. float64 states: the C library's tanh, exp, erf. */
static inline void activate_row(const double *restrict z, SCALAR *restrict next, long width, int activation)
{
    const int single = sizeof(SCALAR) == sizeof(float);
    switch (activation) {
    case ACTIVATION_RELU:
        for (long j = 0; j < width; ++j) {
            const SCALAR v = (SCALAR)z[j];
            next[j] = (v > 0 || v != v) ? v : 0;
        }
        break;
    case ACTIVATION_TANH:
        if (single)
            for (long j = 0; j < width; ++j)
                next[j] = (SCALAR)tanh_of_float((double)(SCALAR)z[j]);
        else
            for (long j = 0; j < width; ++j)
                next[j] = (SCALAR)tanh(z[j]);
        break;
    case ACTIVATION_SIGMOID:
        for (long j = 0; j < width; ++j) {
            const double v = (SCALAR)z[j];
            next[j] = (SCALAR)(1.0 / (1.0 + (single ? exp_double(-v) : exp(-v))));
        }
        break;
    case ACTIVATION_SILU:
        for (long j = 0; j < width; ++j) {
            const double v = (SCALAR)z[j];
            next[j] = (SCALAR)(v / (1.0 + (single ? exp_double(-v) : exp(-v))));
        }
        break;
    case ACTIVATION_GELU:
        for (long j = 0; j < width; ++j) {
            const double v = (SCALAR)z[j];
            next[j] = (SCALAR)(v * 0.5 * (1.0 + erf(v * 0.70710678118654752440)));
        }
        break;
    case ACTIVATION_GELU_TANH:
        for (long j = 0; j < width; ++j) {
            const double v = (SCALAR)z[j];
            const double inner = 0.79788456080286535588 /* sqrt(2 / pi) */ * (v + 0.044715 * v * v * v);
            next[j] = (SCALAR)(0.5 * v * (1.0 + (single ? tanh_of_float(inner) : tanh(inner))));
        }
        break;
    default:
        for (long j = 0; j < width; ++j)
            next[j] = (SCALAR)z[j];
    }
}

/* Returns 0, or -1 where the scratch memory could not be allocated (nothing written). */
VECTOR_CLONES
int dense_loop(const SCALAR *restrict s0, const SCALAR *restrict weight, long weight_stride,
               const SCALAR *restrict bias, long bias_stride, SCALAR *restrict out, long length, long batch,
               long width, int weight_layout, int activation)
{
    const long size = batch * width;
    /* W_l in double, as (k, j): z_j += s_k W[k][j] runs over j in one vectorisable sweep per k. */
    double *restrict matrix = malloc(sizeof(double) * width * width);
    double *restrict z = malloc(sizeof(double) * width);
    if (!matrix || !z) {
        free(matrix);
        free(z);
        return -1;
    }
    for (long l = 0; l < length; ++l) {
        const SCALAR *restrict s = l == 0 ? s0 : out + (l - 1) * size;
        SCALAR *restrict next = out + l * size;
        const SCALAR *restrict W = weight + l * weight_stride;
        const SCALAR *restrict b = bias ? bias + l * bias_stride : 0;
        if (l == 0 || weight_stride)
            for (long k = 0; k < width; ++k)
                for (long j = 0; j < width; ++j)
                    matrix[k * width + j] = weight_layout ? W[j * width + k] : W[k * width + j];
        for (long n = 0; n < batch; ++n) {
            const SCALAR *restrict row = s + n * width;
            for (long j = 0; j < width; ++j)
                z[j] = b ? b[j] : 0.0;
            for (long k = 0; k < width; ++k) {
                const double value = row[k];
                const double *restrict column = matrix + k * width;
                for (long j = 0; j < width; ++j)
                    z[j] += value * column[j];
            }
            activate_row(z, next + n * width, width, activation);
        }
    }
    free(matrix);
    free(z);
    return 0;
}
