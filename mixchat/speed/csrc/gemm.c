/*
 * gemv.c: matrix-vector kernels for one-token-at-a-time decoding on CPU, and a GEMM for prompts (see
 * "GEMM" below: from mc_get_gemm_min_rows() rows of x on, every entry point but mc_linear_int4_q8 hands
 * over to it).
 *
 * Decoding reads every weight once per token, so these kernels are judged by how close they get to the
 * memory read limit, not by FLOPs. All of them:
 *   - take x as fp32 [T, K] (T small) and write y as fp32 [T, N], y[t, n] = sum_k w[n, k] * x[t, k];
 *   - read each weight row once for all T rows of x (up to 8; 4 for exact int4; more rows are done in
 *     slices), so T = 4 costs about the same memory traffic as T = 1;
 *   - give each thread one contiguous range of output rows, so it streams its own part of the weight
 *     (simple sequential streams for the hardware prefetchers);
 *   - accumulate in fp32 in enough independent registers (R rows x T tokens x S splits, about 8) to
 *     hide FMA latency; R rows share each load of x.
 *
 * Every weight row re-reads all of x (T * K * 4 bytes); past L1 (32 KiB per core on Zen 3) those loads
 * come from L2. Where that is what limits (bf16 at T >= 3: T FMAs and 2T/R bytes of x per weight byte),
 * K is cut into chunks whose x fits in ~16 KiB, rows are taken in blocks of MC_RB, and each block walks
 * the chunks in turn (partial sums kept in a small array). Elsewhere chunking measured slower than
 * streaming whole rows (it breaks the weight into short runs), so KC = K there.
 *
 * Weights are also prefetched in software, MC_PF bytes ahead: one core alone cannot keep enough cache
 * misses in flight from the hardware prefetchers to approach the read limit (measured: +10-40%).
 *
 * Weight formats:
 *   bf16  w uint16 [N, K] (bf16 bits). Any K (the last K % 32 columns go through scalar code).
 *   int8  q int8 [N, K] and scale fp32 [N]: w = scale[n] * q. Any K. mc_linear_int8 keeps fp32
 *         activations (exact); mc_linear_int8_q8 rounds x to int8 per 32 columns (K % 32 == 0) and
 *         uses integer multiply-adds, the only way a core keeps up with the memory read rate.
 *   int4  packed uint8 [N, K/2] (low nibble = even k, high nibble = odd k, values 0..15), scale and zero
 *         fp32 [N, K/G]: w = (q - 8) * scale + zero. K % 64 == 0 and G in {32, 64, 128}.
 *         mc_linear_int4 keeps fp32 activations (exact). mc_linear_int4_q8 rounds x to int8 in blocks
 *         of 32 (one fp32 scale each, like llama.cpp's Q8_0) and uses integer multiply-adds: turning
 *         nibbles into fp32 costs more ALU time than half a byte per weight of memory traffic leaves,
 *         so only the Q8 path reaches the read limit, above all for T > 1.
 *
 * Built with -march=native by mixchat/speed/kernels.py (MIXCHAT_KERNEL_ISA picks another build); where the
 * compiler does not target AVX2+FMA, or MC_PORTABLE is defined (the portable build, which pins this path
 * on any CPU), the portable scalar loops below are compiled instead (correct, slow) and mc_simd() reports 0.
 * Rounding in the Q8 path relies on the default MXCSR mode (round to nearest even).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX2__) && defined(__FMA__) && !defined(MC_PORTABLE)
#include <immintrin.h>
#define MC_AVX2 1
#else
#define MC_AVX2 0
#endif

#define MC_API __attribute__((visibility("default")))
#define MC_INLINE static inline __attribute__((always_inline))
#define MC_MAYBE_UNUSED __attribute__((unused)) /* helpers some builds (no AVX2, no OpenMP) do not call */
#define MC_UNROLL _Pragma("GCC unroll 32")
/* Pin a loaded vector in a register. Left alone, GCC folds the load into every instruction that uses
 * the value (one load per use); that doubles the loads of x and w, and loads (under 2 ymm per cycle
 * here) rather than FMAs are then what limits the kernels. */
#define MC_REG(v) __asm__("" : "+x"(v))

/* Bump when an exported signature changes: kernels.py refuses a library with another version. */
#define MC_ABI_VERSION 4

#define MC_MULTI_MAX 8        /* weights one mc_linear_multi call takes */
#define MC_RB 16              /* rows per block that share one pass over the K chunks */
/* Rows (R, up to 4) and accumulator splits (S) of the one-token kernels; -D overrides are for tuning. */
#ifndef MC_BF16_T1_R
#define MC_BF16_T1_R 2
#define MC_BF16_T1_S 4
#endif
#ifndef MC_INT8_T1_R
#define MC_INT8_T1_R 2
#define MC_INT8_T1_S 4
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
/* Where the data ~MC_PF bytes ahead in this thread's access order lives, relative to the current
 * address: further along the row when rows are streamed whole; in the next group of R rows (same
 * columns) when K is chunked, since the rest of this row is only read a whole chunk later. */
#define MC_PF_OFFSET(R, row_bytes) (c->KC >= c->K - 63 ? (int64_t)MC_PF : (int64_t)(R) * (int64_t)(row_bytes))
#define MC_PREFETCH(p, off) _mm_prefetch((const char *)(p) + (off), MC_PF_HINT)

#define MC_EBADARG -1
#define MC_ENOMEM -2

static int g_threads = 1;

MC_API int mc_abi_version(void) { return MC_ABI_VERSION; }
MC_API int mc_simd(void) { return MC_AVX2; }
MC_API void mc_set_threads(int n) { g_threads = n < 1 ? 1 : n; }
MC_API int mc_get_threads(void) { return g_threads; }

/* bf16 stored transposed, T <= 8: threads split K (1, default) or N (0); see bf16t_krange. */
static int g_bf16t_ksplit = 1;
MC_API void mc_set_bf16t_ksplit(int on) { g_bf16t_ksplit = on; }

/* Everything a row kernel needs; one struct so the thread runner can stay generic. */
typedef struct {
    const float *x;     /* fp32 [T, K], caller's layout */
    const float *xp;    /* prepared fp32 copy of x (bf16: even/odd order; int4: nibble order) */
    const float *xs;    /* int4: per-token, per-group sums of x, [T, K/G] */
    const int8_t *xq;   /* int4 Q8: int8 x in the nibble order, [T, K] */
    const float *xd;    /* int4 Q8: block scales as one 8-lane vector per 64 columns, [T, K/64, 8] */
    const void *w;
    const float *scale;
    const float *zero;
    float *y;
    int64_t N, K;
    int64_t KC;         /* K chunk (see the top of the file) */
    int T, G;
} mc_ctx;

typedef void (*mc_rows_fn)(const mc_ctx *c, int64_t lo, int64_t hi);

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

/* One product for the job runner: a row kernel and its arguments. */
typedef struct {
    mc_rows_fn fn;
    mc_ctx c;
} mc_job;

/* Static split over OpenMP threads. kernels.py loads this library after torch, so `omp parallel` runs
 * on torch's own libgomp worker pool (no second pool competing for the cores); num_threads() is given
 * per region rather than through omp_set_num_threads(), which would change torch's setting too.
 * Several jobs (the products of one x with wq, wk and wv, or with w1 and w3) share one region: each
 * thread goes on to its part of the next weight without waiting for the others, which saves a
 * fork/join per weight and keeps the memory streams busy across the switch. */
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
    if (nt <= 1) {
        for (int i = 0; i < n; i++) jobs[i].fn(&jobs[i].c, 0, jobs[i].c.N);
        return;
    }
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
    {
        for (int i = 0; i < n; i++) {
            int64_t lo, hi;
            mc_share(jobs[i].c.N, 8, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
            if (lo < hi) jobs[i].fn(&jobs[i].c, lo, hi);
        }
    }
#else
    for (int i = 0; i < n; i++) jobs[i].fn(&jobs[i].c, 0, jobs[i].c.N);
#endif
}

