/*
 * bf16.c (part of kernels.c): bf16 weights [N, K], the matrix-vector row kernels for up to 8 rows of x
 * (plus the portable scalar loop), and prep_bf16, which reorders x to match the even/odd split of each
 * 256-bit load. The GEMM and the transposed layout are in gemm.c; the entry points in onepass.c.
 */

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

#if MC_AVX2

/* ------------------------------------------------------------------------------------------------- */
/* bf16                                                                                              */
/* ------------------------------------------------------------------------------------------------- */
#if MC_AVX512
/* AVX-512: 32 bf16 weights per 512-bit load, split as the AVX2 code splits 16: `dword << 16` is the even
 * column as fp32 and `dword & 0xffff0000` the odd one (exact), two cheap ALU ops and two FMAs with 16 fp32 x
 * each; prep_bf16 puts x in the matching order (per 32 columns: 16 even, then 16 odd). Widening 16 weights
 * at a time in column order (vpmovzxwd, a port-5 shuffle per 16 weights, from 256-bit loads) read 5-10 %
 * slower: with the FMAs the core keeps fewer loads in flight. Only the order of the fp32 additions differs
 * from the AVX2 code. Per 64 columns the even and odd halves of two steps go to accumulator sets 0-3 (mod S).
 * With AVX512_BF16, bf16_dot512 below replaces this step (x rounded to bf16). */
MC_MAYBE_UNUSED MC_INLINE void bf16_step512(const mc_ctx *c, const uint16_t *w, int64_t k, const int R, const int T,
                            __m512 (*even)[8], __m512 (*odd)[8])
{
    const int64_t K = c->K, K32 = K & ~(int64_t)31;
    const __m512i hi_mask = _mm512_set1_epi32((int)0xffff0000u);
    __m512 we[4], wo[4];
    MC_UNROLL for (int r = 0; r < R; r++) {
        __m512i v = _mm512_loadu_si512((const void *)(w + r * K + k));
        MC_REG(v);
        we[r] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
        wo[r] = _mm512_castsi512_ps(_mm512_and_si512(v, hi_mask));
    }
    MC_UNROLL for (int t = 0; t < T; t++) {
        __m512 xe = _mm512_load_ps(c->xp + t * K32 + k), xo = _mm512_load_ps(c->xp + t * K32 + k + 16);
        if (R > 1) {
            MC_REG(xe);
            MC_REG(xo);
        }
        MC_UNROLL for (int r = 0; r < R; r++) {
            even[r][t] = _mm512_fmadd_ps(we[r], xe, even[r][t]);
            odd[r][t] = _mm512_fmadd_ps(wo[r], xo, odd[r][t]);
        }
    }
}

#if MC_BF16DOT
/* AVX512-BF16: x rounded to bf16 (prep_bf16), so one vdpbf16ps takes 32 weights as they are stored, with no
 * widening: half the instructions of the split above and half the bytes of x per weight, which on a Zen 4
 * core is what held bf16 decode under the read rate the int8 and int4 kernels reach. x is rounded as
 * llama.cpp rounds it for bf16 weights (its vec_dot type is bf16); the sums stay fp32. Every bf16 row path
 * of this build (one token, several, row-exact, the fused decode step) takes it, so they agree as before. */
MC_INLINE void bf16_dot512(const mc_ctx *c, const uint16_t *w, int64_t k, const int R, const int T, __m512 (*acc)[8])
{
    const int64_t K = c->K, K32 = K & ~(int64_t)31;
    __m512i wv[4];
    MC_UNROLL for (int r = 0; r < R; r++) {
        wv[r] = _mm512_loadu_si512((const void *)(w + r * K + k));
        MC_REG(wv[r]);
    }
    MC_UNROLL for (int t = 0; t < T; t++) {
        __m512i xv = _mm512_load_si512((const void *)((const uint16_t *)c->xp + t * K32 + k));
        if (R > 1) MC_REG(xv);
        MC_UNROLL for (int r = 0; r < R; r++)
            acc[r][t] = _mm512_dpbf16_ps(acc[r][t], (__m512bh)xv, (__m512bh)wv[r]);
    }
}
#endif

/* carry (the row-exact drivers): the accumulators live on from one K chunk to the next, loaded unless
 * `first` and stored unless `last`, so chunking x (to keep it in L1) does not change a row's sums. */
