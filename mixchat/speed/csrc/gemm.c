/*
 * gemm.c (part of kernels.c): products with many rows of x, and bf16 weights stored transposed.
 * The transposed bf16 paths (s [K, N], the torrent layout's expert w2) for few rows (threads split N or K)
 * and the register-tiled GEMM for prompts: each format's weights are converted to fp32 tiles in L1
 * (pack_*) and multiplied 6 rows x 16 outputs at a time; on AVX512-BF16 CPUs, bf16 and int8 weights go
 * instead through a vdpbf16ps tile on bf16 pairs (gemm2_*, at the end). Here rather than per format because
 * the tile loop is shared and only the small pack functions differ.
 */

/* ------------------------------------------------------------------------------------------------- */
/* GEMM: many rows of x (prefill)                                                                    */
/* ------------------------------------------------------------------------------------------------- */
/* With T rows of x each weight is used T times, so past a dozen rows the product is bound by FMAs, not
 * by reading weights, and what counts is keeping both FMA pipes busy. That is the classic register-tile
 * scheme: y[6 tokens][16 outputs] lives in 12 ymm registers; per k, two loads of 16 fp32 weights and six
 * broadcasts of x feed 12 FMAs. The weights must then be fp32 and k-major (16 outputs of one k side by
 * side), so each 16-row x MC_KB-column block is converted from its stored format (bf16, int8 + scale,
 * int4 + group scale/zero: dequantized exactly as the torch reference does) into a 16 KiB buffer by
 * an 8x8 transpose, then reused for all T rows of x. Converting costs a few ops per weight against 2T
 * FLOPs, so int8/int4 prefill runs as fast as bf16 without ever materialising an fp32 copy of a weight.
 * Each thread takes its outputs MC_NBLK x 16 at a time and walks all of K for them (MC_KB columns per packed
 * block) before the next, so the tile of y it adds into stays in L1/L2 and the weight rows are read front
 * to back, which the hardware prefetchers follow. Walking K outside instead (each K block's x in L2 while
 * every output passed over it) re-read a 7 MB y from L3 or memory at every block, one line per tile row,
 * unprefetched: 82-93 GFLOP/s for a 7B's w1/w2 at 128 rows on 2 AVX2 Zen 3 cores, 117-127 with 16 outputs
 * per pass (the FMAs' peak there is 169). x is then read once per pass over K, so rows of x go in blocks of
 * at most MC_TROWS (x block <= 7 MB for K = 14336, from L3): at 256 rows one block ran at 60. A pass packs
 * MC_NBLK blocks of 16 outputs (64 KiB, in L2) and runs each 6-row panel of x, then in L1, through all of
 * them, so x comes from L3 once per 64 outputs rather than per 16: the 7B's w2 (K = 14336, the largest x
 * block) went from 82 to 103-114 GFLOP/s at 128 rows on 2 Zen 3 cores, the model's 128-token prefill from
 * a median of 6.85 to 7.45 tok/s (bf16). Threads split the outputs in 16-row units. x is first copied into
 * panels of MC_MR rows, k-major ([T/MC_MR][K][MC_MR]), so the six broadcasts of a k read one 24-byte run
 * instead of six rows K * 4 bytes apart (which for K a multiple of 1024 all fall in one L1 set). */

#define MC_KB 256
#define MC_MR 6
#define MC_NR 16
#define MC_TROWS 132 /* rows of x per pass over the weights, a multiple of MC_MR */
_Static_assert(MC_TROWS % MC_MR == 0, "MC_TROWS: a multiple of MC_MR");
#define MC_NBLK 4 /* blocks of 16 outputs packed at once (64 KiB, in L2); the AVX-512 tile takes two */
_Static_assert(MC_NBLK >= 2, "MC_NBLK: the AVX-512 tile's pair of blocks shares the buffer");

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
    return _mm256_add_ps(_mm256_mul_ps(f, _mm256_set1_ps(mc_h2f(c->hscale[g]))), _mm256_set1_ps(mc_h2f(c->hzero[g])));
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

#if MC_AVX512
/* AVX-512: y[MR][32] from two packed blocks of 16 outputs (bp0, bp1): per k two 16-lane loads, MR broadcasts
 * and 2 MR FMAs on 2 MR zmm accumulators, twice the work of the AVX2 tile per instruction. Each output's
 * sum runs over k in the same order as the AVX2 tile's, so the two give the same y. */
