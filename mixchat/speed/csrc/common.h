/*
 * common.h (part of kernels.c, the unity build; see there): what every format's kernels share.
 * The includes and the SIMD switches (MC_AVX2, MC_AVX512, MC_VNNI), macros, tunables (rows and accumulator
 * splits per kernel, K chunk budget, prefetch distance), the exported thread and ABI settings, mc_ctx (one
 * product's arguments), the prefetch offset (mc_pf), the OpenMP job runner (mc_run_jobs: the same pool and
 * thread count for every kernel, rows in chunks the threads share out), the per-thread scratch buffer, bf16 -> fp32, group sums of x, and, for the SIMD build, the row
 * driver (MC_DRIVER) and the accumulator macros (8 and 16 lanes) the bf16/int8/int4 files instantiate. Kept in one header so each
 * format's file holds only its own arithmetic.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <alloca.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(MC_PORTABLE)
#include <immintrin.h>
#define MC_AVX2 1
#else
#define MC_AVX2 0
#endif

/* AVX-512 kernels beside the AVX2 ones (bf16, int8 Q8, int4 Q8 row kernels), chosen by the compiler's
 * feature macros, so -march=native picks them on an AVX-512 CPU and the avx2 build (-march=x86-64-v3)
 * never sees them. They need F, BW (byte/word ops, masks) and VL (128/256-bit masked loads); VNNI adds
 * vpdpbusd for the integer dot products, without it vpmaddubsw + vpmaddwd do them as in the AVX2 code.
 * MC_NO_AVX512 keeps the AVX2 kernels on an AVX-512 build (comparisons, benchmarks). */
#if MC_AVX2 && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && !defined(MC_NO_AVX512)
#define MC_AVX512 1
#else
#define MC_AVX512 0
#endif
#if MC_AVX512 && defined(__AVX512VNNI__)
#define MC_VNNI 1
#else
#define MC_VNNI 0
#endif
/* AVX512-BF16 adds vdpbf16ps: 32 bf16 products summed into 16 fp32 lanes per instruction, twice an fp32 FMA's
 * work and no widening of the weights. The prompt GEMM can use it (x rounded to bf16 once per call; see
 * gemm.c); MC_NO_BF16DOT leaves it out of a build. */
#if MC_AVX512 && defined(__AVX512BF16__) && !defined(MC_NO_BF16DOT)
#define MC_BF16DOT 1
#else
#define MC_BF16DOT 0
#endif

#define MC_API __attribute__((visibility("default")))
#define MC_INLINE static inline __attribute__((always_inline))
#define MC_MAYBE_UNUSED __attribute__((unused)) /* helpers some builds (no AVX2, no OpenMP) do not call */
#define MC_UNROLL _Pragma("GCC unroll 32")
/* Pin a loaded vector in a register. Left alone, GCC folds the load into every instruction that uses
 * the value (one load per use); that doubles the loads of x and w, and loads (under 2 ymm per cycle
 * here) rather than FMAs are then what limits the kernels. */
#define MC_REG(v) __asm__("" : "+x"(v))

/* Bump when an exported signature changes or an export kernels.py relies on is added (5: mc_struct_size;
 * 6: T rows in mc_decode_*, mc_linear_rows; 8: mc_bf16dot, mc_set_gemm_bf16dot; 9: the prompt GEMM's
 * choice exports; 10: mc_set_one_row, mc_get_one_row; 11: the row settings per row length, mc_short_row_k;
 * 12: int4's scale and zero are fp16): kernels.py refuses a library with another version. */
#define MC_ABI_VERSION 12

#define MC_MULTI_MAX 8        /* weights one mc_linear_multi call takes */
#define MC_RB 16              /* rows per block that share one pass over the K chunks */
/* Rows (R, up to 4) and accumulator splits (S) of the one-token kernels; -D overrides are for tuning.
 * S also fixes the row-exact kernels' layout (drafting's verify pass sums each row as T = 1 does): T rows
 * need T x S accumulators, so S is kept at 2 (a one-token product is bound by memory, not FMA latency). */