static void mc_run(mc_rows_fn fn, const mc_ctx *c)
{
    mc_job job = {fn, *c};
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

/* ------------------------------------------------------------------------------------------------- */
/* Scalar paths (compiled when the compiler does not target AVX2+FMA).                               */
/* ------------------------------------------------------------------------------------------------- */

MC_MAYBE_UNUSED static void bf16_rows_scalar(const mc_ctx *c, int64_t lo, int64_t hi)
{
    const uint16_t *w = (const uint16_t *)c->w;
    for (int64_t n = lo; n < hi; n++)
        for (int t = 0; t < c->T; t++) {
            const float *x = c->x + t * c->K;
            float s = 0.f;
            for (int64_t k = 0; k < c->K; k++) s += bf16_to_f32(w[n * c->K + k]) * x[k];
            c->y[t * c->N + n] = s;
        }
}

MC_MAYBE_UNUSED static void int8_rows_scalar(const mc_ctx *c, int64_t lo, int64_t hi)
{
    const int8_t *w = (const int8_t *)c->w;
    for (int64_t n = lo; n < hi; n++)
        for (int t = 0; t < c->T; t++) {
            const float *x = c->x + t * c->K;
            float s = 0.f;
            for (int64_t k = 0; k < c->K; k++) s += (float)w[n * c->K + k] * x[k];
            c->y[t * c->N + n] = s * c->scale[n];
        }
}

MC_MAYBE_UNUSED static void int4_rows_scalar(const mc_ctx *c, int64_t lo, int64_t hi)
{
    const uint8_t *w = (const uint8_t *)c->w;
    int64_t K = c->K, ng = K / c->G;
    for (int64_t n = lo; n < hi; n++)
        for (int t = 0; t < c->T; t++) {
            const float *x = c->x + t * K;
            float s = 0.f;
            for (int64_t g = 0; g < ng; g++) {
                float d = 0.f, sx = 0.f;
                for (int64_t k = g * c->G; k < (g + 1) * c->G; k++) {
                    uint8_t b = w[n * (K / 2) + k / 2];
                    int q = (k & 1) ? (b >> 4) : (b & 15);
                    d += (float)(q - 8) * x[k];
                    sx += x[k];
                }
                s += c->scale[n * ng + g] * d + c->zero[n * ng + g] * sx;
            }
            c->y[t * c->N + n] = s;
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

/* ------------------------------------------------------------------------------------------------- */
/* bf16                                                                                              */
/* ------------------------------------------------------------------------------------------------- */
/* A 256-bit load is 16 bf16 = 8 dwords; `dword << 16` is the even element as fp32 and
 * `dword & 0xffff0000` the odd one: two cheap ALU ops per 16 weights, no cross-lane shuffles.
 * xp holds x in the matching order (per 16 columns: 8 even, then 8 odd). */

MC_INLINE void bf16_block(const mc_ctx *c, int64_t n0, int64_t k0, int64_t k1, const int R, const int T,
                          const int S, float (*part)[8])
{
    const int64_t K = c->K, K32 = K & ~(int64_t)31;
    const uint16_t *w = (const uint16_t *)c->w + n0 * K;
    const int64_t pf = MC_PF_OFFSET(R, 2 * K);
    const __m256i hi_mask = _mm256_set1_epi32((int)0xffff0000u);
    __m256 acc[4][4][8];
    MC_ZERO_ACC(acc, S, R, T);
    for (int64_t k = k0; k < k1; k += 32) {
        MC_UNROLL for (int r = 0; r < R; r++) if (MC_PF) MC_PREFETCH(w + r * K + k, pf);
        MC_UNROLL for (int h = 0; h < 2; h++) {
            __m256 we[4], wo[4];
            MC_UNROLL for (int r = 0; r < R; r++) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(w + r * K + k + 16 * h));
                MC_REG(v);
                we[r] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
                wo[r] = _mm256_castsi256_ps(_mm256_and_si256(v, hi_mask));
            }
            MC_UNROLL for (int t = 0; t < T; t++) {
                const float *xb = c->xp + t * K32 + k + 16 * h;
                __m256 xe = _mm256_load_ps(xb), xo = _mm256_load_ps(xb + 8);
                if (R > 1) {
                    MC_REG(xe);
                    MC_REG(xo);
                }
                MC_UNROLL for (int r = 0; r < R; r++) {
                    acc[(2 * h) % S][r][t] = _mm256_fmadd_ps(we[r], xe, acc[(2 * h) % S][r][t]);
                    acc[(2 * h + 1) % S][r][t] = _mm256_fmadd_ps(wo[r], xo, acc[(2 * h + 1) % S][r][t]);
                }
            }
        }
    }
    MC_FLUSH_ACC(acc, S, R, T, part);
}

MC_INLINE void bf16_epi(const mc_ctx *c, int64_t n, const int T, const float *part)
{
    const int64_t K = c->K;
    const uint16_t *w = (const uint16_t *)c->w + n * K;
    for (int t = 0; t < T; t++) {
        float s = part[t];
        for (int64_t k = K & ~(int64_t)31; k < K; k++) s += bf16_to_f32(w[k]) * c->x[t * K + k];
        c->y[t * c->N + n] = s;
    }
}

/* (R, S) per T: about 8 accumulator chains within the 16 ymm registers. */
MC_DRIVER(bf16_rows_t1, bf16_block, bf16_epi, c->K & ~(int64_t)31, MC_BF16_T1_R, 1, MC_BF16_T1_S)
MC_DRIVER(bf16_rows_t2, bf16_block, bf16_epi, c->K & ~(int64_t)31, 2, 2, 2)
MC_DRIVER(bf16_rows_t3, bf16_block, bf16_epi, c->K & ~(int64_t)31, 1, 3, 2)
MC_DRIVER(bf16_rows_t4, bf16_block, bf16_epi, c->K & ~(int64_t)31, 1, 4, 2)
MC_DRIVER(bf16_rows_t5, bf16_block, bf16_epi, c->K & ~(int64_t)31, 1, 5, 1)
MC_DRIVER(bf16_rows_t6, bf16_block, bf16_epi, c->K & ~(int64_t)31, 1, 6, 1)
MC_DRIVER(bf16_rows_t7, bf16_block, bf16_epi, c->K & ~(int64_t)31, 1, 7, 1)
MC_DRIVER(bf16_rows_t8, bf16_block, bf16_epi, c->K & ~(int64_t)31, 1, 8, 1)

static const mc_rows_fn bf16_fns[9] = {0, bf16_rows_t1, bf16_rows_t2, bf16_rows_t3, bf16_rows_t4,
                                       bf16_rows_t5, bf16_rows_t6, bf16_rows_t7, bf16_rows_t8};

static void prep_bf16(const float *x, int T, int64_t K, float *xp)
{
    const int64_t K32 = K & ~(int64_t)31;
    for (int t = 0; t < T; t++)
        for (int64_t b = 0; b < K32; b += 16) {
            __m256 a = _mm256_loadu_ps(x + t * K + b), bb = _mm256_loadu_ps(x + t * K + b + 8);
            /* shuffle_ps takes even/odd pairs per 128-bit lane; the 64-bit permute puts lanes in order */
            __m256 ev = _mm256_shuffle_ps(a, bb, 0x88), od = _mm256_shuffle_ps(a, bb, 0xdd);
            ev = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(ev), 0xd8));
            od = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(od), 0xd8));
            _mm256_store_ps(xp + t * K32 + b, ev);
            _mm256_store_ps(xp + t * K32 + b + 8, od);
        }
}

/* ------------------------------------------------------------------------------------------------- */
/* int8, fp32 activations                                                                            */
/* ------------------------------------------------------------------------------------------------- */
/* vpmovsxbd straight from memory + cvtdq2ps: exact. At T >= 3 the T FMAs per weight make it
 * FMA-bound (about 4 weights per cycle per core at T = 4), short of the read limit but still ahead of
 * torch; quantising x to use integer multiply-adds would be faster there but no longer exact. */

MC_INLINE void int8_block(const mc_ctx *c, int64_t n0, int64_t k0, int64_t k1, const int R, const int T,
                          const int S, float (*part)[8])
{
    const int64_t K = c->K;
    const int8_t *w = (const int8_t *)c->w + n0 * K;
    const int64_t pf = MC_PF_OFFSET(R, K);
    __m256 acc[4][2][8];
    MC_ZERO_ACC(acc, S, R, T);
    for (int64_t k = k0; k < k1; k += 32) {
        if (MC_PF && (k & 63) == 0) MC_UNROLL for (int r = 0; r < R; r++) MC_PREFETCH(w + r * K + k, pf);
        MC_UNROLL for (int u = 0; u < 4; u++) {
            __m256 wf[2];
            MC_UNROLL for (int r = 0; r < R; r++)
                wf[r] = _mm256_cvtepi32_ps(
                    _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + r * K + k + 8 * u))));
            MC_UNROLL for (int t = 0; t < T; t++) {
                __m256 xv = _mm256_loadu_ps(c->x + t * K + k + 8 * u);
                if (R > 1) MC_REG(xv);
                MC_UNROLL for (int r = 0; r < R; r++) acc[u % S][r][t] = _mm256_fmadd_ps(wf[r], xv, acc[u % S][r][t]);
            }
        }
    }
    MC_FLUSH_ACC(acc, S, R, T, part);
}

MC_INLINE void int8_epi(const mc_ctx *c, int64_t n, const int T, const float *part)
{
    const int64_t K = c->K;
    const int8_t *w = (const int8_t *)c->w + n * K;
    for (int t = 0; t < T; t++) {
        float s = part[t];
        for (int64_t k = K & ~(int64_t)31; k < K; k++) s += (float)w[k] * c->x[t * K + k];
        c->y[t * c->N + n] = s * c->scale[n];
    }
}

MC_DRIVER(int8_rows_t1, int8_block, int8_epi, c->K & ~(int64_t)31, 2, 1, 4)
MC_DRIVER(int8_rows_t2, int8_block, int8_epi, c->K & ~(int64_t)31, 2, 2, 2)
MC_DRIVER(int8_rows_t3, int8_block, int8_epi, c->K & ~(int64_t)31, 2, 3, 1)
MC_DRIVER(int8_rows_t4, int8_block, int8_epi, c->K & ~(int64_t)31, 2, 4, 1)
MC_DRIVER(int8_rows_t5, int8_block, int8_epi, c->K & ~(int64_t)31, 1, 5, 1)
MC_DRIVER(int8_rows_t6, int8_block, int8_epi, c->K & ~(int64_t)31, 1, 6, 1)
MC_DRIVER(int8_rows_t7, int8_block, int8_epi, c->K & ~(int64_t)31, 1, 7, 1)
MC_DRIVER(int8_rows_t8, int8_block, int8_epi, c->K & ~(int64_t)31, 1, 8, 1)

static const mc_rows_fn int8_fns[9] = {0, int8_rows_t1, int8_rows_t2, int8_rows_t3, int8_rows_t4,
                                       int8_rows_t5, int8_rows_t6, int8_rows_t7, int8_rows_t8};

/* ------------------------------------------------------------------------------------------------- */
/* int4 common: scale vectors and the zero-point epilogue                                            */
/* ------------------------------------------------------------------------------------------------- */
/* A 64-column block of int4 weights is one 32-byte load. For G >= 64 one scale covers the block; for
 * G = 32 lanes 0-3 of the block's results belong to its first group and lanes 4-7 to the second
 * (both kernels below arrange their lanes that way). */