MC_INLINE void bf16_block_c(const mc_ctx *c, int64_t n0, int64_t k0, int64_t k1, const int R, const int T,
                            const int S, float (*part)[8], __m512 (*carry)[8][4], int first, int last)
{
    const int64_t K = c->K;
    const uint16_t *w = (const uint16_t *)c->w + n0 * K;
    mc_pf pfs = mc_pf_init(c, w, R, 2 * K, 2 * k0, MC_FMT_BF16);
    __m512 acc[4][4][8];
    MC_ZERO_ACC512(acc, S, R, T);
    if (carry && !first)
        MC_UNROLL for (int s_ = 0; s_ < S; s_++) MC_UNROLL for (int r_ = 0; r_ < R; r_++)
            MC_UNROLL for (int t_ = 0; t_ < T; t_++) acc[s_][r_][t_] = carry[r_][t_][s_];
    int64_t k = k0;
    for (; k + 64 <= k1; k += 64) {
        MC_UNROLL for (int h = 0; h < 2; h++) mc_prefetch(&pfs, R, 2 * (k + 32 * h));
#if MC_BF16DOT
        MC_UNROLL for (int q = 0; q < 2; q++) bf16_dot512(c, w, k + 32 * q, R, T, acc[q % S]);
#else
        MC_UNROLL for (int q = 0; q < 2; q++)
            bf16_step512(c, w, k + 32 * q, R, T, acc[(2 * q) % S], acc[(2 * q + 1) % S]);
#endif
    }
    if (k < k1) { /* 32 columns left */
        mc_prefetch(&pfs, R, 2 * k);
#if MC_BF16DOT
        bf16_dot512(c, w, k, R, T, acc[0]);
#else
        bf16_step512(c, w, k, R, T, acc[0], acc[1 % S]);
#endif
    }
    if (carry && !last) {
        MC_UNROLL for (int s_ = 0; s_ < S; s_++) MC_UNROLL for (int r_ = 0; r_ < R; r_++)
            MC_UNROLL for (int t_ = 0; t_ < T; t_++) carry[r_][t_][s_] = acc[s_][r_][t_];
        return;
    }
    MC_FLUSH_ACC512(acc, S, R, T, part);
}

#define MC_BF16_VEC __m512

#else /* AVX2 */

/* A 256-bit load is 16 bf16 = 8 dwords; `dword << 16` is the even element as fp32 and
 * `dword & 0xffff0000` the odd one: two cheap ALU ops per 16 weights, no cross-lane shuffles.
 * xp holds x in the matching order (per 16 columns: 8 even, then 8 odd). */