#ifndef MC_BF16_T1_R
#if MC_BF16DOT /* four rows per pass read 10-15 % faster than two with vdpbf16ps on a 2-core Zen 4 */
#define MC_BF16_T1_R 4
#else
#define MC_BF16_T1_R 2
#endif
#define MC_BF16_T1_S 2
#endif
#ifndef MC_INT8_T1_R
#define MC_INT8_T1_R 2
#define MC_INT8_T1_S 2
#endif
#ifndef MC_INT4_T1_R
#define MC_INT4_T1_R 2
#define MC_INT4_T1_S 2
#endif
/* The kernels' accumulator arrays are sized for these maxima; a larger override would write past them. */
_Static_assert(MC_BF16_T1_R >= 1 && MC_BF16_T1_R <= 4 && MC_BF16_T1_S >= 1 && MC_BF16_T1_S <= 4, "bf16 R, S <= 4");
_Static_assert(MC_INT8_T1_R >= 1 && MC_INT8_T1_R <= 4 && MC_INT8_T1_S >= 1 && MC_INT8_T1_S <= 4, "int8 R, S <= 4");
_Static_assert(MC_INT4_T1_R >= 1 && MC_INT4_T1_R <= 4 && MC_INT4_T1_S >= 1 && MC_INT4_T1_S <= 2, "int4 R <= 4, S <= 2");
#ifndef MC_X_BUDGET
#define MC_X_BUDGET 16384     /* bytes of x (all T rows) per K chunk: about half of L1 */
#endif
#ifndef MC_PF
#define MC_PF 16384           /* software prefetch distance in bytes along each weight row */
#endif
#ifndef MC_PF_HINT
#define MC_PF_HINT _MM_HINT_T1
#endif
#define MC_PREFETCH(p, off) _mm_prefetch((const char *)(p) + (off), MC_PF_HINT)

#define MC_EBADARG -1
#define MC_ENOMEM -2

static int g_threads = 1;
/* The row kernels' settings are kept per weight format (MC_FMT_*) and per row length: a 7B's rows are 4,096
 * columns long (wq..wo, w1, w3) or 14,336 (w2), and the best way to stream them differs between the two (on a
 * 2-core Zen 4, int8 kernels alone: one row without prefetch 0.85 of the probe at 4,096 columns against 0.72
 * for the build's two rows with prefetch; at 14,336 both 0.76; bf16 at 14,336 four rows with prefetch 0.74,
 * without 0.67). Rows longer than MC_SHORT_ROW_K columns take the long rows' settings. */
enum { MC_FMT_BF16, MC_FMT_INT8, MC_FMT_INT4, MC_FMTS };
enum { MC_ROWS_SHORT, MC_ROWS_LONG, MC_ROW_KINDS };
#ifndef MC_SHORT_ROW_K
#define MC_SHORT_ROW_K 8192
#endif
MC_INLINE int mc_row_kind(int64_t K) { return K > MC_SHORT_ROW_K ? MC_ROWS_LONG : MC_ROWS_SHORT; }
MC_INLINE int mc_bad_setting(int fmt, int rows)
{
    return fmt < 0 || fmt >= MC_FMTS || rows < 0 || rows >= MC_ROW_KINDS;
}
/* The row kernels' software prefetch distance in bytes (mc_pf): MC_PF unless mc_set_prefetch says otherwise, 0
 * turning it off. It helps where the hardware prefetchers alone keep too few misses in flight (AVX2 EPYC,
 * Xeon, Zen 4: +10-40 %; int8 and int4 on Zen 5) and costs bf16 on Zen 5 (a one-token product read at 0.81 of
 * the probe with it, 0.99 without), so the Python side measures both on each machine (speed.kernels.prefetch)
 * rather than guess from the CPU. */
static int64_t g_pf[MC_FMTS][MC_ROW_KINDS] = {{MC_PF, MC_PF}, {MC_PF, MC_PF}, {MC_PF, MC_PF}};