MC_INLINE __m256 int4_scale_vec(const float *sc_row, int64_t k, const int GS)
{
    if (GS >= 64) return _mm256_set1_ps(sc_row[(uint64_t)k / GS]);
    return _mm256_setr_m128(_mm_set1_ps(sc_row[(uint64_t)k / 32]), _mm_set1_ps(sc_row[(uint64_t)k / 32 + 1]));
}

/* y = partial + sum_g (zero_g - 8 * scale_g) * sum_{k in g} x_k */
MC_INLINE void int4_epi(const mc_ctx *c, int64_t n, const int T, const float *part)
{
    const int64_t ng = c->K / c->G;
    const float *sc = c->scale + n * ng, *zp = c->zero + n * ng;
    for (int t = 0; t < T; t++) {
        const float *xs = c->xs + t * ng;
        __m256 z = _mm256_setzero_ps();
        int64_t g = 0;
        for (; g + 8 <= ng; g += 8) {
            __m256 off = _mm256_fnmadd_ps(_mm256_set1_ps(8.f), _mm256_loadu_ps(sc + g), _mm256_loadu_ps(zp + g));
            z = _mm256_fmadd_ps(off, _mm256_loadu_ps(xs + g), z);
        }
        float s = part[t] + hsum8(z);
        for (; g < ng; g++) s += (zp[g] - 8.f * sc[g]) * xs[g];
        c->y[t * c->N + n] = s;
    }
}

/* ------------------------------------------------------------------------------------------------- */
/* int4, fp32 activations (exact)                                                                    */
/* ------------------------------------------------------------------------------------------------- */
/* The 32 bytes of a 64-column block are 8 dwords of 8 nibbles: nibble j of dword i is column 8i + j.
 * Masking nibble j in place (`v & (0xf << 4j)`) and converting gives q * 16^j exactly, so no shift is
 * needed: the 16^-j goes into the prepared x instead (power-of-two scaling is exact). Nibble 7 would
 * reach the sign bit, so it is shifted down. One AND + one convert per 8 weights, and dword i -> lane
 * i keeps columns 0-31 in lanes 0-3 (the G = 32 layout above). */

MC_INLINE void int4_block(const mc_ctx *c, int64_t n0, int64_t k0, int64_t k1, const int R, const int T,
                          const int S, const int GS, float (*part)[8])
{
    const int64_t K = c->K, ng = K / GS;
    const int SPAN = GS >= 64 ? GS : 64;
    const uint8_t *w = (const uint8_t *)c->w + n0 * (K / 2);
    const int64_t pf = MC_PF_OFFSET(R, K / 2);
    __m256 y[1][2][4];
    MC_ZERO_ACC(y, 1, R, T);
    for (int64_t k = k0; k < k1; k += SPAN) {
        __m256 acc[4][2][4];
        MC_ZERO_ACC(acc, S, R, T);
        MC_UNROLL for (int b = 0; b < SPAN / 64; b++) {
            if (MC_PF && ((k + 64 * b) & 127) == 0)
                MC_UNROLL for (int r = 0; r < R; r++) MC_PREFETCH(w + r * (K / 2) + (k + 64 * b) / 2, pf);
            __m256i v[2];
            MC_UNROLL for (int r = 0; r < R; r++) {
                v[r] = _mm256_loadu_si256((const __m256i *)(w + r * (K / 2) + (k + 64 * b) / 2));
                MC_REG(v[r]);
            }
            MC_UNROLL for (int j = 0; j < 8; j++) {
                __m256 wf[2];
                MC_UNROLL for (int r = 0; r < R; r++)
                    wf[r] = _mm256_cvtepi32_ps(j == 7 ? _mm256_srli_epi32(v[r], 28)
                                                      : _mm256_and_si256(v[r], _mm256_set1_epi32(0xf << (4 * j))));
                MC_UNROLL for (int t = 0; t < T; t++) {
                    __m256 xv = _mm256_load_ps(c->xp + t * K + k + 64 * b + 8 * j);
                    if (R > 1) MC_REG(xv);
                    MC_UNROLL for (int r = 0; r < R; r++)
                        acc[(8 * b + j) % S][r][t] = _mm256_fmadd_ps(wf[r], xv, acc[(8 * b + j) % S][r][t]);
                }
            }
        }
        MC_UNROLL for (int r = 0; r < R; r++) {
            __m256 sv = int4_scale_vec(c->scale + (n0 + r) * ng, k, GS);
            MC_UNROLL for (int t = 0; t < T; t++) {
                __m256 a = acc[0][r][t];
                MC_UNROLL for (int s = 1; s < S; s++) a = _mm256_add_ps(a, acc[s][r][t]);
                y[0][r][t] = _mm256_fmadd_ps(a, sv, y[0][r][t]);
            }
        }
    }
    MC_FLUSH_ACC(y, 1, R, T, part);
}

#define MC_INT4_EX(GS)                                                                              \
    MC_INLINE void int4_block_g##GS(const mc_ctx *c, int64_t n0, int64_t k0, int64_t k1, const int R, \
                                    const int T, const int S, float (*part)[8])                     \
    {                                                                                               \
        int4_block(c, n0, k0, k1, R, T, S, GS, part);                                               \
    }                                                                                               \
    MC_DRIVER(int4_g##GS##_t1, int4_block_g##GS, int4_epi, c->K, 2, 1, 4)                           \
    MC_DRIVER(int4_g##GS##_t2, int4_block_g##GS, int4_epi, c->K, 1, 2, 4)                           \
    MC_DRIVER(int4_g##GS##_t3, int4_block_g##GS, int4_epi, c->K, 1, 3, 2)                           \
    MC_DRIVER(int4_g##GS##_t4, int4_block_g##GS, int4_epi, c->K, 1, 4, 2)

MC_INT4_EX(32)
MC_INT4_EX(64)
MC_INT4_EX(128)

static const mc_rows_fn int4_fns[3][5] = {
    {0, int4_g32_t1, int4_g32_t2, int4_g32_t3, int4_g32_t4},
    {0, int4_g64_t1, int4_g64_t2, int4_g64_t3, int4_g64_t4},
    {0, int4_g128_t1, int4_g128_t2, int4_g128_t3, int4_g128_t4},
};

/* Nibble order for x (see int4_block), times 16^-j; scalar, once per call. */
static void prep_int4(const float *x, int T, int64_t K, float *xp)
{
    for (int t = 0; t < T; t++)
        for (int64_t b = 0; b < K; b += 64)
            for (int j = 0; j < 8; j++) {
                float f = j == 7 ? 1.f : ldexpf(1.f, -4 * j);
                for (int i = 0; i < 8; i++) xp[t * K + b + 8 * j + i] = x[t * K + b + 8 * i + j] * f;
            }
}

/* ------------------------------------------------------------------------------------------------- */
/* int4, int8 activations (Q8 blocks of 32)                                                          */
/* ------------------------------------------------------------------------------------------------- */
/* 32 packed bytes (64 weights): `v & 0x0f` are the 32 even-column nibbles and `(v >> 4) & 0x0f` the 32
 * odd ones, as unsigned bytes, which is what vpmaddubsw wants for its unsigned operand; xq holds x as
 * int8 in the same even/odd order. Each 128-bit lane covers one 32-column block, so the int32 sums come
 * out as lanes 0-3 = first block and 4-7 = second, and one vector of the two blocks' x scales (xd)
 * converts them. Per 64 weights and token: 2 maddubs, add, madd, cvt, mul, fma. */

/* One 64-column block of R rows x T tokens into y[u]. */
MC_INLINE void int4q8_step(const mc_ctx *c, const uint8_t *w, int64_t n0, int64_t k, const int R, const int T,
                           const int GS, __m256 (*y)[8])
{
    const int64_t K = c->K, ng = K / GS, nb = K / 64;
    const __m256i lo_mask = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    __m256i ql[4], qh[4];
    __m256 sv[4];
    MC_UNROLL for (int r = 0; r < R; r++) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(w + r * (K / 2) + k / 2));
        MC_REG(v);
        ql[r] = _mm256_and_si256(v, lo_mask);
        qh[r] = _mm256_and_si256(_mm256_srli_epi16(v, 4), lo_mask);
        sv[r] = int4_scale_vec(c->scale + (n0 + r) * ng, k, GS);
    }
    MC_UNROLL for (int t = 0; t < T; t++) {
        const int8_t *xb = c->xq + t * K + k;
        __m256i xl = _mm256_load_si256((const __m256i *)xb);
        __m256i xh = _mm256_load_si256((const __m256i *)(xb + 32));
        __m256 d = _mm256_load_ps(c->xd + (t * nb + (uint64_t)k / 64) * 8);
        if (R > 1) {
            MC_REG(xl);
            MC_REG(xh);
        }
        MC_UNROLL for (int r = 0; r < R; r++) {
            /* q <= 15, |x| <= 127: an int16 lane holds at most 2 * 2 * 15 * 127 = 7620. */
            __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(ql[r], xl), _mm256_maddubs_epi16(qh[r], xh));
            __m256 f = _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones));
            y[r][t] = _mm256_fmadd_ps(f, _mm256_mul_ps(d, sv[r]), y[r][t]);
        }
    }
}

/* G = 128: x has one scale per group (prep_q8), so the four maddubs of a group's two 64-column halves add
 * up in int16 (|sum| <= 4 * 2 * 15 * 127 = 15240) and one madd, convert and FMA with the group's scale
 * serve 128 weights: 11 ops per 128 weights and token instead of 14. */
