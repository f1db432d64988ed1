/*
 * probe.c (part of kernels.c): mc_read_probe, the memory read rate this build can reach, as the ceiling
 * the kernels are judged against.
 *
 * `mixchat bench` used to take the ceiling from torch's fp32 matrix-vector product, which on an AVX-512
 * CPU reads with 256-bit loads at best and reaches under half of what the cores can pull: decode then
 * showed 138-162 % "of the ceiling". This reads a caller's buffer (1 GiB or more, so no cache helps) with
 * the widest loads the build has (512-bit under __AVX512F__, 256-bit under AVX2, 64-bit otherwise), split
 * over the same OpenMP pool and thread count as the kernels (one contiguous share per thread, as the
 * kernels give each thread its own rows), in turns with and without a software prefetch MC_PF bytes ahead
 * (on most CPUs one core alone does not keep enough misses in flight without it; on Zen 5 it costs, see
 * g_pf), so the best of both is the ceiling whichever the kernels run, eight independent XOR
 * accumulators per thread (no dependency chain limits the loads), and the accumulators folded into a
 * volatile sink so no load can be optimised away. Returns the best GB/s (1e9 bytes/s) over `reps`
 * passes, or a negative code on bad arguments.
 */

#include <time.h>

#if defined(__AVX512F__) && !defined(MC_PORTABLE)
#define MC_PROBE_BITS 512
#elif MC_AVX2
#define MC_PROBE_BITS 256
#else
#define MC_PROBE_BITS 64
#endif
#define MC_PROBE_STEP 512 /* bytes per loop iteration: 8 loads of 64 bytes (or 16 x 32, 64 x 8) */

static volatile uint64_t g_probe_sink;

static double mc_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* XOR of every 64-bit word of p[0, n) (n a multiple of MC_PROBE_STEP, p 64-byte aligned), prefetching pf
 * bytes ahead (0: not at all). */
static uint64_t mc_probe_range(const char *p, int64_t n, int64_t pf)
{
#if MC_PROBE_BITS == 512
    __m512i a[8];
    for (int i = 0; i < 8; i++) a[i] = _mm512_setzero_si512();
    for (int64_t o = 0; o < n; o += MC_PROBE_STEP) {
        if (pf) {
            __builtin_prefetch(p + o + pf, 0, 2);
            __builtin_prefetch(p + o + pf + 256, 0, 2);
        }
        MC_UNROLL for (int i = 0; i < 8; i++)
            a[i] = _mm512_xor_si512(a[i], _mm512_load_si512((const void *)(p + o + 64 * i)));
    }
    for (int i = 1; i < 8; i++) a[0] = _mm512_xor_si512(a[0], a[i]);
    __m256i h = _mm256_xor_si256(_mm512_castsi512_si256(a[0]), _mm512_extracti64x4_epi64(a[0], 1));
    __m128i q = _mm_xor_si128(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
    return (uint64_t)_mm_cvtsi128_si64(q) ^ (uint64_t)_mm_extract_epi64(q, 1);
#elif MC_PROBE_BITS == 256
    __m256i a[8];
    for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_si256();
    for (int64_t o = 0; o < n; o += MC_PROBE_STEP) {
        if (pf) {
            __builtin_prefetch(p + o + pf, 0, 2);
            __builtin_prefetch(p + o + pf + 256, 0, 2);
        }
        /* two 32-byte loads per accumulator and iteration: 8 chains, 16 loads */
        MC_UNROLL for (int i = 0; i < 8; i++) {
            a[i] = _mm256_xor_si256(a[i], _mm256_load_si256((const __m256i *)(p + o + 32 * i)));
            a[i] = _mm256_xor_si256(a[i], _mm256_load_si256((const __m256i *)(p + o + 256 + 32 * i)));
        }
    }
    for (int i = 1; i < 8; i++) a[0] = _mm256_xor_si256(a[0], a[i]);
    __m128i q = _mm_xor_si128(_mm256_castsi256_si128(a[0]), _mm256_extracti128_si256(a[0], 1));
    return (uint64_t)_mm_cvtsi128_si64(q) ^ (uint64_t)_mm_extract_epi64(q, 1);
#else
    uint64_t a[8] = {0};
    const uint64_t *w = (const uint64_t *)p;
    for (int64_t o = 0; o < n / 8; o += MC_PROBE_STEP / 8) {
        if (pf) {
            __builtin_prefetch(p + 8 * o + pf, 0, 2);
            __builtin_prefetch(p + 8 * o + pf + 256, 0, 2);
        }
        for (int j = 0; j < MC_PROBE_STEP / 8; j += 8)
            for (int i = 0; i < 8; i++) a[i] ^= w[o + j + i];
    }
    return a[0] ^ a[1] ^ a[2] ^ a[3] ^ a[4] ^ a[5] ^ a[6] ^ a[7];
#endif
}

/* Best GB/s over `reps` passes with and `reps` without the software prefetch, in turns, over buf[0, bytes) with `threads` threads (<= 0: the kernels' setting,
 * mc_set_threads). Reads the 64-byte-aligned part of the buffer whose length is a multiple of
 * MC_PROBE_STEP per thread. MC_EBADARG for fewer than 1 MiB or reps < 1. */
MC_API double mc_read_probe(const void *buf, int64_t bytes, int threads, int reps)
{
    if (!buf || bytes < (1 << 20) || reps < 1) return MC_EBADARG;
    const char *p = (const char *)(((uintptr_t)buf + 63) & ~(uintptr_t)63);
    int64_t n = bytes - (p - (const char *)buf);
    int nt = threads > 0 ? threads : g_threads;
#ifndef _OPENMP
    nt = 1;
#endif
    const int64_t per = (n / nt) & ~(int64_t)(MC_PROBE_STEP - 1); /* each thread's share */
    n = per * nt;
    double best = 0.;
    uint64_t sink = 0;
    for (int r = 0; r < 2 * reps; r++) {
        const int64_t pf = r % 2 ? 0 : MC_PF;
        int64_t read = 0;
        double t0 = mc_now();
#ifdef _OPENMP
#pragma omp parallel num_threads(nt) reduction(^ : sink) reduction(+ : read)
        {
            int tid = omp_get_thread_num(), got = omp_get_num_threads();
            /* a pool that gives fewer threads than asked: the ones there split the whole buffer */
            int64_t share = got == nt ? per : (n / got) & ~(int64_t)(MC_PROBE_STEP - 1);
            sink ^= mc_probe_range(p + tid * share, share, pf);
            read += share;
        }
#else
        sink ^= mc_probe_range(p, n, pf);
        read = n;
#endif
        double dt = mc_now() - t0;
        if (dt > 0. && (double)read / dt / 1e9 > best) best = (double)read / dt / 1e9;
    }
    g_probe_sink ^= sink;
    return best;
}