MC_API int mc_abi_version(void) { return MC_ABI_VERSION; }
MC_API int mc_simd(void) { return MC_AVX2; }
/* Which row kernels this build runs: 0 the portable loops, 1 AVX2+FMA, 2 AVX-512 (F/BW/VL), 3 AVX-512 with
 * VNNI (the GEMM tiles are 512 bits wide in 2 and 3; the transposed bf16 paths and the fused decode
 * arithmetic stay AVX2). */
MC_API int mc_simd_level(void) { return MC_AVX2 ? (MC_AVX512 ? 2 + MC_VNNI : 1) : 0; }
MC_API void mc_set_threads(int n) { g_threads = n < 1 ? 1 : n; }
MC_API int mc_get_threads(void) { return g_threads; }
MC_API int64_t mc_short_row_k(void) { return MC_SHORT_ROW_K; }
/* Sets the distance of format fmt's rows of kind `rows` (MC_ROWS_*) (bytes < 0: 0; at most 1 MiB);
 * MC_EBADARG for an unknown format or kind. */
MC_API int mc_set_prefetch(int fmt, int rows, int64_t bytes)
{
    if (mc_bad_setting(fmt, rows)) return MC_EBADARG;
    g_pf[fmt][rows] = bytes < 0 ? 0 : bytes > (1 << 20) ? (1 << 20) : bytes;
    return 0;
}
MC_API int64_t mc_get_prefetch(int fmt, int rows) { return mc_bad_setting(fmt, rows) ? -1 : g_pf[fmt][rows]; }
/* Whether a one-token product of format fmt reads one weight row per pass (1) or the build's MC_*_T1_R rows
 * side by side (0, the default), for rows of kind `rows`. R changes no row's sums, only how many rows stream
 * at once: on a 2-core Zen 4 four bf16 rows per pass read 10-15 % faster than two, on Zen 5 one row read 0.95
 * of the probe against 0.77-0.83 for four (int8: 0.93 against 0.73 for two), so the Python side measures it
 * per machine with the prefetch (speed.kernels.prefetch). MC_EBADARG for an unknown format or kind. */
static int g_one_row[MC_FMTS][MC_ROW_KINDS];
MC_API int mc_set_one_row(int fmt, int rows, int on)
{
    if (mc_bad_setting(fmt, rows)) return MC_EBADARG;
    g_one_row[fmt][rows] = on != 0;
    return 0;
}
MC_API int mc_get_one_row(int fmt, int rows) { return mc_bad_setting(fmt, rows) ? -1 : g_one_row[fmt][rows]; }
/* One row per pass only where the row's x, as the kernel reads it, takes at most MC_ONE_ROW_X_MAX bytes: one
 * weight stream leaves x in L1 beside it, but a longer x is read from L2 once per row instead of once per R
 * rows, and its misses take the line-fill slots the weight stream needs. On a 2-core Zen 4 (32 KiB L1d),
 * 2 threads, one-token bf16 products through 117 MB in huge pages, against the read probe: K = 4096 (x 8 KiB
 * in bf16) one row without prefetch 0.94, the build's four rows with it 0.78; K = 14336 (28 KiB) one row
 * 0.54, four rows 0.74. int8 at K = 14336 (14 KiB) reads alike either way (0.76). Results do not change. */
#ifndef MC_ONE_ROW_X_MAX
#define MC_ONE_ROW_X_MAX 16384
#endif
MC_API int mc_one_row_applies(int fmt, int64_t K)
{
    if (fmt < 0 || fmt >= MC_FMTS || K < 1) return MC_EBADARG;
    const int64_t x_bytes = fmt == MC_FMT_BF16 ? K * (MC_BF16DOT ? 2 : 4) : K;
    return g_one_row[fmt][mc_row_kind(K)] && x_bytes <= MC_ONE_ROW_X_MAX;
}
MC_API int64_t mc_prefetch_default(void) { return MC_PF; }

/* bf16 stored transposed, T <= 8: threads split K (1, default) or N (0); see bf16t_krange. */
static int g_bf16t_ksplit = 1;
MC_API void mc_set_bf16t_ksplit(int on) { g_bf16t_ksplit = on; }