MC_INLINE void int4q8_step128(const mc_ctx *c, const uint8_t *w, int64_t n0, int64_t k, const int R, const int T,
                              __m256 (*y)[8])
{
    const int64_t K = c->K, ng = K / 128;
    const __m256i lo_mask = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    __m256i ql[4][2], qh[4][2];
    __m256 sv[4];
    MC_UNROLL for (int r = 0; r < R; r++) {
        MC_UNROLL for (int h = 0; h < 2; h++) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(w + r * (K / 2) + k / 2 + 32 * h));
            MC_REG(v);
            ql[r][h] = _mm256_and_si256(v, lo_mask);
            qh[r][h] = _mm256_and_si256(_mm256_srli_epi16(v, 4), lo_mask);
        }
        sv[r] = _mm256_set1_ps(c->scale[(n0 + r) * ng + (uint64_t)k / 128]);
    }
    MC_UNROLL for (int t = 0; t < T; t++) {
        const int8_t *xb = c->xq + t * K + k;
        __m256i x0 = _mm256_load_si256((const __m256i *)xb), x1 = _mm256_load_si256((const __m256i *)(xb + 32));
        __m256i x2 = _mm256_load_si256((const __m256i *)(xb + 64)), x3 = _mm256_load_si256((const __m256i *)(xb + 96));
        __m256 d = _mm256_set1_ps(c->xd[t * ng + (uint64_t)k / 128]);
        MC_UNROLL for (int r = 0; r < R; r++) {
            __m256i p = _mm256_add_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(ql[r][0], x0), _mm256_maddubs_epi16(qh[r][0], x1)),
                                         _mm256_add_epi16(_mm256_maddubs_epi16(ql[r][1], x2), _mm256_maddubs_epi16(qh[r][1], x3)));
            __m256 f = _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones));
            y[r][t] = _mm256_fmadd_ps(f, _mm256_mul_ps(d, sv[r]), y[r][t]);
        }
    }
}

/* S steps per iteration into S accumulator sets, so consecutive steps do not wait on each other. A step is
 * 64 columns (int4q8_step), or a whole group of 128 for G = 128 (int4q8_step128). */
MC_INLINE void int4q8_block(const mc_ctx *c, int64_t n0, int64_t k0, int64_t k1, const int R, const int T,
                            const int S, const int GS, float (*part)[8])
{
    const int64_t K = c->K, W = GS == 128 ? 128 : 64;
    const uint8_t *w = (const uint8_t *)c->w + n0 * (K / 2);
    const int64_t pf = MC_PF_OFFSET(R, K / 2);
    __m256 y[2][4][8];
    MC_ZERO_ACC(y, S, R, T);
    int64_t k = k0;
    for (; k + W * S <= k1; k += W * S) {
        /* one 64-byte line per row and 128 columns */
        if (MC_PF) MC_UNROLL for (int64_t kk = k; kk < k + W * S; kk += 64) if ((kk & 127) == 0)
            MC_UNROLL for (int r = 0; r < R; r++) MC_PREFETCH(w + r * (K / 2) + kk / 2, pf);
        MC_UNROLL for (int u = 0; u < S; u++) {
            if (GS == 128) int4q8_step128(c, w, n0, k + W * u, R, T, y[u]);
            else int4q8_step(c, w, n0, k + W * u, R, T, GS, y[u]);
        }
    }
    for (; k < k1; k += W) {
        if (GS == 128) int4q8_step128(c, w, n0, k, R, T, y[0]);
        else int4q8_step(c, w, n0, k, R, T, GS, y[0]);
    }
    MC_FLUSH_ACC(y, S, R, T, part);
}

