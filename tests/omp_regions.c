/* Counts the OpenMP parallel regions a process forks at the outermost level (not those nested
 * inside another region, which run on the thread that meets them): loaded with LD_PRELOAD, it
 * stands in front of libgomp's entry points for `#pragma omp parallel` (PyTorch's at::parallel_for,
 * MKL, the native library) and calls the real ones. omp_regions() returns the count so far. For
 * tests/test_cpu_threads.py. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdatomic.h>

static atomic_long regions;

long omp_regions(void) { return atomic_load(&regions); }

static void count(void) {
    static int (*in_parallel)(void);
    if (!in_parallel) in_parallel = (int (*)(void))dlsym(RTLD_NEXT, "omp_in_parallel");
    if (!in_parallel || !in_parallel()) atomic_fetch_add(&regions, 1);
}

#define WRAP(name, params, args)                                                  \
    void name params {                                                            \
        static void(*real) params;                                                \
        if (!real) real = (void(*) params)dlsym(RTLD_NEXT, #name);                \
        count();                                                                  \
        real args;                                                                \
    }

WRAP(GOMP_parallel, (void (*fn)(void *), void *data, unsigned threads, unsigned flags), (fn, data, threads, flags))
WRAP(GOMP_parallel_loop_static, (void (*fn)(void *), void *data, unsigned threads, long start, long end, long incr,
     long chunk, unsigned flags), (fn, data, threads, start, end, incr, chunk, flags))
WRAP(GOMP_parallel_loop_dynamic, (void (*fn)(void *), void *data, unsigned threads, long start, long end, long incr,
     long chunk, unsigned flags), (fn, data, threads, start, end, incr, chunk, flags))
WRAP(GOMP_parallel_loop_guided, (void (*fn)(void *), void *data, unsigned threads, long start, long end, long incr,
     long chunk, unsigned flags), (fn, data, threads, start, end, incr, chunk, flags))
WRAP(GOMP_parallel_start, (void (*fn)(void *), void *data, unsigned threads), (fn, data, threads))