/* Everything a row kernel needs; one struct so the thread runner can stay generic. */
typedef struct mc_ctx mc_ctx;
typedef void (*mc_rows_fn)(const mc_ctx *c, int64_t lo, int64_t hi);
struct mc_ctx {
    const float *x;     /* fp32 [T, K], caller's layout */
    const float *xp;    /* prepared fp32 copy of x (bf16: even/odd order; int4: nibble order) */
    const float *xs;    /* int4: per-token, per-group sums of x, [T, K/G] */
    const int8_t *xq;   /* int4 Q8: int8 x in the nibble order, [T, K] */
    const float *xd;    /* int4 Q8: block scales as one 8-lane vector per 64 columns, [T, K/64, 8] */
    const void *w;
    const float *scale;    /* int8: fp32 [N] */
    const uint16_t *hscale; /* int4: fp16 bits [N, K/G] */
    const uint16_t *hzero;  /* int4: fp16 bits [N, K/G] */
    float *y;
    int64_t N, K;
    int64_t KC;         /* K chunk (see the top of the file) */
    int T, G;
    int TA;             /* int4q8_sliced: all rows of x prepared, taken 8 at a time by fns[] */
    const mc_rows_fn *fns;
};

#if MC_AVX2 /* the SIMD kernels prefetch (MC_PREFETCH needs immintrin.h) */
/* The software prefetch offset of a row kernel: what it reads ~pf bytes (g_pf of its format and row kind)
 * later in its own order of reads. When K is chunked, that is the next group of R rows at the same columns
 * (the rest of this row is read a whole chunk later). When rows are streamed whole, R at a time in lockstep,
 * it is pf / R bytes further along each row, and past a row's end the row R further on, not the next one,
 * which another of the R streams is reading at that moment. Prefetching "pf along the address" there fetched
 * the next row late and skipped the row after: products with long rows (K = 14336, the 7B's w2) read 10-15 %
 * slower than those with short ones. mc_prefetch is called with the current column's byte offset, in
 * increasing order. */
typedef struct {
    const char *w; /* the first of the R rows */
    int64_t off, wrap_at, step, row;
    int on; /* pf > 0 when the kernel started */
} mc_pf;

MC_INLINE mc_pf mc_pf_init(const mc_ctx *c, const void *w, int R, int64_t row_bytes, int64_t col_bytes, int fmt)
{
    const int64_t pf = g_pf[fmt][mc_row_kind(c->K)];
    mc_pf p = {(const char *)w, (int64_t)R * row_bytes, INT64_MAX, 0, row_bytes, pf > 0};
    if (c->KC < c->K - 63) return p;
    if (R == 1) { /* the rows follow each other: pf bytes on is just further along, with no turn to track */
        p.off = pf;
        return p;
    }
    const int64_t lead = pf / R, m = (col_bytes + lead) / row_bytes;
    p.step = (int64_t)(R - 1) * row_bytes;
    p.off = lead + m * p.step;
    p.wrap_at = (m + 1) * row_bytes - lead;
    return p;
}

/* Prefetches, in each of the R rows, what is read ~pf bytes after byte `col` of the rows. */
MC_INLINE void mc_prefetch(mc_pf *p, const int R, int64_t col)
{
    if (!p->on) return;
    /* one row never turns (mc_pf_init); R is a constant, so its kernels are left without the loop */
    if (R > 1)
        while (col >= p->wrap_at) {
            p->off += p->step;
            p->wrap_at += p->row;
        }
    MC_UNROLL for (int r = 0; r < R; r++) MC_PREFETCH(p->w + r * p->row + col, p->off);
}
#endif

/* Contiguous, `align`-row-aligned share of [0, n) for thread `tid` of `nt`. */
MC_MAYBE_UNUSED static void mc_share(int64_t n, int64_t align, int tid, int nt, int64_t *lo, int64_t *hi)
{
    int64_t units = (n + align - 1) / align;
    int64_t per = units / nt, rem = units % nt;
    int64_t a = tid * per + (tid < rem ? tid : rem);
    int64_t b = a + per + (tid < rem ? 1 : 0);
    *lo = a * align;
    *hi = b * align < n ? b * align : n;
}