/* R1, S1: the one-token kernel's rows and accumulator splits. */
#define MC_INT4_Q8(GS, R1, S1)                                                                      \
    MC_INLINE void int4q8_block_g##GS(const mc_ctx *c, int64_t n0, int64_t k0, int64_t k1, const int R, \
                                      const int T, const int S, float (*part)[8])                   \
    {                                                                                               \
        int4q8_block(c, n0, k0, k1, R, T, S, GS, part);                                             \
    }                                                                                               \
    MC_DRIVER(int4q8_g##GS##_t1, int4q8_block_g##GS, int4_epi, c->K, R1, 1, S1)                     \
    MC_DRIVER(int4q8_g##GS##_t2, int4q8_block_g##GS, int4_epi, c->K, 2, 2, 1)                       \
    MC_DRIVER(int4q8_g##GS##_t3, int4q8_block_g##GS, int4_epi, c->K, 1, 3, 2)                       \
    MC_DRIVER(int4q8_g##GS##_t4, int4q8_block_g##GS, int4_epi, c->K, 1, 4, 2)                       \
    MC_DRIVER(int4q8_g##GS##_t5, int4q8_block_g##GS, int4_epi, c->K, 1, 5, 1)                       \
    MC_DRIVER(int4q8_g##GS##_t6, int4q8_block_g##GS, int4_epi, c->K, 1, 6, 1)                       \
    MC_DRIVER(int4q8_g##GS##_t7, int4q8_block_g##GS, int4_epi, c->K, 1, 7, 1)                       \
    MC_DRIVER(int4q8_g##GS##_t8, int4q8_block_g##GS, int4_epi, c->K, 1, 8, 1)

MC_INT4_Q8(32, MC_INT4_T1_R, MC_INT4_T1_S)
MC_INT4_Q8(64, MC_INT4_T1_R, MC_INT4_T1_S)
/* groups of 128 take one row at a time: two rows' eight unpacked vectors and their accumulators would
 * not fit in registers (measured 22-24 against 17-20 GB/s for R = 2) */
MC_INT4_Q8(128, 1, 2)

static const mc_rows_fn int4q8_fns[3][9] = {
    {0, int4q8_g32_t1, int4q8_g32_t2, int4q8_g32_t3, int4q8_g32_t4, int4q8_g32_t5, int4q8_g32_t6, int4q8_g32_t7,
     int4q8_g32_t8},
    {0, int4q8_g64_t1, int4q8_g64_t2, int4q8_g64_t3, int4q8_g64_t4, int4q8_g64_t5, int4q8_g64_t6, int4q8_g64_t7,
     int4q8_g64_t8},
    {0, int4q8_g128_t1, int4q8_g128_t2, int4q8_g128_t3, int4q8_g128_t4, int4q8_g128_t5, int4q8_g128_t6,
     int4q8_g128_t7, int4q8_g128_t8},
};

/* Round x to int8 per 32 columns (v = rint(x * 127 / amax), d = amax / 127), store it in the order the
 * kernel reads (per 64 columns: 32 even, then 32 odd), the block scales as 8-lane vectors, and the
 * per-group sums of the rounded x (v * d), so the only error is x's own rounding. */
static void prep_q8(const float *x, int T, int64_t K, int G, int8_t *xq, float *xd, float *xs)
{
    const int64_t nb64 = K / 64, ng = K / G;
    /* G = 128: one x scale per group (xd is then one float per token and group, [T, K/128]), so the
     * kernel can add a whole group's integer products before converting (see int4q8_step128) */
    const int per = G == 128 ? 4 : 1; /* 32-column blocks per x scale */
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    /* per 128-bit lane: even bytes first, then odd */
    const __m256i eo = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                        0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    for (int t = 0; t < T; t++) {
        const float *xr = x + t * K;
        float gsum = 0.f;
        float amax = 0.f, d = 0.f, inv = 0.f;
        for (int64_t b = 0; b < K / 32; b++) {
            __m256 v[4];
            if (b % per == 0) {
                __m256 m = _mm256_setzero_ps();
                for (int i = 0; i < 4 * per; i++) m = _mm256_max_ps(m, _mm256_and_ps(_mm256_loadu_ps(xr + 32 * b + 8 * i),
                                                                                   absmask));
                __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
                m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
                m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
                amax = _mm_cvtss_f32(m4);
                d = amax / 127.f;
                inv = amax > 0.f ? 127.f / amax : 0.f;
                if (per > 1) xd[t * (K / 128) + b / per] = d;
            }
            for (int i = 0; i < 4; i++) v[i] = _mm256_loadu_ps(xr + 32 * b + 8 * i);
            __m256i iv[4];
            __m256i isum = _mm256_setzero_si256();
            for (int i = 0; i < 4; i++) {
                iv[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], _mm256_set1_ps(inv)));
                isum = _mm256_add_epi32(isum, iv[i]);
            }
            /* pack 32 int32 -> 32 int8 in column order (packs interleave lanes; permutes undo it) */
            __m256i p01 = _mm256_permute4x64_epi64(_mm256_packs_epi32(iv[0], iv[1]), 0xd8);
            __m256i p23 = _mm256_permute4x64_epi64(_mm256_packs_epi32(iv[2], iv[3]), 0xd8);
            __m256i q = _mm256_permute4x64_epi64(_mm256_packs_epi16(p01, p23), 0xd8);
            /* -> [16 even | 16 odd] */
            q = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(q, eo), 0xd8);
            int8_t *dst = xq + t * K + (b / 2) * 64 + 16 * (b % 2);
            _mm_store_si128((__m128i *)dst, _mm256_castsi256_si128(q));
            _mm_store_si128((__m128i *)(dst + 32), _mm256_extracti128_si256(q, 1));
            if (per == 1) {
                float *dv = xd + (t * nb64 + b / 2) * 8 + 4 * (b % 2);
                dv[0] = dv[1] = dv[2] = dv[3] = d;
            }
            __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(isum), _mm256_extracti128_si256(isum, 1));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
            gsum += (float)_mm_cvtsi128_si32(s4) * d;
            if ((32 * (b + 1)) % G == 0) {
                xs[t * ng + (32 * b) / G] = gsum;
                gsum = 0.f;
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------------- */
/* int8, int8 activations (Q8 blocks of 32)                                                          */
/* ------------------------------------------------------------------------------------------------- */
/* With fp32 activations each 8 int8 weights cost a widening load, a convert and an FMA: about 4
 * weights per cycle, under the read limit once both cores stream. Rounding x to int8 per 32 columns
 * (llama.cpp's Q8_0 x Q8_0) makes 32 weights cost sign, maddubs, madd, convert and one FMA with the
 * block's x scale. vpmaddubsw multiplies unsigned by signed bytes, so |q| goes in as the unsigned
 * operand and x takes q's sign (vpsignb); |q|, |x| <= 127 keep each int16 pair sum <= 32258. */

MC_INLINE void int8q8_step(const mc_ctx *c, const int8_t *w, int64_t k, const int R, const int T, __m256 (*y)[8])
{
    const int64_t K = c->K, nb = K / 32;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i wq[4], wa[4];
    MC_UNROLL for (int r = 0; r < R; r++) {
        wq[r] = _mm256_loadu_si256((const __m256i *)(w + r * K + k));
        MC_REG(wq[r]);
        wa[r] = _mm256_abs_epi8(wq[r]);
    }
    MC_UNROLL for (int t = 0; t < T; t++) {
        __m256i xv = _mm256_load_si256((const __m256i *)(c->xq + t * K + k));
        __m256 d = _mm256_set1_ps(c->xd[t * nb + k / 32]);
        if (R > 1) MC_REG(xv);
        MC_UNROLL for (int r = 0; r < R; r++) {
            __m256i p = _mm256_maddubs_epi16(wa[r], _mm256_sign_epi8(xv, wq[r]));
            y[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones)), d, y[r][t]);
        }
    }
}

MC_INLINE void int8q8_block(const mc_ctx *c, int64_t n0, int64_t k0, int64_t k1, const int R, const int T,
                            const int S, float (*part)[8])
{
    const int64_t K = c->K;
    const int8_t *w = (const int8_t *)c->w + n0 * K;
    const int64_t pf = MC_PF_OFFSET(R, K);
    __m256 y[4][4][8];
    MC_ZERO_ACC(y, S, R, T);
    int64_t k = k0;
    for (; k + 32 * S <= k1; k += 32 * S) {
        MC_UNROLL for (int u = 0; u < S; u++) {
            if (MC_PF && ((k + 32 * u) & 63) == 0) MC_UNROLL for (int r = 0; r < R; r++) MC_PREFETCH(w + r * K + k + 32 * u, pf);
            int8q8_step(c, w, k + 32 * u, R, T, y[u]);
        }
    }
    for (; k < k1; k += 32) int8q8_step(c, w, k, R, T, y[0]);
    MC_FLUSH_ACC(y, S, R, T, part);
}

MC_INLINE void int8q8_epi(const mc_ctx *c, int64_t n, const int T, const float *part)
{
    for (int t = 0; t < T; t++) c->y[t * c->N + n] = part[t] * c->scale[n];
}

MC_DRIVER(int8q8_t1, int8q8_block, int8q8_epi, c->K, MC_INT8_T1_R, 1, MC_INT8_T1_S)
MC_DRIVER(int8q8_t2, int8q8_block, int8q8_epi, c->K, 2, 2, 2)
MC_DRIVER(int8q8_t3, int8q8_block, int8q8_epi, c->K, 2, 3, 1)
MC_DRIVER(int8q8_t4, int8q8_block, int8q8_epi, c->K, 2, 4, 1)
MC_DRIVER(int8q8_t5, int8q8_block, int8q8_epi, c->K, 1, 5, 1)
MC_DRIVER(int8q8_t6, int8q8_block, int8q8_epi, c->K, 1, 6, 1)
MC_DRIVER(int8q8_t7, int8q8_block, int8q8_epi, c->K, 1, 7, 1)
MC_DRIVER(int8q8_t8, int8q8_block, int8q8_epi, c->K, 1, 8, 1)

static const mc_rows_fn int8q8_fns[9] = {0, int8q8_t1, int8q8_t2, int8q8_t3, int8q8_t4,
                                         int8q8_t5, int8q8_t6, int8q8_t7, int8q8_t8};

/* x rounded to int8 per 32 columns in its own column order, and one scale per block: [T, K/32]. */
static void prep_q8_plain(const float *x, int T, int64_t K, int8_t *xq, float *xd)
{
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int64_t b = 0; b < (int64_t)T * (K / 32); b++) {
        const float *xr = x + 32 * b;
        __m256 v[4];
        __m256 m = _mm256_setzero_ps();
        for (int i = 0; i < 4; i++) {
            v[i] = _mm256_loadu_ps(xr + 8 * i);
            m = _mm256_max_ps(m, _mm256_and_ps(v[i], absmask));
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        float amax = _mm_cvtss_f32(m4), inv = amax > 0.f ? 127.f / amax : 0.f;
        __m256i iv[4];
        for (int i = 0; i < 4; i++) iv[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], _mm256_set1_ps(inv)));
        __m256i p01 = _mm256_permute4x64_epi64(_mm256_packs_epi32(iv[0], iv[1]), 0xd8);
        __m256i p23 = _mm256_permute4x64_epi64(_mm256_packs_epi32(iv[2], iv[3]), 0xd8);
        _mm256_store_si256((__m256i *)(xq + 32 * b), _mm256_permute4x64_epi64(_mm256_packs_epi16(p01, p23), 0xd8));
        xd[b] = amax / 127.f;
    }
}

#endif /* MC_AVX2 */

/* ------------------------------------------------------------------------------------------------- */
/* GEMM: many rows of x (prefill)                                                                    */
/* ------------------------------------------------------------------------------------------------- */
/* With T rows of x each weight is used T times, so past a dozen rows the product is bound by FMAs, not
 * by reading weights, and what counts is keeping both FMA pipes busy. That is the classic register-tile
 * scheme: y[6 tokens][16 outputs] lives in 12 ymm registers; per k, two loads of 16 fp32 weights and six
 * broadcasts of x feed 12 FMAs. The weights must then be fp32 and k-major (16 outputs of one k side by
 * side), so each 16-row x MC_KB-column block is converted from its stored format (bf16, int8 + scale,
 * int4 + group scale/zero: dequantized exactly as the torch reference does) into a 16 KiB L1 buffer by
 * an 8x8 transpose, then reused for all T rows of x. Converting costs a few ops per weight against 2T
 * FLOPs, so int8/int4 prefill runs as fast as bf16 without ever materialising an fp32 copy of a weight.
 * K is walked in MC_KB blocks in the outer loop so the x block (T x MC_KB fp32, <= 256 KiB) stays in
 * L2 while every output block of this thread passes over it; y tiles are re-read per K block (from L2/
 * L3, cheap next to the FMAs). Threads split the outputs in 16-row units. x is first copied into panels
 * of MC_MR rows, k-major ([T/MC_MR][K][MC_MR]), so the six broadcasts of a k read one 24-byte run instead
 * of six rows K * 4 bytes apart (which for K a multiple of 1024 all fall in one L1 set). */

#define MC_KB 256
#define MC_MR 6
#define MC_NR 16

static int g_gemm_min_rows = 12;
MC_API void mc_set_gemm_min_rows(int n) { g_gemm_min_rows = n < 1 ? 1 : n; }
MC_API int mc_get_gemm_min_rows(void) { return g_gemm_min_rows; }

#if MC_AVX2

/* ------------------------------------------------------------------------------------------------- */
/* bf16 stored transposed, few rows of x                                                             */
/* ------------------------------------------------------------------------------------------------- */
/* s is [K, N] (the torrent layout's expert w2), so y[t] = sum_k x[t][k] * s[k] is a sum of scaled rows
 * of s. Each thread owns a range of columns and walks it in blocks of MC_TB: the T partial rows of a
 * block stay in L1 while s is streamed row by row over the block (MC_TB * 2 contiguous bytes per row,
 * long enough for the hardware prefetchers). Two rows of s per pass halve the accumulator traffic. */

#define MC_TB 1024

MC_INLINE void bf16t_cols(const uint16_t *s0, const uint16_t *s1, const float *xk0, const float *xk1, float *acc,
                          int cols, const int T)
{
    __m256 a0[8], a1[8];
    MC_UNROLL for (int t = 0; t < T; t++) {
        a0[t] = _mm256_set1_ps(xk0[t]);
        a1[t] = _mm256_set1_ps(xk1[t]);
    }
    int j = 0;
    for (; j + 8 <= cols; j += 8) {
        __m256 w0 = _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(s0 + j))), 16));
        __m256 w1 = _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(s1 + j))), 16));
        MC_UNROLL for (int t = 0; t < T; t++) {
            float *p = acc + t * MC_TB + j;
            _mm256_store_ps(p, _mm256_fmadd_ps(a1[t], w1, _mm256_fmadd_ps(a0[t], w0, _mm256_load_ps(p))));
        }
    }
    for (; j < cols; j++)
        for (int t = 0; t < T; t++) acc[t * MC_TB + j] += xk0[t] * bf16_to_f32(s0[j]) + xk1[t] * bf16_to_f32(s1[j]);
}