MC_INLINE void gemm_tile512(const float *x, const float *bp0, const float *bp1, int kc, float *y, int64_t ldy,
                            int first, const int MR)
{
    __m512 acc[MC_MR][2];
    MC_UNROLL for (int t = 0; t < MR; t++) {
        acc[t][0] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(y + t * ldy);
        acc[t][1] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(y + t * ldy + 16);
    }
#pragma GCC unroll 4
    for (int k = 0; k < kc; k++) {
        __m512 b0 = _mm512_load_ps(bp0 + k * MC_NR), b1 = _mm512_load_ps(bp1 + k * MC_NR);
        MC_UNROLL for (int t = 0; t < MR; t++) {
            __m512 a = _mm512_set1_ps(x[k * MC_MR + t]);
            acc[t][0] = _mm512_fmadd_ps(a, b0, acc[t][0]);
            acc[t][1] = _mm512_fmadd_ps(a, b1, acc[t][1]);
        }
    }
    MC_UNROLL for (int t = 0; t < MR; t++) {
        _mm512_storeu_ps(y + t * ldy, acc[t][0]);
        _mm512_storeu_ps(y + t * ldy + 16, acc[t][1]);
    }
}

static void gemm_tile512_any(const float *x, const float *bp0, const float *bp1, int kc, float *y, int64_t ldy,
                             int first, int mr)
{
    switch (mr) {
    case 1: gemm_tile512(x, bp0, bp1, kc, y, ldy, first, 1); break;
    case 2: gemm_tile512(x, bp0, bp1, kc, y, ldy, first, 2); break;
    case 3: gemm_tile512(x, bp0, bp1, kc, y, ldy, first, 3); break;
    case 4: gemm_tile512(x, bp0, bp1, kc, y, ldy, first, 4); break;
    case 5: gemm_tile512(x, bp0, bp1, kc, y, ldy, first, 5); break;
    default: gemm_tile512(x, bp0, bp1, kc, y, ldy, first, 6); break;
    }
}
#endif

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

/* Outputs [lo, hi) of y = x w^T for one thread; lo is a multiple of 16. Rows of x in near-equal blocks of
 * at most MC_TROWS (each a whole number of panels); per block, each MC_NBLK x 16 outputs (32 with
 * AVX-512) over all of K. Every output's sum runs over K in the same order whatever the blocking. */