/* One product for the job runner: a row kernel and its arguments. whole: each thread runs one contiguous
 * share in one call (kernels whose rows are not weight rows, such as the transposed bf16 one, whose rows
 * are output columns: cut finer, each call would read a few bytes from every row of the stored weight). */
typedef struct {
    mc_rows_fn fn;
    mc_ctx c;
    int whole;
} mc_job;

/* A job's rows in chunks of a multiple of MC_RB rows and about MC_CHUNK_WEIGHTS weights (512 KB of bf16 at K =
 * 4096): small enough to even out the threads, long enough to stream. */
#ifndef MC_CHUNK_WEIGHTS
#define MC_CHUNK_WEIGHTS (1 << 18)
#endif
MC_MAYBE_UNUSED static int64_t mc_chunk_rows(const mc_job *j, int nt)
{
    const int64_t N = j->c.N;
    if (j->whole) { /* one share per thread, 8-row aligned */
        int64_t per = (N + nt - 1) / nt;
        return per < 8 ? 8 : (per + 7) / 8 * 8;
    }
    int64_t rows = (MC_CHUNK_WEIGHTS + j->c.K - 1) / j->c.K;
    /* at least 4 chunks per thread where the rows allow it (many cores, short weights) */
    int64_t most = (N + 4 * (int64_t)nt - 1) / (4 * (int64_t)nt);
    if (most < rows) rows = most;
    rows = (rows + MC_RB - 1) / MC_RB * MC_RB;
    return rows > 0 ? rows : MC_RB;
}

/* One thread's chunks of one job, [front, back) packed in one word: the owner takes from the front, the
 * others from the back, each with a compare-and-swap, so no chunk runs twice. */