MC_INLINE void bf16t_rows(const mc_ctx *c, int64_t lo, int64_t hi, const int T)
{
    const uint16_t *s = (const uint16_t *)c->w;
    const int64_t K = c->K, N = c->N;
    float acc[8 * MC_TB] __attribute__((aligned(64)));
    float xk[2][8];
    for (int64_t nb = lo; nb < hi; nb += MC_TB) {
        int cols = hi - nb < MC_TB ? (int)(hi - nb) : MC_TB;
        for (int t = 0; t < T; t++) memset(acc + t * MC_TB, 0, cols * sizeof(float));
        int64_t k = 0;
        for (; k + 2 <= K; k += 2) {
            for (int t = 0; t < T; t++) {
                xk[0][t] = c->x[t * K + k];
                xk[1][t] = c->x[t * K + k + 1];
            }
            if (MC_PF) {
                MC_PREFETCH(s + (k + 8) * N + nb, 0);
                MC_PREFETCH(s + (k + 9) * N + nb, 0);
            }
            bf16t_cols(s + k * N + nb, s + (k + 1) * N + nb, xk[0], xk[1], acc, cols, T);
        }
        if (k < K) {
            for (int t = 0; t < T; t++) {
                xk[0][t] = c->x[t * K + k];
                xk[1][t] = 0.f;
            }
            bf16t_cols(s + k * N + nb, s + k * N + nb, xk[0], xk[1], acc, cols, T);
        }
        for (int t = 0; t < T; t++) memcpy(c->y + t * N + nb, acc + t * MC_TB, cols * sizeof(float));
    }
}

/* Decode (T <= 8, several threads): the threads split K instead, so each streams one contiguous range of
 * whole rows of s (the column split above reads MC_TB * 2-byte runs at an N * 2-byte stride, which the
 * prefetchers follow at about half the read rate). Each thread adds 4 rows at a time into its own fp32
 * partial y[T, N] (16 KiB per token for N = 4096: L1 for T = 1); the partials are summed at the end. */
MC_INLINE void bf16t_krange(const uint16_t *s, const float *x, int64_t K, int64_t N, int64_t k0, int64_t k1,
                            float *acc, const int T)
{
    memset(acc, 0, (size_t)T * (size_t)N * sizeof(float));
    int64_t k = k0;
    for (; k + 4 <= k1; k += 4) {
        __m256 a[4][8];
        MC_UNROLL for (int r = 0; r < 4; r++) MC_UNROLL for (int t = 0; t < T; t++) a[r][t] = _mm256_set1_ps(x[t * K + k + r]);
        const uint16_t *s0 = s + k * N;
        int64_t j = 0;
        for (; j + 8 <= N; j += 8) {
            __m256 w[4];
            MC_UNROLL for (int r = 0; r < 4; r++) {
                if (MC_PF && (j & 31) == 0) MC_PREFETCH(s0 + r * N + j, MC_PF);
                w[r] = _mm256_castsi256_ps(
                    _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(s0 + r * N + j))), 16));
            }
            MC_UNROLL for (int t = 0; t < T; t++) {
                float *p = acc + t * N + j;
                __m256 v = _mm256_fmadd_ps(a[0][t], w[0], _mm256_loadu_ps(p));
                v = _mm256_fmadd_ps(a[1][t], w[1], v);
                v = _mm256_fmadd_ps(a[2][t], w[2], v);
                _mm256_storeu_ps(p, _mm256_fmadd_ps(a[3][t], w[3], v));
            }
        }
        for (; j < N; j++)
            for (int t = 0; t < T; t++)
                for (int r = 0; r < 4; r++) acc[t * N + j] += x[t * K + k + r] * bf16_to_f32(s0[r * N + j]);
    }
    for (; k < k1; k++)
        for (int t = 0; t < T; t++)
            for (int64_t j = 0; j < N; j++) acc[t * N + j] += x[t * K + k] * bf16_to_f32(s[k * N + j]);
}

#define MC_BF16TK(T)                                                                                  \
    static void bf16t_krange_t##T(const uint16_t *s, const float *x, int64_t K, int64_t N, int64_t k0,  \
                                  int64_t k1, float *acc) { bf16t_krange(s, x, K, N, k0, k1, acc, T); }
MC_BF16TK(1)
MC_BF16TK(2)
MC_BF16TK(3)
MC_BF16TK(4)
MC_BF16TK(5)
MC_BF16TK(6)
MC_BF16TK(7)
MC_BF16TK(8)

typedef void (*mc_krange_fn)(const uint16_t *, const float *, int64_t, int64_t, int64_t, int64_t, float *);
static const mc_krange_fn bf16tk_fns[9] = {0, bf16t_krange_t1, bf16t_krange_t2, bf16t_krange_t3, bf16t_krange_t4,
                                           bf16t_krange_t5, bf16t_krange_t6, bf16t_krange_t7, bf16t_krange_t8};

/* y[T, N] = x[T, K] s[K, N] with the threads splitting K (see bf16t_krange). Returns 0 when it ran. */
static int bf16t_ksplit(const float *x, int T, int64_t K, const uint16_t *s, int64_t N, float *y)
{
#ifdef _OPENMP
    int nt = g_threads;
    if (nt > K / 64) nt = (int)(K / 64);
    if (nt < 2 || K * N < 65536) return MC_EBADARG;
    /* Thread 0 adds into y itself; the others into their own slice of the scratch. */
    float *part = (float *)mc_scratch((size_t)(nt - 1) * (size_t)T * (size_t)N * sizeof(float));
    if (!part) return MC_ENOMEM;
    const int64_t TN = (int64_t)T * N;
#pragma omp parallel num_threads(nt)
    {
        int tid = omp_get_thread_num(), n_th = omp_get_num_threads();
        int64_t k0, k1;
        mc_share(K, 4, tid, n_th, &k0, &k1);
        float *acc = tid == 0 ? y : part + (int64_t)(tid - 1) * TN;
        if (k0 < k1) bf16tk_fns[T](s, x, K, N, k0, k1, acc);
        else memset(acc, 0, (size_t)TN * sizeof(float));
#pragma omp barrier
        int64_t lo, hi;
        mc_share(TN, 64, tid, n_th, &lo, &hi);
        for (int i = 1; i < n_th; i++) {
            const float *src = part + (int64_t)(i - 1) * TN;
            for (int64_t j = lo; j < hi; j++) y[j] += src[j];
        }
    }
    return 0;
#else
    (void)x; (void)T; (void)K; (void)s; (void)N; (void)y;
    return MC_EBADARG;
#endif
}

#define MC_BF16T(T)                                                                                   \
    static void bf16t_rows_t##T(const mc_ctx *c, int64_t lo, int64_t hi) { bf16t_rows(c, lo, hi, T); }
MC_BF16T(1)
MC_BF16T(2)
MC_BF16T(3)
MC_BF16T(4)
MC_BF16T(5)
MC_BF16T(6)
MC_BF16T(7)
MC_BF16T(8)

static const mc_rows_fn bf16t_fns[9] = {0, bf16t_rows_t1, bf16t_rows_t2, bf16t_rows_t3, bf16t_rows_t4,
                                        bf16t_rows_t5, bf16t_rows_t6, bf16t_rows_t7, bf16t_rows_t8};

/* r[i] <- column i of the 8x8 block whose rows are r[0..7]. */
MC_INLINE void transpose8(__m256 r[8])
{
    __m256 t[8], s[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int h = 0; h < 2; h++) {
        s[4 * h + 0] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], _MM_SHUFFLE(1, 0, 1, 0));
        s[4 * h + 1] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], _MM_SHUFFLE(3, 2, 3, 2));
        s[4 * h + 2] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], _MM_SHUFFLE(1, 0, 1, 0));
        s[4 * h + 3] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x20);
        r[i + 4] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x31);
    }
}

/* Eight consecutive weights (columns k..k+7) of row n as fp32, in each stored format. */
MC_INLINE __m256 row8_bf16(const mc_ctx *c, int64_t n, int64_t k)
{
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)c->w + n * c->K + k));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

MC_INLINE __m256 row8_int8(const mc_ctx *c, int64_t n, int64_t k)
{
    __m128i b = _mm_loadl_epi64((const __m128i *)((const int8_t *)c->w + n * c->K + k));
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), _mm256_set1_ps(c->scale[n]));
}

MC_INLINE __m256 row8_int4(const mc_ctx *c, int64_t n, int64_t k)
{
    int32_t word;
    memcpy(&word, (const uint8_t *)c->w + n * (c->K / 2) + k / 2, 4);
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    __m256i q = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(word), shifts), _mm256_set1_epi32(15));
    int64_t g = n * (c->K / c->G) + k / c->G;
    __m256 f = _mm256_sub_ps(_mm256_cvtepi32_ps(q), _mm256_set1_ps(8.f));
    /* (q - 8) * scale + zero, rounded as dequantize_int4 rounds it (mul, then add) */
    return _mm256_add_ps(_mm256_mul_ps(f, _mm256_set1_ps(c->scale[g])), _mm256_set1_ps(c->zero[g]));
}

/* bp[k][0..15] = fp32 weights of rows n0..n0+15 (rows >= N are zero), columns k0..k0+kc-1 (kc % 8 == 0). */
#define MC_PACK(NAME, ROW8)                                                                          \
    static void NAME(const mc_ctx *c, int64_t n0, int64_t k0, int kc, float *bp)                    \
    {                                                                                               \
        for (int h = 0; h < 2; h++) {                                                               \
            int64_t nb = n0 + 8 * h;                                                                \
            int rows = c->N - nb >= 8 ? 8 : (int)(c->N - nb > 0 ? c->N - nb : 0);                   \
            for (int k = 0; k < kc; k += 8) {                                                       \
                __m256 r[8];                                                                        \
                for (int i = 0; i < 8; i++) r[i] = i < rows ? ROW8(c, nb + i, k0 + k) : _mm256_setzero_ps(); \
                transpose8(r);                                                                      \
                for (int i = 0; i < 8; i++) _mm256_store_ps(bp + (k + i) * MC_NR + 8 * h, r[i]);    \
            }                                                                                       \
        }                                                                                           \
    }

MC_PACK(pack_bf16, row8_bf16)
MC_PACK(pack_int8, row8_int8)
MC_PACK(pack_int4, row8_int4)

/* The torrent release's expert w2 is stored transposed, s[K][N]: already k-major, so packing is only
 * the bf16 -> fp32 conversion. */