static void gemm_rows(const mc_ctx *c, mc_pack_fn pack, int64_t lo, int64_t hi)
{
    float bp[MC_NBLK * MC_KB * MC_NR] __attribute__((aligned(64))); /* 64 KiB: L2 */
    float edge[MC_MR * MC_NR];
    const int64_t K = c->K, N = c->N;
    const int blocks = (c->T + MC_TROWS - 1) / MC_TROWS;
    const int step = ((c->T + blocks - 1) / blocks + MC_MR - 1) / MC_MR * MC_MR;
    for (int tb = 0; tb < c->T; tb += step) {
        const int te = c->T - tb < step ? c->T : tb + step;
        int64_t n0 = lo;
#if MC_AVX512
        /* whole pairs of 16-output blocks through the 32-wide tile; what is left through the 16-wide one */
        for (; n0 + 2 * MC_NR <= hi && n0 + 2 * MC_NR <= N; n0 += 2 * MC_NR)
            for (int64_t k0 = 0; k0 < K; k0 += MC_KB) {
                int kc = K - k0 < MC_KB ? (int)(K - k0) : MC_KB, first = k0 == 0;
                pack(c, n0, k0, kc, bp);
                pack(c, n0 + MC_NR, k0, kc, bp + MC_KB * MC_NR);
                for (int t0 = tb; t0 < te; t0 += MC_MR) {
                    int mr = te - t0 < MC_MR ? te - t0 : MC_MR;
                    gemm_tile512_any(c->xp + (t0 / MC_MR) * K * MC_MR + k0 * MC_MR, bp, bp + MC_KB * MC_NR, kc,
                                     c->y + t0 * N + n0, N, first, mr);
                }
            }
#endif
        /* MC_NBLK blocks of 16 outputs at a time (fewer at the end of the share; the last may be partial) */
        for (; n0 < hi; n0 += MC_NBLK * MC_NR) {
            const int64_t ne = hi - n0 < MC_NBLK * MC_NR ? hi : n0 + MC_NBLK * MC_NR;
            const int nblk = (int)((ne - n0 + MC_NR - 1) / MC_NR);
            for (int64_t k0 = 0; k0 < K; k0 += MC_KB) {
                int kc = K - k0 < MC_KB ? (int)(K - k0) : MC_KB, first = k0 == 0;
                for (int b = 0; b < nblk; b++) pack(c, n0 + b * MC_NR, k0, kc, bp + b * MC_KB * MC_NR);
                for (int t0 = tb; t0 < te; t0 += MC_MR) {
                    int mr = te - t0 < MC_MR ? te - t0 : MC_MR;
                    const float *xb = c->xp + (t0 / MC_MR) * K * MC_MR + k0 * MC_MR; /* x's panel, from k0 */
                    for (int b = 0; b < nblk; b++) {
                        const int64_t nb0 = n0 + b * MC_NR;
                        const int cols = N - nb0 < MC_NR ? (int)(N - nb0) : MC_NR;
                        const float *bpb = bp + b * MC_KB * MC_NR;
                        float *yb = c->y + t0 * N + nb0;
                        if (cols == MC_NR) {
                            gemm_tile_any(xb, bpb, kc, yb, N, first, mr);
                            continue;
                        }
                        /* last, partial block of outputs: through a full-width tile */
                        for (int t = 0; t < mr; t++)
                            for (int j = 0; j < MC_NR; j++) edge[t * MC_NR + j] = j < cols && !first ? yb[t * N + j] : 0.f;
                        gemm_tile_any(xb, bpb, kc, edge, MC_NR, first, mr);
                        for (int t = 0; t < mr; t++) memcpy(yb + t * N, edge + t * MC_NR, cols * sizeof(float));
                    }
                }
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
        /* AVX-512: shares of whole 32-output pairs, so each thread's tiles are the wide ones */
        mc_share(c->N, MC_AVX512 ? 2 * MC_NR : MC_NR, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
        if (lo < hi) gemm_rows(c, pack, lo, hi);
    }
#else
    gemm_rows(c, pack, 0, c->N);
#endif
    return 0;
}

/* ------------------------------------------------------------------------------------------------- */
/* GEMM with vdpbf16ps (AVX512-BF16): x rounded to bf16, products of bf16 pairs                       */
/* ------------------------------------------------------------------------------------------------- */
/* The same scheme as the fp32 tile above, with the k loop taken two columns at a time: vdpbf16ps adds
 * x[t][k] w[n][k] + x[t][k+1] w[n][k+1] into each of 16 fp32 lanes (one per output n), so the packed block
 * holds, per column pair, the 32-bit pair (w[n][k], w[n][k+1]) of each of 16 outputs, and x's panels hold
 * the pair (x[t][k], x[t][k+1]) of each of MC_MR2 rows, broadcast as one dword. A 3 x 128 tile is 24
 * vdpbf16ps per eight loads of weights and three broadcasts: 64 flops per instruction where the fp32 tile's
 * FMA does 32, and the bf16 weights go in as they are stored. The broadcasts take a vector slot each, so the
 * tile is wide in outputs and short in rows (6 x 32, 12 vdpbf16ps per six broadcasts, ran 10-15 % slower).
 * Each thread walks its outputs in tiles, and K in blocks of MC_KB2 columns inside that: the tile's y rows
 * stay in L2 across K, where walking K outside left a 14336-wide y (7 MB) to L3 at every block (320 against
 * 380 GFLOP/s for a 7B's w1 at 128 rows, 2 Zen 4 cores). What it changes: x is rounded to bf16 (to nearest
 * even, once per call; the weights are bf16 already, and int8 weights are integers, exact in bf16), the
 * sums stay fp32, and vdpbf16ps treats bf16 subnormals as zero. int8's per-row scale multiplies the finished
 * sum. Packing a block is a 16 x 16 transpose of 32-bit pairs, 64 shuffles per 512 weights, against the
 * 16 T vdpbf16ps that then use them. Needs K % 32 == 0 (whole 16-pair groups). */
#if MC_BF16DOT

static int g_gemm_bf16dot = 1;

/* r[i] <- column i of the 16 x 16 block of dwords whose rows are r[0..15]. */
MC_INLINE void transpose16(__m512i r[16])
{
    __m512i a[16], b[16];
    for (int i = 0; i < 8; i++) {
        a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    /* b[4i + c], lane L: column 4L + c of rows 4i..4i+3 */
    for (int i = 0; i < 4; i++) {
        b[4 * i + 0] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
        b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
        b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
        b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
    }
    for (int c = 0; c < 4; c++) {
        __m512i e0 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0x44), e1 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0x44);
        __m512i e2 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0xee), e3 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0xee);
        r[c] = _mm512_shuffle_i32x4(e0, e1, 0x88);
        r[4 + c] = _mm512_shuffle_i32x4(e0, e1, 0xdd);
        r[8 + c] = _mm512_shuffle_i32x4(e2, e3, 0x88);
        r[12 + c] = _mm512_shuffle_i32x4(e2, e3, 0xdd);
    }
}