MC_MAYBE_UNUSED static int64_t mc_take(uint64_t *span, int front)
{
    uint64_t v = __atomic_load_n(span, __ATOMIC_ACQUIRE);
    for (;;) {
        uint32_t f = (uint32_t)(v >> 32), b = (uint32_t)v;
        if (f >= b) return -1;
        uint64_t next = front ? ((uint64_t)(f + 1) << 32) | b : ((uint64_t)f << 32) | (b - 1);
        if (__atomic_compare_exchange_n(span, &v, next, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            return front ? (int64_t)f : (int64_t)(b - 1);
    }
}

/* Runs the jobs over OpenMP threads. kernels.py loads this library after torch, so `omp parallel` runs
 * on torch's own libgomp worker pool (no second pool competing for the cores); num_threads() is given
 * per region rather than through omp_set_num_threads(), which would change torch's setting too.
 * Several jobs (the products of one x with wq, wk and wv, or with w1 and w3) share one region: each
 * thread goes on to its part of the next weight without waiting for the others, which saves a
 * fork/join per weight and keeps the memory streams busy across the switch.
 * Each thread starts on one contiguous share of each job (a simple sequential stream for the hardware
 * prefetchers) and, once through it, takes chunks from the end of the others' shares. A static split
 * left one core idle 17 % of the time in a 7B layer on a 2-core VM, whose cores do not read equally fast
 * from one moment to the next; the split changes no result, since each output row is summed by one
 * thread, the same way whichever. */
static void mc_run_jobs(const mc_job *jobs, int n)
{
    int nt = g_threads;
    int64_t work = 0, rows = 0;
    for (int i = 0; i < n; i++) {
        work += jobs[i].c.N * jobs[i].c.K;
        rows += jobs[i].c.N;
    }
    /* Below ~64 K weights the fork/join costs more than a second core gains. */
    if (work < 65536) nt = 1;
    if (nt > rows / 8) nt = rows / 8 > 0 ? (int)(rows / 8) : 1;
#ifdef _OPENMP
    if (n > MC_MULTI_MAX) { /* no caller gives more; one region per job rather than a fixed array overrun */
        for (int i = 0; i < n; i++) mc_run_jobs(&jobs[i], 1);
        return;
    }
    if (nt > 1024) nt = 1024; /* bounds the spans on the stack */
    int64_t chunk[MC_MULTI_MAX], chunks = 0;
    for (int i = 0; i < n && nt > 1; i++) {
        chunk[i] = mc_chunk_rows(&jobs[i], nt);
        chunks += (jobs[i].c.N + chunk[i] - 1) / chunk[i];
    }
    if (nt > chunks) nt = (int)chunks; /* a thread with no chunk of any job would only fork and join */
#endif
    if (nt <= 1) {
        for (int i = 0; i < n; i++) jobs[i].fn(&jobs[i].c, 0, jobs[i].c.N);
        return;
    }
#ifdef _OPENMP
    /* chunk indices are packed in 32 bits: N / 16 < 2^32 for any weight that fits in memory */
    uint64_t *span = (uint64_t *)alloca(sizeof(uint64_t) * (size_t)n * (size_t)nt);
    for (int i = 0; i < n; i++) {
        for (int t = 0; t < nt; t++) {
            int64_t lo, hi;
            mc_share((jobs[i].c.N + chunk[i] - 1) / chunk[i], 1, t, nt, &lo, &hi);
            span[i * nt + t] = ((uint64_t)lo << 32) | (uint64_t)hi;
        }
    }
#pragma omp parallel num_threads(nt)
    {
        /* a pool that gives fewer threads than asked: the missing threads' shares are taken as the others' */
        const int tid = omp_get_thread_num();
        for (int i = 0; i < n; i++) {
            const mc_job *j = &jobs[i];
            for (int v = 0; v < nt; v++) {
                uint64_t *s = &span[i * nt + (tid + v) % nt];
                int64_t q;
                while ((q = mc_take(s, v == 0)) >= 0) {
                    int64_t lo = q * chunk[i], hi = lo + chunk[i] < j->c.N ? lo + chunk[i] : j->c.N;
                    j->fn(&j->c, lo, hi);
                }
            }
        }
    }
#else
    for (int i = 0; i < n; i++) jobs[i].fn(&jobs[i].c, 0, jobs[i].c.N);
#endif
}

static void mc_run(mc_rows_fn fn, const mc_ctx *c, int whole)
{
    mc_job job = {fn, *c, whole};
    mc_run_jobs(&job, 1);
}

/* K chunk for `main` vectorised columns when each column costs `bytes` of x over all T rows. */
MC_MAYBE_UNUSED static int64_t mc_chunk(int64_t main, double bytes)
{
    int64_t kc = (int64_t)(MC_X_BUDGET / bytes) & ~(int64_t)127;
    if (kc < 256) kc = 256;
    return kc >= main ? (main > 0 ? main : 1) : kc;
}

/* Per-calling-thread scratch for the prepared activations: grows, never shrinks, so a decode loop does
 * not pay malloc/mmap + page faults every call. Thread-local because ctypes releases the GIL and two
 * Python threads may call in at once. */
static __thread void *tl_buf;
static __thread size_t tl_cap;

MC_MAYBE_UNUSED static void *mc_scratch(size_t bytes)
{
    if (bytes > tl_cap) {
        free(tl_buf);
        tl_cap = (bytes + 4095) & ~(size_t)4095;
        tl_buf = aligned_alloc(64, tl_cap);
        if (!tl_buf) tl_cap = 0;
    }
    return tl_buf;
}

/* fp16 bits -> fp32, exact (int4's scales and zeros are stored as fp16). With F16C (every AVX2 build) one
 * vcvtph2ps; the portable build rebuilds the fp32 bits, subnormals and inf/NaN included. */
static inline float mc_h2f(uint16_t h)
{
#if MC_AVX2
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff;
    uint32_t u;
    if (e == 0x1f) u = sign | 0x7f800000u | (m << 13);
    else if (e) u = sign | ((e + 112) << 23) | (m << 13);
    else if (!m) u = sign;
    else { /* subnormal: m * 2^-24, normalised */
        int sh = 0;
        uint32_t mm = m;
        while (!(mm & 0x400)) {
            mm <<= 1;
            sh++;
        }
        u = sign | ((uint32_t)(113 - sh) << 23) | ((mm & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
#endif
}

#if MC_AVX2
MC_INLINE __m256 mc_h2f8(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
#endif

static inline float bf16_to_f32(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Per-token, per-group sums of x, used for the (q - 8) offset and the zero point. */
MC_MAYBE_UNUSED static void group_sums(const float *x, int T, int64_t K, int G, float *xs)
{
    int64_t ng = K / G;
    for (int t = 0; t < T; t++)
        for (int64_t g = 0; g < ng; g++) {
            float s = 0.f;
            for (int64_t k = g * G; k < (g + 1) * G; k++) s += x[t * K + k];
            xs[t * ng + g] = s;
        }
}


#if MC_AVX2

MC_INLINE float hsum8(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Row driver: blocks of MC_RB rows, each walking the K chunks; R rows per kernel call, leftovers one
 * at a time; EPI turns the partial sums of a row into y (tails, scales, zero points). part[r][t] is
 * the fp32 partial sum of row r, token t. Array sizes in the kernels are fixed maxima, not VLAs: with
 * compile-time sizes and full unrolling GCC keeps them in registers. */
#define MC_DRIVER(NAME, BLOCK, EPI, KMAIN, R, T, S)                                                  \
    static void NAME(const mc_ctx *c, int64_t lo, int64_t hi)                                      \
    {                                                                                              \
        const int64_t km = KMAIN;                                                                  \
        float part[MC_RB][8];                                                                      \
        for (int64_t nb = lo; nb < hi; nb += MC_RB) {                                              \
            int64_t ne = nb + MC_RB < hi ? nb + MC_RB : hi;                                        \
            memset(part, 0, sizeof part);                                                          \
            for (int64_t k0 = 0; k0 < km; k0 += c->KC) {                                           \
                int64_t k1 = k0 + c->KC < km ? k0 + c->KC : km, n = nb;                            \
                for (; n + (R) <= ne; n += (R)) BLOCK(c, n, k0, k1, R, T, S, &part[n - nb]);       \
                for (; n < ne; n++) BLOCK(c, n, k0, k1, 1, T, S, &part[n - nb]);                   \
            }                                                                                      \
            for (int64_t n = nb; n < ne; n++) EPI(c, n, T, part[n - nb]);                          \
        }                                                                                          \
    }

#define MC_ZERO_ACC(acc, S, R, T)                                                                    \
    MC_UNROLL for (int s_ = 0; s_ < (S); s_++) MC_UNROLL for (int r_ = 0; r_ < (R); r_++)            \
        MC_UNROLL for (int t_ = 0; t_ < (T); t_++) acc[s_][r_][t_] = _mm256_setzero_ps()

#define MC_FLUSH_ACC(acc, S, R, T, part)                                                             \
    MC_UNROLL for (int r_ = 0; r_ < (R); r_++) MC_UNROLL for (int t_ = 0; t_ < (T); t_++) {          \
        __m256 a_ = acc[0][r_][t_];                                                                  \
        MC_UNROLL for (int s_ = 1; s_ < (S); s_++) a_ = _mm256_add_ps(a_, acc[s_][r_][t_]);          \
        part[r_][t_] += hsum8(a_);                                                                   \
    }

#if MC_AVX512
/* The same for 16-lane accumulators (part[] stays 8 floats per row: one float per token). */
#define MC_ZERO_ACC512(acc, S, R, T)                                                                 \
    MC_UNROLL for (int s_ = 0; s_ < (S); s_++) MC_UNROLL for (int r_ = 0; r_ < (R); r_++)            \
        MC_UNROLL for (int t_ = 0; t_ < (T); t_++) acc[s_][r_][t_] = _mm512_setzero_ps()

#define MC_FLUSH_ACC512(acc, S, R, T, part)                                                          \
    MC_UNROLL for (int r_ = 0; r_ < (R); r_++) MC_UNROLL for (int t_ = 0; t_ < (T); t_++) {          \
        __m512 a_ = acc[0][r_][t_];                                                                  \
        MC_UNROLL for (int s_ = 1; s_ < (S); s_++) a_ = _mm512_add_ps(a_, acc[s_][r_][t_]);          \
        part[r_][t_] += _mm512_reduce_add_ps(a_);                                                    \
    }
#endif

#endif /* MC_AVX2 */
