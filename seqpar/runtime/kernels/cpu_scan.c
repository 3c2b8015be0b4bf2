/*
 * Forward substitution of seqpar's lower block-bidiagonal systems on CPU.
 *
 * The system is the affine recurrence of seqpar/runtime/pcr.py,
 *
 *     y_l = A_l y_{l-1} + c_l,   l = 0 .. L-1,   y_{-1} = 0          (forward)
 *     y_l = A_{l+1}^T y_{l+1} + c_l,             y_L  = 0            (reverse)
 *
 * with N independent batch elements and states of w values. Substitution
 * takes O(L N w^2) operations (PCR: O(L log L N w^3)) in one pass over memory;
 * on a CPU with a few cores it is the fastest exact solve. The caller passes
 * y holding c (contiguous (L, N, w)), overwritten with the solution, and A
 * contiguous: (L, N, w, w) for dense blocks, (L, N, w) for diagonal ones.
 *
 * Compiled once per scalar type with -DSCALAR=float or -DSCALAR=double by
 * seqpar/runtime/cpu_scan.py.
 */

#include <math.h>

#ifndef SCALAR
#error "compile with -DSCALAR=float or -DSCALAR=double"
#endif

void scan_dense(const SCALAR *restrict A, SCALAR *restrict y, long length, long batch, long width, int reverse)
{
    const long block = width * width, row = batch * width;
    if (!reverse) {
        for (long l = 1; l < length; ++l) {
            for (long n = 0; n < batch; ++n) {
                const SCALAR *a = A + (l * batch + n) * block;
                const SCALAR *previous = y + (l - 1) * row + n * width;
                SCALAR *out = y + l * row + n * width;
                for (long i = 0; i < width; ++i) {
                    SCALAR sum = 0;
                    for (long j = 0; j < width; ++j)
                        sum += a[i * width + j] * previous[j];
                    out[i] += sum;
                }
            }
        }
    } else {
        for (long l = length - 2; l >= 0; --l) {
            for (long n = 0; n < batch; ++n) {
                const SCALAR *a = A + ((l + 1) * batch + n) * block; /* out += a^T next */
                const SCALAR *next = y + (l + 1) * row + n * width;
                SCALAR *out = y + l * row + n * width;
                for (long j = 0; j < width; ++j) {
                    const SCALAR v = next[j];
                    for (long i = 0; i < width; ++i)
                        out[i] += a[j * width + i] * v;
                }
            }
        }
    }
}

void scan_diagonal(const SCALAR *restrict a, SCALAR *restrict y, long length, long row, int reverse)
{
    if (!reverse) {
        for (long l = 1; l < length; ++l)
            for (long k = 0; k < row; ++k)
                y[l * row + k] += a[l * row + k] * y[(l - 1) * row + k];
    } else {
        for (long l = length - 2; l >= 0; --l)
            for (long k = 0; k < row; ++k)
                y[l * row + k] += a[(l + 1) * row + k] * y[(l + 1) * row + k];
    }
}

/*
 * The max-plus recurrence of seqpar/runtime/maxplus.py, in place:
 *
 *     y_l = max(y_{l-1} + a_l, y_l),   l = 1 .. L-1,
 *
 * y holding (y_0, b_1, .., b_{L-1}) on entry, a the slopes, both (L, row) contiguous. fmax would drop a NaN: the
 * comparison keeps it (a NaN in y_{l-1} + a_l or in b_l stays NaN, as torch.maximum gives).
 */
void scan_maxplus(const SCALAR *restrict a, SCALAR *restrict y, long length, long row)
{
    for (long l = 1; l < length; ++l)
        for (long k = 0; k < row; ++k) {
            const SCALAR carried = y[(l - 1) * row + k] + a[l * row + k], own = y[l * row + k];
            y[l * row + k] = (carried > own || isnan(carried)) ? carried : own;
        }
}

/*
 * One Newton update of the active states, fused: with c_l = F_l - s_l,
 *
 *     y_l = A_l y_{l-1} + c_l   (y_{-1} = 0),    s_l <- s_l + y_l,    s_0 <- F_0,
 *
 * A dense ((M, N, w, w), diagonal = 0) or diagonal ((M, N, w), diagonal = 1),
 * F and s (M, N, w), contiguous; s is updated in place (s_0 becomes F_0
 * itself, exact). It also measures the update per state vector (one batch
 * element at one position): max_k |y_lk| / (atol + rtol max_k |s_lk|) with the
 * new s; a NaN ratio (0 / 0) counts as converged. Returns the first l with a
 * ratio above 1 (M when none); *largest receives the largest ratio and *finite
 * whether every y is finite.
 * scratch holds y_{l-1} and y_l (2 N w values).
 */
long newton_update(const SCALAR *restrict A, const SCALAR *restrict F, SCALAR *restrict s, SCALAR *restrict scratch,
                   long length, long batch, long width, int diagonal, SCALAR atol, SCALAR rtol,
                   SCALAR *largest, int *finite)
{
    const long row = batch * width, block = diagonal ? width : width * width;
    long first_above = length;
    SCALAR top = 0;
    int all_finite = 1;
    for (long l = 0; l < length; ++l) {
        for (long n = 0; n < batch; ++n) {
            const SCALAR *a = A + (l * batch + n) * block;
            const SCALAR *f = F + l * row + n * width;
            SCALAR *state = s + l * row + n * width;
            SCALAR *y = scratch + n * width; /* y_{l-1} on entry, y_l on exit */
            SCALAR *next = scratch + row + n * width;
            for (long i = 0; i < width; ++i) {
                SCALAR sum = f[i] - state[i];
                if (l > 0 && diagonal)
                    sum += a[i] * y[i];
                else if (l > 0)
                    for (long j = 0; j < width; ++j)
                        sum += a[i * width + j] * y[j];
                next[i] = sum;
            }
            SCALAR scale = 0, biggest = 0;
            for (long i = 0; i < width; ++i) {
                const SCALAR update = next[i];
                const SCALAR value = l == 0 ? f[i] : state[i] + update;
                all_finite &= isfinite(update) != 0;
                if (fabs(value) > scale)
                    scale = fabs(value);
                if (fabs(update) > biggest)
                    biggest = fabs(update);
                state[i] = value;
                y[i] = update;
            }
            const SCALAR ratio = biggest / (atol + rtol * scale);
            if (ratio > 1 && first_above == length)
                first_above = l;
            if (ratio > top) /* false for NaN */
                top = ratio;
        }
    }
    *largest = top;
    *finite = all_finite;
    return first_above;
}