static void pack_bf16_t(const mc_ctx *c, int64_t n0, int64_t k0, int kc, float *bp)
{
    const uint16_t *s = (const uint16_t *)c->w;
    if (n0 + MC_NR <= c->N) {
        for (int k = 0; k < kc; k++) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(s + (k0 + k) * c->N + n0));
            __m256i lo = _mm256_cvtepu16_epi32(_mm256_castsi256_si128(v));
            __m256i hi = _mm256_cvtepu16_epi32(_mm256_extracti128_si256(v, 1));
            _mm256_store_ps(bp + k * MC_NR, _mm256_castsi256_ps(_mm256_slli_epi32(lo, 16)));
            _mm256_store_ps(bp + k * MC_NR + 8, _mm256_castsi256_ps(_mm256_slli_epi32(hi, 16)));
        }
        return;
    }
    for (int k = 0; k < kc; k++)
        for (int j = 0; j < MC_NR; j++)
            bp[k * MC_NR + j] = n0 + j < c->N ? bf16_to_f32(s[(k0 + k) * c->N + n0 + j]) : 0.f;
}

typedef void (*mc_pack_fn)(const mc_ctx *c, int64_t n0, int64_t k0, int kc, float *bp);

/* y[MR][16] (row stride ldy) = (first ? 0 : y) + x[MR][kc] (row stride ldx) * bp[kc][16]. */
MC_INLINE void gemm_tile(const float *x, const float *bp, int kc, float *y, int64_t ldy, int first, const int MR)
{
    __m256 acc[MC_MR][2];
    MC_UNROLL for (int t = 0; t < MR; t++) {
        acc[t][0] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(y + t * ldy);
        acc[t][1] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(y + t * ldy + 8);
    }
#pragma GCC unroll 4
    for (int k = 0; k < kc; k++) {
        __m256 b0 = _mm256_load_ps(bp + k * MC_NR), b1 = _mm256_load_ps(bp + k * MC_NR + 8);
        MC_REG(b0);
        MC_REG(b1);
        MC_UNROLL for (int t = 0; t < MR; t++) {
            __m256 a = _mm256_broadcast_ss(x + k * MC_MR + t);
            acc[t][0] = _mm256_fmadd_ps(a, b0, acc[t][0]);
            acc[t][1] = _mm256_fmadd_ps(a, b1, acc[t][1]);
        }
    }
    MC_UNROLL for (int t = 0; t < MR; t++) {
        _mm256_storeu_ps(y + t * ldy, acc[t][0]);
        _mm256_storeu_ps(y + t * ldy + 8, acc[t][1]);
    }
}

static void gemm_tile_any(const float *x, const float *bp, int kc, float *y, int64_t ldy, int first, int mr)
{
    switch (mr) {
    case 1: gemm_tile(x, bp, kc, y, ldy, first, 1); break;
    case 2: gemm_tile(x, bp, kc, y, ldy, first, 2); break;
    case 3: gemm_tile(x, bp, kc, y, ldy, first, 3); break;
    case 4: gemm_tile(x, bp, kc, y, ldy, first, 4); break;
    case 5: gemm_tile(x, bp, kc, y, ldy, first, 5); break;
    default: gemm_tile(x, bp, kc, y, ldy, first, 6); break;
    }
}

/* Outputs [lo, hi) of y = x w^T for one thread; lo is a multiple of 16. */
static void gemm_rows(const mc_ctx *c, mc_pack_fn pack, int64_t lo, int64_t hi)
{
    float bp[MC_KB * MC_NR] __attribute__((aligned(64)));
    float edge[MC_MR * MC_NR];
    const int64_t K = c->K, N = c->N;
    for (int64_t k0 = 0; k0 < K; k0 += MC_KB) {
        int kc = K - k0 < MC_KB ? (int)(K - k0) : MC_KB, first = k0 == 0;
        for (int64_t n0 = lo; n0 < hi; n0 += MC_NR) {
            pack(c, n0, k0, kc, bp);
            int cols = N - n0 < MC_NR ? (int)(N - n0) : MC_NR;
            for (int t0 = 0; t0 < c->T; t0 += MC_MR) {
                int mr = c->T - t0 < MC_MR ? c->T - t0 : MC_MR;
                const float *xb = c->xp + (t0 / MC_MR) * K * MC_MR + k0 * MC_MR; /* x's panel, from k0 */
                float *yb = c->y + t0 * N + n0;
                if (cols == MC_NR) {
                    gemm_tile_any(xb, bp, kc, yb, N, first, mr);
                    continue;
                }
                /* last, partial block of outputs: through a full-width tile */
                for (int t = 0; t < mr; t++)
                    for (int j = 0; j < MC_NR; j++) edge[t * MC_NR + j] = j < cols && !first ? yb[t * N + j] : 0.f;
                gemm_tile_any(xb, bp, kc, edge, MC_NR, first, mr);
                for (int t = 0; t < mr; t++) memcpy(yb + t * N, edge + t * MC_NR, cols * sizeof(float));
            }
        }
    }
}