/* 32 weights (columns k..k+31) of row n as bf16, in order: as stored, or int8 converted exactly. */
MC_INLINE __m512i row32_bf16(const mc_ctx *c, int64_t n, int64_t k)
{
    return _mm512_loadu_si512((const void *)((const uint16_t *)c->w + n * c->K + k));
}

MC_INLINE __m512i row32_int8(const mc_ctx *c, int64_t n, int64_t k)
{
    __m256i b = _mm256_loadu_si256((const __m256i *)((const int8_t *)c->w + n * c->K + k));
    __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
    __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

/* bp[kp][0..15] = the bf16 pairs (columns k0 + 2kp, k0 + 2kp + 1) of rows n0..n0+15 (rows >= N zero),
 * kp < kc / 2, kc % 32 == 0. */
#define MC_PACK2(NAME, ROW32)                                                                        \
    static void NAME(const mc_ctx *c, int64_t n0, int64_t k0, int kc, uint32_t *bp)                \
    {                                                                                               \
        int rows = c->N - n0 >= 16 ? 16 : (int)(c->N - n0);                                         \
        for (int k = 0; k < kc; k += 32) {                                                          \
            __m512i r[16];                                                                          \
            for (int i = 0; i < 16; i++) r[i] = i < rows ? ROW32(c, n0 + i, k0 + k) : _mm512_setzero_si512(); \
            transpose16(r);                                                                         \
            for (int i = 0; i < 16; i++) _mm512_store_si512((void *)(bp + (k / 2 + i) * 16), r[i]);  \
        }                                                                                           \
    }

MC_PACK2(pack2_bf16, row32_bf16)
MC_PACK2(pack2_int8, row32_int8)

typedef void (*mc_pack2_fn)(const mc_ctx *c, int64_t n0, int64_t k0, int kc, uint32_t *bp);

#ifndef MC_KB2
#define MC_KB2 512 /* columns per packed block of the bf16 tile */
#endif
#ifndef MC_MR2
#define MC_MR2 3 /* rows of x per bf16 tile */
#endif
#ifndef MC_NB2
#define MC_NB2 8 /* 16-output blocks per bf16 tile */
#endif
#define MC_NR2 (16 * MC_NB2)

/* y[MR][MC_NR2] (row stride ldy) = (first ? 0 : y) + x pairs [kp][MC_MR2] * bp[b][kp][16], times the
 * outputs' scales (sc, MC_NR2 of them) when it is the last block of K. */
MC_INLINE void gemm2_tile(const uint32_t *x, const uint32_t *bp, int kpn, float *y, int64_t ldy, int first,
                          const float *sc, const int MR)
{
    __m512 acc[MC_MR2][MC_NB2];
    MC_UNROLL for (int t = 0; t < MR; t++) MC_UNROLL for (int b = 0; b < MC_NB2; b++)
        acc[t][b] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(y + t * ldy + 16 * b);
#pragma GCC unroll 2
    for (int kp = 0; kp < kpn; kp++) {
        __m512bh a[MC_MR2];
        MC_UNROLL for (int t = 0; t < MR; t++) a[t] = (__m512bh)_mm512_set1_epi32((int)x[kp * MC_MR2 + t]);
        MC_UNROLL for (int b = 0; b < MC_NB2; b++) {
            __m512bh w = (__m512bh)_mm512_load_si512((const void *)(bp + (b * (MC_KB2 / 2) + kp) * 16));
            MC_UNROLL for (int t = 0; t < MR; t++) acc[t][b] = _mm512_dpbf16_ps(acc[t][b], a[t], w);
        }
    }
    if (sc) {
        MC_UNROLL for (int b = 0; b < MC_NB2; b++) {
            __m512 s = _mm512_loadu_ps(sc + 16 * b);
            MC_UNROLL for (int t = 0; t < MR; t++) acc[t][b] = _mm512_mul_ps(acc[t][b], s);
        }
    }
    MC_UNROLL for (int t = 0; t < MR; t++) MC_UNROLL for (int b = 0; b < MC_NB2; b++)
        _mm512_storeu_ps(y + t * ldy + 16 * b, acc[t][b]);
}

static void gemm2_tile_any(const uint32_t *x, const uint32_t *bp, int kpn, float *y, int64_t ldy, int first,
                           const float *sc, int mr)
{
    if (mr == MC_MR2) {
        gemm2_tile(x, bp, kpn, y, ldy, first, sc, MC_MR2);
        return;
    }
    switch (mr) {
    case 1: gemm2_tile(x, bp, kpn, y, ldy, first, sc, 1); break;
#if MC_MR2 > 2
    case 2: gemm2_tile(x, bp, kpn, y, ldy, first, sc, 2); break;
#endif
#if MC_MR2 > 3
    case 3: gemm2_tile(x, bp, kpn, y, ldy, first, sc, 3); break;
#endif
#if MC_MR2 > 4
    case 4: gemm2_tile(x, bp, kpn, y, ldy, first, sc, 4); break;
#endif
#if MC_MR2 > 5
    case 5: gemm2_tile(x, bp, kpn, y, ldy, first, sc, 5); break;
#endif
#if MC_MR2 > 6
    case 6: gemm2_tile(x, bp, kpn, y, ldy, first, sc, 6); break;
    case 7: gemm2_tile(x, bp, kpn, y, ldy, first, sc, 7); break;
#endif
    default: break;
    }
}

/* The outputs n0..n0+MC_NR2-1 of every row of y, over the columns k0..k0+MC_KB2-1: pack that block of the
 * weight once, then run it past every panel of x. A partial tile of outputs (the last) goes through the
 * same tile into a full-width scratch tile. */
static void gemm2_block(const mc_ctx *c, mc_pack2_fn pack, const uint32_t *xp, uint32_t *bp, int64_t n0, int64_t k0)
{
    float edge[MC_MR2 * MC_NR2], sce[MC_NR2];
    const int64_t K = c->K, N = c->N, KP = K / 2;
    int kc = K - k0 < MC_KB2 ? (int)(K - k0) : MC_KB2, first = k0 == 0, last = k0 + kc == K;
    for (int b = 0; b < MC_NB2; b++) {
        uint32_t *dst = bp + b * (MC_KB2 / 2) * 16;
        if (n0 + 16 * b < N) pack(c, n0 + 16 * b, k0, kc, dst);
        else memset(dst, 0, (size_t)(kc / 2) * 16 * sizeof(uint32_t));
    }
    int cols = N - n0 < MC_NR2 ? (int)(N - n0) : MC_NR2;
    const float *sc = NULL;
    if (last && c->scale) {
        if (cols == MC_NR2) sc = c->scale + n0;
        else {
            for (int j = 0; j < MC_NR2; j++) sce[j] = j < cols ? c->scale[n0 + j] : 0.f;
            sc = sce;
        }
    }
    for (int t0 = 0; t0 < c->T; t0 += MC_MR2) {
        int mr = c->T - t0 < MC_MR2 ? c->T - t0 : MC_MR2;
        const uint32_t *xb = xp + (t0 / MC_MR2) * KP * MC_MR2 + (k0 / 2) * MC_MR2;
        float *yb = c->y + t0 * N + n0;
        if (cols == MC_NR2) {
            gemm2_tile_any(xb, bp, kc / 2, yb, N, first, sc, mr);
            continue;
        }
        for (int t = 0; t < mr; t++)
            for (int j = 0; j < MC_NR2; j++) edge[t * MC_NR2 + j] = j < cols && !first ? yb[t * N + j] : 0.f;
        gemm2_tile_any(xb, bp, kc / 2, edge, MC_NR2, first, sc, mr);
        for (int t = 0; t < mr; t++) memcpy(yb + t * N, edge + t * MC_NR2, cols * sizeof(float));
    }
}

/* Outputs [lo, hi) of y for one thread; lo is a multiple of MC_NR2. */
static void gemm2_rows(const mc_ctx *c, mc_pack2_fn pack, const uint32_t *xp, int64_t lo, int64_t hi)
{
    uint32_t bp[MC_NB2 * MC_KB2 / 2 * 16] __attribute__((aligned(64)));
    for (int64_t n0 = lo; n0 < hi; n0 += MC_NR2)
        for (int64_t k0 = 0; k0 < c->K; k0 += MC_KB2) gemm2_block(c, pack, xp, bp, n0, k0);
}

/* x -> bf16 pairs in MC_MR2-row panels p0..p1-1 of xp[p][kp][MC_MR2] (rows past T zero), rounded to
 * nearest even. */
static void gemm2_panels(const float *x, int T, int64_t K, uint32_t *xp, int64_t p0, int64_t p1)
{
    const int64_t KP = K / 2;
    for (int64_t p = p0; p < p1; p++)
        for (int t = 0; t < MC_MR2; t++) {
            int64_t row = p * MC_MR2 + t;
            uint32_t *dst = xp + p * KP * MC_MR2 + t;
            if (row >= T) {
                for (int64_t kp = 0; kp < KP; kp++) dst[kp * MC_MR2] = 0;
                continue;
            }
            const float *src = x + row * K;
            for (int64_t k = 0; k < K; k += 32) {
                uint32_t pairs[16] __attribute__((aligned(64)));
                _mm512_store_si512((void *)pairs,
                                   (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + k + 16), _mm512_loadu_ps(src + k)));
                for (int j = 0; j < 16; j++) dst[(k / 2 + j) * MC_MR2] = pairs[j];
            }
        }
}

