/* Row passes over a block of scores or logits on the CPU, for mgh_kernels/cpu_rows.py (the CPU
 * attention's sweeps and the InfoNCE loss's PyTorch path).
 *
 * Each replaces a chain of PyTorch element-wise ops (mul_, amax, sub_, clamp_min_, exp_, sum)
 * that stream the whole block through memory once per op; here a row is read once for its max and
 * once more, while it is still in cache, for the exponentials and their sum. Plain C, vectorised
 * by the compiler (-O3 -march=native; -ffp-contract=off: fused multiply-adds only where written,
 * as in x * scale - m, rounded once like torch.addcmul's) and threaded with OpenMP; built on first
 * use by mgh_kernels/_native.py and called through ctypes. float32 only: float64 takes the
 * PyTorch ops.
 *
 * NaN propagates as in PyTorch: the clamp keeps NaN, whose exponential is NaN.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* A team for a row pass: `threads`, or one inside a parallel region (a task of mgh_parallel_tasks,
 * or PyTorch's own), where a nested team would only add threads to a busy machine. */
static inline int team(int threads) {
#ifdef _OPENMP
    if (omp_in_parallel()) return 1;
#endif
    return threads;
}

/* Calls task(i, slot) for i in 0 .. count - 1 on `threads` threads of the OpenMP pool that
 * PyTorch's own ops use (the same libgomp), in ONE parallel region, each thread taking the next
 * task when it is done with one (schedule dynamic): a thread the scheduler takes away from us on a
 * busy machine holds up no other, and there is one fork and one join per call, where a chain of
 * PyTorch ops pays one of each per op. `slot` is the thread's number in the team (0 .. threads - 1):
 * no two tasks of one slot run at once. Serial without OpenMP or inside a parallel region. */
typedef void (*mgh_task)(int64_t task, int slot);

void mgh_parallel_tasks(int64_t count, int threads, mgh_task task) {
#ifdef _OPENMP
    if (threads > 1 && count > 1 && !omp_in_parallel()) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
        for (int64_t i = 0; i < count; i++) task(i, omp_get_thread_num());
        return;
    }
#endif
    for (int64_t i = 0; i < count; i++) task(i, 0);
}

/* exp(x) for x in [floor, 0] (floor the least exponent with a normal result, so 2^n is a normal
 * number): Cephes' expf, a degree-7 polynomial after x = n ln2 + r, within one ulp of exp. */
static inline float exp_normal(float x) {
    const float magic = 12582912.0f; /* 1.5 * 2^23: adding and subtracting it rounds to an integer */
    float n = (x * 1.44269504088896341f + magic) - magic;
    float r = fmaf(n, -0.693359375f, x); /* ln2 in two parts, so n * ln2 is exact */
    r = fmaf(n, 2.12194440e-4f, r);
    float p = 1.9875691500e-4f;
    p = fmaf(p, r, 1.3981999507e-3f);
    p = fmaf(p, r, 8.3334519073e-3f);
    p = fmaf(p, r, 4.1665795894e-2f);
    p = fmaf(p, r, 1.6666665459e-1f);
    p = fmaf(p, r, 5.0000001201e-1f);
    p = fmaf(p * r, r, r) + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static inline float clamped(float d, float floor_) { return d < floor_ ? floor_ : d; }

/* For each of `rows` rows of `cols` contiguous values s: x = s * scale (scale: one per column, or
 * NULL for none), top = `shift` when `fixed`, else the row max of x; e = exp(max(x - top, floor));
 * total = the row sum of e, and s = e in place when `store` (else s is left as it was: a loss
 * without gradients needs only the sums). */
void mgh_softmax_rows_f32(float *s, int64_t rows, int64_t cols, const float *scale, int fixed, float shift,
                          float floor_, int store, float *top, float *total, int threads) {
    threads = team(threads);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t r = 0; r < rows; r++) {
        float *x = s + r * cols;
        float m = shift;
        if (!fixed) {
            m = -INFINITY;
            if (scale) {
#pragma omp simd reduction(max : m)
                for (int64_t j = 0; j < cols; j++) {
                    float y = x[j] * scale[j];
                    m = y > m ? y : m;
                }
            } else {
#pragma omp simd reduction(max : m)
                for (int64_t j = 0; j < cols; j++) m = x[j] > m ? x[j] : m;
            }
        }
        float sum = 0.0f;
        if (scale && !store) {
#pragma omp simd reduction(+ : sum)
            for (int64_t j = 0; j < cols; j++) sum += exp_normal(clamped(fmaf(x[j], scale[j], -m), floor_));
        } else if (scale) {
#pragma omp simd reduction(+ : sum)
            for (int64_t j = 0; j < cols; j++) {
                float e = exp_normal(clamped(fmaf(x[j], scale[j], -m), floor_));
                x[j] = e;
                sum += e;
            }
        } else if (!store) {
#pragma omp simd reduction(+ : sum)
            for (int64_t j = 0; j < cols; j++) sum += exp_normal(clamped(x[j] - m, floor_));
        } else {
#pragma omp simd reduction(+ : sum)
            for (int64_t j = 0; j < cols; j++) {
                float e = exp_normal(clamped(x[j] - m, floor_));
                x[j] = e;
                sum += e;
            }
        }
        top[r] = m;
        total[r] = sum;
    }
}

/* s = exp(max(s - shift[row], floor)) in place, for `rows` rows of `cols` contiguous scores. */
void mgh_exp_shifted_rows_f32(float *s, int64_t rows, int64_t cols, const float *shift, float floor_,
                              int threads) {
    threads = team(threads);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t r = 0; r < rows; r++) {
        float *x = s + r * cols;
        const float c = shift[r];
#pragma omp simd
        for (int64_t j = 0; j < cols; j++) x[j] = exp_normal(clamped(x[j] - c, floor_));
    }
}