MC_INLINE void bf16_block_c(const mc_ctx *c, int64_t n0, int64_t k0, int64_t k1, const int R, const int T,
                            const int S, float (*part)[8], __m256 (*carry)[8][4], int first, int last)
{
    const int64_t K = c->K, K32 = K & ~(int64_t)31;
    const uint16_t *w = (const uint16_t *)c->w + n0 * K;
    mc_pf pfs = mc_pf_init(c, w, R, 2 * K, 2 * k0, MC_FMT_BF16);
    const __m256i hi_mask = _mm256_set1_epi32((int)0xffff0000u);
    __m256 acc[4][4][8];
    MC_ZERO_ACC(acc, S, R, T);
    if (carry && !first)
        MC_UNROLL for (int s_ = 0; s_ < S; s_++) MC_UNROLL for (int r_ = 0; r_ < R; r_++)
            MC_UNROLL for (int t_ = 0; t_ < T; t_++) acc[s_][r_][t_] = carry[r_][t_][s_];
    for (int64_t k = k0; k < k1; k += 32) {
        mc_prefetch(&pfs, R, 2 * k);
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
    if (carry && !last) {
        MC_UNROLL for (int s_ = 0; s_ < S; s_++) MC_UNROLL for (int r_ = 0; r_ < R; r_++)
            MC_UNROLL for (int t_ = 0; t_ < T; t_++) carry[r_][t_][s_] = acc[s_][r_][t_];
        return;
    }
    MC_FLUSH_ACC(acc, S, R, T, part);
}

#define MC_BF16_VEC __m256

#endif /* MC_AVX512 */

MC_INLINE void bf16_block(const mc_ctx *c, int64_t n0, int64_t k0, int64_t k1, const int R, const int T,
                          const int S, float (*part)[8])
{
    bf16_block_c(c, n0, k0, k1, R, T, S, part, NULL, 1, 1);
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
/* one row per pass (mc_set_one_row): the same sums as bf16_rows_t1 */
MC_DRIVER(bf16_rows_t1r1, bf16_block, bf16_epi, c->K & ~(int64_t)31, 1, 1, MC_BF16_T1_S)
MC_DRIVER(bf16_rows_t2, bf16_block, bf16_epi, c->K & ~(int64_t)31, 2, 2, 2)
MC_DRIVER(bf16_rows_t3, bf16_block, bf16_epi, c->K & ~(int64_t)31, 1, 3, 2)
MC_DRIVER(bf16_rows_t4, bf16_block, bf16_epi, c->K & ~(int64_t)31, 1, 4, 2)
MC_DRIVER(bf16_rows_t5, bf16_block, bf16_epi, c->K & ~(int64_t)31, 1, 5, 1)
MC_DRIVER(bf16_rows_t6, bf16_block, bf16_epi, c->K & ~(int64_t)31, 1, 6, 1)
MC_DRIVER(bf16_rows_t7, bf16_block, bf16_epi, c->K & ~(int64_t)31, 1, 7, 1)
MC_DRIVER(bf16_rows_t8, bf16_block, bf16_epi, c->K & ~(int64_t)31, 1, 8, 1)

static const mc_rows_fn bf16_fns[9] = {0, bf16_rows_t1, bf16_rows_t2, bf16_rows_t3, bf16_rows_t4,
                                       bf16_rows_t5, bf16_rows_t6, bf16_rows_t7, bf16_rows_t8};

/* Row-exact drivers (drafting's verify pass, see one_pass): the one-token kernel's accumulator splits,
 * one row at a time, so each (row, token) is summed in exactly the order bf16_rows_t1 sums it (R does not
 * change a row's sums, only how many share a pass). x is still taken in K chunks that stay in L1, as the
 * multi-row kernels take it, but the accumulators carry over from chunk to chunk (bf16_block_c) instead
 * of being added up per chunk: re-reading 8 rows of x from L2 for every weight row cost 2.3x a one-row
 * product, against 1.8x for the multi-row layout. */
#define MC_BF16_XDRIVER(T)                                                                           \
    static void bf16_rows_x##T(const mc_ctx *c, int64_t lo, int64_t hi)                             \
    {                                                                                                \
        const int64_t km = c->K & ~(int64_t)31;                                                      \
        float part[MC_RB][8];                                                                        \
        MC_BF16_VEC carry[MC_RB][8][4];                                                              \
        for (int64_t nb = lo; nb < hi; nb += MC_RB) {                                                \
            int64_t ne = nb + MC_RB < hi ? nb + MC_RB : hi;                                          \
            memset(part, 0, sizeof part);                                                            \
            for (int64_t k0 = 0; k0 < km; k0 += c->KC) {                                             \
                int64_t k1 = k0 + c->KC < km ? k0 + c->KC : km;                                      \
                for (int64_t n = nb; n < ne; n++)                                                    \
                    bf16_block_c(c, n, k0, k1, 1, T, MC_BF16_T1_S, &part[n - nb], &carry[n - nb], k0 == 0, \
                                 k1 >= km);                                                          \
            }                                                                                        \
            for (int64_t n = nb; n < ne; n++) bf16_epi(c, n, T, part[n - nb]);                       \
        }                                                                                            \
    }
MC_BF16_XDRIVER(2)
MC_BF16_XDRIVER(3)
MC_BF16_XDRIVER(4)
MC_BF16_XDRIVER(5)
MC_BF16_XDRIVER(6)
MC_BF16_XDRIVER(7)
MC_BF16_XDRIVER(8)

static const mc_rows_fn bf16_xfns[9] = {0, bf16_rows_t1, bf16_rows_x2, bf16_rows_x3, bf16_rows_x4,
                                        bf16_rows_x5, bf16_rows_x6, bf16_rows_x7, bf16_rows_x8};

#if MC_BF16DOT
/* x for bf16_dot512: rounded to bf16 (to nearest even), in column order, K32 values per row. */
static void prep_bf16(const float *x, int T, int64_t K, float *xp)
{
    const int64_t K32 = K & ~(int64_t)31;
    uint16_t *xb = (uint16_t *)xp;
    for (int t = 0; t < T; t++)
        for (int64_t b = 0; b < K32; b += 32)
            _mm512_store_si512((void *)(xb + t * K32 + b),
                               (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + t * K + b + 16),
                                                            _mm512_loadu_ps(x + t * K + b)));
}
#elif MC_AVX512
/* x in the AVX-512 kernel's order: per 32 columns the 16 even ones, then the 16 odd ones (aligned scratch). */
static void prep_bf16(const float *x, int T, int64_t K, float *xp)
{
    const int64_t K32 = K & ~(int64_t)31;
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    for (int t = 0; t < T; t++)
        for (int64_t b = 0; b < K32; b += 32) {
            __m512 lo = _mm512_loadu_ps(x + t * K + b), hi = _mm512_loadu_ps(x + t * K + b + 16);
            _mm512_store_ps(xp + t * K32 + b, _mm512_permutex2var_ps(lo, even, hi));
            _mm512_store_ps(xp + t * K32 + b + 16, _mm512_permutex2var_ps(lo, odd, hi));
        }
}
#else
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

#endif /* MC_AVX512 */

#endif /* MC_AVX2 */