/* y = x w^T through the bf16 tile (pack: pack2_bf16 or pack2_int8 with c->scale). K % 32 == 0. The threads
 * round their share of x's panels, then (after a barrier) multiply their share of the outputs. */
static int gemm2_run(const mc_ctx *c, mc_pack2_fn pack)
{
    const int64_t panels = (c->T + MC_MR2 - 1) / MC_MR2;
    uint32_t *xp = (uint32_t *)mc_scratch((size_t)panels * (size_t)(c->K / 2) * MC_MR2 * sizeof(uint32_t));
    if (!xp) return MC_ENOMEM;
    int nt = g_threads;
    int64_t units = (c->N + MC_NR2 - 1) / MC_NR2;
    if (nt > units) nt = (int)units;
#ifdef _OPENMP
    if (nt > 1) {
#pragma omp parallel num_threads(nt)
        {
            int tid = omp_get_thread_num(), n_th = omp_get_num_threads();
            int64_t lo, hi;
            mc_share(panels, 1, tid, n_th, &lo, &hi);
            gemm2_panels(c->x, c->T, c->K, xp, lo, hi);
#pragma omp barrier
            mc_share(c->N, MC_NR2, tid, n_th, &lo, &hi);
            if (lo < hi) gemm2_rows(c, pack, xp, lo, hi);
        }
        return 0;
    }
#endif
    gemm2_panels(c->x, c->T, c->K, xp, 0, panels);
    gemm2_rows(c, pack, xp, 0, c->N);
    return 0;
}
#endif /* MC_BF16DOT */

#endif /* MC_AVX2 */

/* Whether this build has the bf16 GEMM (MC_BF16DOT), and whether prompts use it (on by default where it
 * exists; mixchat.speed.kernels switches it to compare the two and to keep a CPU's faster one). */
MC_API int mc_bf16dot(void) { return MC_BF16DOT; }
MC_API int mc_get_gemm_bf16dot(void)
{
#if MC_BF16DOT
    return g_gemm_bf16dot;
#else
    return 0;
#endif
}
MC_API void mc_set_gemm_bf16dot(int on)
{
#if MC_BF16DOT
    g_gemm_bf16dot = on;
#else
    (void)on;
#endif
}