static int gemm_run(const mc_ctx *cin, mc_pack_fn pack)
{
    const int64_t K = cin->K, panels = (cin->T + MC_MR - 1) / MC_MR;
    float *xp = (float *)mc_scratch((size_t)panels * (size_t)K * MC_MR * sizeof(float));
    if (!xp) return MC_ENOMEM;
    for (int64_t p = 0; p < panels; p++)
        for (int64_t k = 0; k < K; k++)
            for (int t = 0; t < MC_MR; t++) {
                int64_t row = p * MC_MR + t;
                xp[(p * K + k) * MC_MR + t] = row < cin->T ? cin->x[row * K + k] : 0.f;
            }
    mc_ctx cc = *cin;
    cc.xp = xp;
    const mc_ctx *c = &cc;
    int nt = g_threads;
    int64_t units = (c->N + MC_NR - 1) / MC_NR;
    if (nt > units) nt = (int)units;
    if (nt <= 1) {
        gemm_rows(c, pack, 0, c->N);
        return 0;
    }
#ifdef _OPENMP
#pragma omp parallel num_threads(nt)
    {
        int64_t lo, hi;
        mc_share(c->N, MC_NR, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
        if (lo < hi) gemm_rows(c, pack, lo, hi);
    }
#else
    gemm_rows(c, pack, 0, c->N);
#endif
    return 0;
}

MC_MAYBE_UNUSED static int group_index(int G) { return G == 32 ? 0 : G == 64 ? 1 : 2; }

/* The one-pass kernels for n weights that share x (kind 0: bf16; 1: int8 with Q8 x; 2: int4 with Q8 x):
 * x is taken in slices of up to 8 rows (4 for int4), each slice prepared once (reordered, or rounded to
 * int8) and run against every weight in one thread region (mc_run_jobs). The single-weight entry points
 * are the n = 1 case. */
static int one_pass(int kind, const float *x, int T, int64_t K, int n, const void *const *w,
                    const float *const *scale, const float *const *zero, int G, const int64_t *N, float *const *y)
{
    const int rows = 8;
    const int64_t K32 = K & ~(int64_t)31;
    mc_job jobs[MC_MULTI_MAX];
    for (int t0 = 0; t0 < T; t0 += rows) {
        int tt = T - t0 < rows ? T - t0 : rows;
        const float *xt = x + (int64_t)t0 * K;
        mc_ctx c = {.x = xt, .K = K, .KC = K, .T = tt, .G = G};
        mc_rows_fn fn;
        if (kind == 0) {
            float *xp = (float *)mc_scratch((size_t)tt * (size_t)(K32 > 0 ? K32 : 1) * sizeof(float));
            if (!xp) return MC_ENOMEM;
            prep_bf16(xt, tt, K, xp);
            c.xp = xp;
            c.KC = tt >= 3 ? mc_chunk(K32, 4.0 * tt) : (K32 > 0 ? K32 : 1);
            fn = bf16_fns[tt];
        } else {
            size_t q_bytes = ((size_t)tt * (size_t)K + 63) & ~(size_t)63;
            size_t xd_n = kind == 1 ? (size_t)tt * (size_t)(K / 32) : (size_t)tt * (size_t)(K / 64) * 8;
            size_t xs_n = kind == 2 ? (size_t)tt * (size_t)(K / G) : 0;
            char *buf = (char *)mc_scratch(q_bytes + (xd_n + xs_n) * sizeof(float));
            if (!buf) return MC_ENOMEM;
            int8_t *xq = (int8_t *)buf;
            float *xd = (float *)(buf + q_bytes), *xs = xd + xd_n;
            if (kind == 1) {
                prep_q8_plain(xt, tt, K, xq, xd);
                fn = int8q8_fns[tt];
            } else {
                prep_q8(xt, tt, K, G, xq, xd, xs);
                c.xs = xs;
                fn = int4q8_fns[group_index(G)][tt];
            }
            c.xq = xq;
            c.xd = xd;
        }
        for (int i = 0; i < n; i++) {
            jobs[i] = (mc_job){fn, c};
            jobs[i].c.w = w[i];
            jobs[i].c.N = N[i];
            /* the kernels index y[t * N + n]: a slice of rows of x is a slice of rows of y */
            jobs[i].c.y = y[i] + (int64_t)t0 * N[i];
            if (kind >= 1) jobs[i].c.scale = scale[i];
            if (kind == 2) jobs[i].c.zero = zero[i];
        }
        mc_run_jobs(jobs, n);
    }
    return 0;
}

#endif /* MC_AVX2 */

/* ------------------------------------------------------------------------------------------------- */
/* Entry points. Return 0 on success, a negative code on bad arguments or allocation failure.        */
/* ------------------------------------------------------------------------------------------------- */

MC_API int mc_linear_bf16(const float *x, int T, int64_t K, const uint16_t *w, int64_t N, float *y)
{
    if (T < 1 || K < 1 || N < 1) return MC_EBADARG;
#if MC_AVX2
    if (T >= g_gemm_min_rows && K % 8 == 0) {
        mc_ctx c = {.x = x, .w = w, .y = y, .N = N, .K = K, .T = T};
        return gemm_run(&c, pack_bf16);
    }
    const void *wv = w;
    return one_pass(0, x, T, K, 1, &wv, NULL, NULL, 0, &N, &y);
#else
    mc_ctx c = {.x = x, .w = w, .y = y, .N = N, .K = K, .T = T};
    mc_run(bf16_rows_scalar, &c);
#endif
    return 0;
}

MC_API int mc_linear_int8(const float *x, int T, int64_t K, const int8_t *q, const float *scale, int64_t N, float *y)
{
    if (T < 1 || K < 1 || N < 1) return MC_EBADARG;
#if MC_AVX2
    if (T >= g_gemm_min_rows && K % 8 == 0) {
        mc_ctx c = {.x = x, .w = q, .scale = scale, .y = y, .N = N, .K = K, .T = T};
        return gemm_run(&c, pack_int8);
    }
    for (int t0 = 0; t0 < T; t0 += 8) {
        int tt = T - t0 < 8 ? T - t0 : 8;
        mc_ctx c = {.x = x + (int64_t)t0 * K, .w = q, .scale = scale, .y = y + (int64_t)t0 * N, .N = N, .K = K,
                    .KC = (K & ~(int64_t)31) > 0 ? (K & ~(int64_t)31) : 1, .T = tt};
        mc_run(int8_fns[tt], &c);
    }
#else
    mc_ctx c = {.x = x, .w = q, .scale = scale, .y = y, .N = N, .K = K, .T = T};
    mc_run(int8_rows_scalar, &c);
#endif
    return 0;
}

/* The scalar twin of prep_q8*: x rounded to int8 per 32 values and scaled back (same arithmetic). */
MC_MAYBE_UNUSED static void round_q8(const float *x, int64_t n, int block, float *xr)
{
    for (int64_t b = 0; b < n; b += block) {
        float amax = 0.f;
        for (int i = 0; i < block; i++) amax = fmaxf(amax, fabsf(x[b + i]));
        float d = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
        for (int i = 0; i < block; i++) xr[b + i] = rintf(x[b + i] * inv) * d;
    }
}

/* Like mc_linear_int8, but x rounded to int8 per 32 columns (see int8q8_step) when that is what makes
 * it faster: for fewer than the GEMM's rows and K % 32 == 0. Otherwise it is mc_linear_int8. */
MC_API int mc_linear_int8_q8(const float *x, int T, int64_t K, const int8_t *q, const float *scale, int64_t N,
                             float *y)
{
    if (T < 1 || K < 1 || N < 1) return MC_EBADARG;
    if (T >= g_gemm_min_rows || K % 32) return mc_linear_int8(x, T, K, q, scale, N, y);
#if MC_AVX2
    const void *wv = q;
    return one_pass(1, x, T, K, 1, &wv, &scale, NULL, 0, &N, &y);
#else
    float *xr = (float *)mc_scratch((size_t)T * (size_t)K * sizeof(float));
    if (!xr) return MC_ENOMEM;
    round_q8(x, (int64_t)T * K, 32, xr);
    return mc_linear_int8(xr, T, K, q, scale, N, y);
#endif
}

static int int4_args_ok(int T, int64_t K, int64_t N, int G)
{
    return T >= 1 && N >= 1 && K >= 64 && K % 64 == 0 && (G == 32 || G == 64 || G == 128) && K % G == 0;
}

MC_API int mc_linear_int4(const float *x, int T, int64_t K, const uint8_t *packed, const float *scale,
                          const float *zero, int G, int64_t N, float *y)
{
    if (!int4_args_ok(T, K, N, G)) return MC_EBADARG;
#if MC_AVX2
    if (T >= g_gemm_min_rows) { /* exact x: rounding it buys nothing once FMAs, not bytes, are the limit */
        mc_ctx c = {.x = x, .w = packed, .scale = scale, .zero = zero, .y = y, .N = N, .K = K, .T = T, .G = G};
        return gemm_run(&c, pack_int4);
    }
    const int64_t ng = K / G;
    for (int t0 = 0; t0 < T; t0 += 4) {
        int tt = T - t0 < 4 ? T - t0 : 4;
        size_t xp_n = (size_t)tt * (size_t)K, xs_n = (size_t)tt * (size_t)ng;
        float *xp = (float *)mc_scratch((xp_n + xs_n) * sizeof(float));
        if (!xp) return MC_ENOMEM;
        float *xs = xp + xp_n;
        const float *xt = x + (int64_t)t0 * K;
        prep_int4(xt, tt, K, xp);
        group_sums(xt, tt, K, G, xs);
        mc_ctx c = {.x = xt, .xp = xp, .xs = xs, .w = packed, .scale = scale, .zero = zero,
                    .y = y + (int64_t)t0 * N, .N = N, .K = K, .KC = K, .T = tt, .G = G};
        mc_run(int4_fns[group_index(G)][tt], &c);
    }
#else
    mc_ctx c = {.x = x, .w = packed, .scale = scale, .zero = zero, .y = y, .N = N, .K = K, .T = T, .G = G};
    mc_run(int4_rows_scalar, &c);
#endif
    return 0;
}

MC_API int mc_linear_int4_q8(const float *x, int T, int64_t K, const uint8_t *packed, const float *scale,
                             const float *zero, int G, int64_t N, float *y)
{
    if (!int4_args_ok(T, K, N, G)) return MC_EBADARG;
#if MC_AVX2
    /* Every row count: integer multiply-adds on 8 rows of x per pass beat the fp32 GEMM on prompts too
     * (126-141 against 113-116 GFLOP/s on a 7B's shapes at T = 128, 2 cores), unlike int8, whose GEMM
     * converts a byte per weight with no unpacking to share. */
    const void *wv = packed;
    return one_pass(2, x, T, K, 1, &wv, &scale, &zero, G, &N, &y);
#else
    /* Same rounding of x as the SIMD path (so results do not depend on the build), then the scalar
     * exact kernel on the rounded values. */
    float *xr = (float *)mc_scratch((size_t)T * (size_t)K * sizeof(float));
    if (!xr) return MC_ENOMEM;
    round_q8(x, (int64_t)T * K, G == 128 ? 128 : 32, xr);
    return mc_linear_int4(xr, T, K, packed, scale, zero, G, N, y);
#endif
}

/* y = x s with s bf16 [K, N] row-major: a weight stored transposed (the torrent layout's expert w2). */
MC_API int mc_linear_bf16_t(const float *x, int T, int64_t K, const uint16_t *s, int64_t N, float *y)
{
    if (T < 1 || K < 1 || N < 1) return MC_EBADARG;
#if MC_AVX2
    if (T >= g_gemm_min_rows) {
        mc_ctx c = {.x = x, .w = s, .y = y, .N = N, .K = K, .T = T};
        return gemm_run(&c, pack_bf16_t);
    }
    for (int t0 = 0; t0 < T; t0 += 8) {
        int tt = T - t0 < 8 ? T - t0 : 8;
        if (g_bf16t_ksplit && bf16t_ksplit(x + (int64_t)t0 * K, tt, K, s, N, y + (int64_t)t0 * N) == 0) continue;
        mc_ctx c = {.x = x + (int64_t)t0 * K, .w = s, .y = y + (int64_t)t0 * N, .N = N, .K = K, .T = tt};
        mc_run(bf16t_fns[tt], &c);
    }
#else
    for (int t = 0; t < T; t++)
        for (int64_t n = 0; n < N; n++) {
            float acc = 0.f;
            for (int64_t k = 0; k < K; k++) acc += x[t * K + k] * bf16_to_f32(s[k * N + n]);
            y[t * N + n] = acc;
        }
#endif
    return 0;
}

/* Several products of the same x, in one thread region (see mc_run_jobs): y_i = x w_i^T for
 * i < n, every w_i [N_i, K] in one format. kind 0: bf16 as mc_linear_bf16; 1: int8 as mc_linear_int8_q8
 * (scale[i]); 2: int4 as mc_linear_int4_q8 (scale[i], zero[i], G). x is prepared once for all of them.
 * From the GEMM's row count on, or without AVX2, the single entry points run in turn. */
MC_API int mc_linear_multi(int kind, const float *x, int T, int64_t K, int n, const void *const *w,
                           const float *const *scale, const float *const *zero, int G, const int64_t *N,
                           float *const *y)
{
    if (n < 1 || n > MC_MULTI_MAX || T < 1 || K < 1 || kind < 0 || kind > 2) return MC_EBADARG;
    for (int i = 0; i < n; i++) {
        if (N[i] < 1) return MC_EBADARG;
        if (kind == 2 && !int4_args_ok(T, K, N[i], G)) return MC_EBADARG;
    }
#if MC_AVX2
    if (T < g_gemm_min_rows && (kind != 1 || K % 32 == 0)) return one_pass(kind, x, T, K, n, w, scale, zero, G, N, y);
#endif
    for (int i = 0; i < n; i++) {
        int rc = kind == 0   ? mc_linear_bf16(x, T, K, (const uint16_t *)w[i], N[i], y[i])
                 : kind == 1 ? mc_linear_int8_q8(x, T, K, (const int8_t *)w[i], scale[i], N[i], y[i])
                             : mc_linear_int4_q8(x, T, K, (const uint8_t *)w[i], scale[i], zero[i], G, N[i], y[i]);
        if (rc) return rc;
    }
    return 0;
}

#include "decode.c" /* the fused one-token layer step; uses one_pass above */
