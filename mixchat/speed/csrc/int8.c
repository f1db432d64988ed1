/*
 * int8.c (part of kernels.c): int8 weights [N, K] with one fp32 scale per row. Two paths: fp32
 * activations (exact, FMA-bound from T = 3) and int8 activations per 32 columns (Q8: integer
 * multiply-adds, the only way a core keeps up with the read rate), with prep_q8_plain rounding x.
 * The portable scalar loop is here too; the entry points are in onepass.c.
 */

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

#if MC_AVX2

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
    mc_pf pfs = mc_pf_init(c, w, R, K, k0, MC_FMT_INT8);
    __m256 acc[4][2][8];
    MC_ZERO_ACC(acc, S, R, T);
    for (int64_t k = k0; k < k1; k += 32) {
        if ((k & 63) == 0) mc_prefetch(&pfs, R, k);
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
/* int8, int8 activations (Q8 blocks of 32)                                                          */
/* ------------------------------------------------------------------------------------------------- */
/* With fp32 activations each 8 int8 weights cost a widening load, a convert and an FMA: about 4
 * weights per cycle, under the read limit once both cores stream. Rounding x to int8 per 32 columns
 * (llama.cpp's Q8_0 x Q8_0) makes 32 weights cost sign, maddubs, madd, convert and one FMA with the
 * block's x scale. vpmaddubsw multiplies unsigned by signed bytes, so |q| goes in as the unsigned
 * operand and x takes q's sign (vpsignb); |q|, |x| <= 127 keep each int16 pair sum <= 32258. */

#if MC_AVX512
/* AVX-512: 64 columns (two Q8 blocks) per step and row in one load. AVX-512 has no vpsignb, so x takes q's
 * sign by a masked subtract (mask = q's sign bits); then vpdpbusd (VNNI) or vpmaddubsw + vpmaddwd (BW)
 * make the same int32 sums of four neighbouring columns as the AVX2 code, exactly (|q| may be 128: |q| goes
 * in as an unsigned byte, and 2 * 128 * 127 still fits the BW path's int16). Lanes 0-7 hold the first
 * block, 8-15 the second; each is converted and multiplied by its own block's x scale, as in AVX2, only
 * the order of the fp32 additions across blocks differs. `full` = 0: the last 32 columns of a row alone
 * (K % 64 == 32), loaded with a byte mask, the upper lanes zero. */
MC_INLINE void int8q8_step512(const mc_ctx *c, const int8_t *w, int64_t k, const int R, const int T, const int full,
                              __m512 (*y)[8])
{
    const int64_t K = c->K, nb = K / 32;
    const __mmask64 m = full ? ~(__mmask64)0 : (__mmask64)0xffffffffu;
    __m512i wa[4];
    __mmask64 neg[4];
    MC_UNROLL for (int r = 0; r < R; r++) {
        __m512i v = _mm512_maskz_loadu_epi8(m, w + r * K + k);
        MC_REG(v);
        wa[r] = _mm512_abs_epi8(v);
        neg[r] = _mm512_movepi8_mask(v);
    }
    MC_UNROLL for (int t = 0; t < T; t++) {
        __m512i xv = _mm512_maskz_loadu_epi8(m, c->xq + t * K + k);
        const float *xd = c->xd + t * nb + k / 32;
        __m512 d = _mm512_mask_blend_ps((__mmask16)0xff00, _mm512_set1_ps(xd[0]), _mm512_set1_ps(full ? xd[1] : 0.f));
        if (R > 1) MC_REG(xv);
        MC_UNROLL for (int r = 0; r < R; r++) {
            __m512i xs = _mm512_mask_sub_epi8(xv, neg[r], _mm512_setzero_si512(), xv);
#if MC_VNNI
            __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wa[r], xs);
#else
            __m512i p = _mm512_madd_epi16(_mm512_maddubs_epi16(wa[r], xs), _mm512_set1_epi16(1));
#endif
            y[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), d, y[r][t]);
        }
    }
}

MC_INLINE void int8q8_block(const mc_ctx *c, int64_t n0, int64_t k0, int64_t k1, const int R, const int T,
                            const int S, float (*part)[8])
{
    const int64_t K = c->K;
    const int8_t *w = (const int8_t *)c->w + n0 * K;
    mc_pf pfs = mc_pf_init(c, w, R, K, k0, MC_FMT_INT8);
    __m512 y[4][4][8];
    MC_ZERO_ACC512(y, S, R, T);
    int64_t k = k0;
    for (; k + 64 * S <= k1; k += 64 * S) {
        MC_UNROLL for (int u = 0; u < S; u++) {
            mc_prefetch(&pfs, R, k + 64 * u);
            int8q8_step512(c, w, k + 64 * u, R, T, 1, y[u]);
        }
    }
    for (; k + 64 <= k1; k += 64) int8q8_step512(c, w, k, R, T, 1, y[0]);
    if (k < k1) int8q8_step512(c, w, k, R, T, 0, y[0]);
    MC_FLUSH_ACC512(y, S, R, T, part);
}

#else /* AVX2 */

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
    mc_pf pfs = mc_pf_init(c, w, R, K, k0, MC_FMT_INT8);
    __m256 y[4][4][8];
    MC_ZERO_ACC(y, S, R, T);
    int64_t k = k0;
    for (; k + 32 * S <= k1; k += 32 * S) {
        MC_UNROLL for (int u = 0; u < S; u++) {
            if (((k + 32 * u) & 63) == 0) mc_prefetch(&pfs, R, k + 32 * u);
            int8q8_step(c, w, k + 32 * u, R, T, y[u]);
        }
    }
    for (; k < k1; k += 32) int8q8_step(c, w, k, R, T, y[0]);
    MC_FLUSH_ACC(y, S, R, T, part);
}

#endif /* MC_AVX512 */

MC_INLINE void int8q8_epi(const mc_ctx *c, int64_t n, const int T, const float *part)
{
    for (int t = 0; t < T; t++) c->y[t * c->N + n] = part[t] * c->scale[n];
}

MC_DRIVER(int8q8_t1, int8q8_block, int8q8_epi, c->K, MC_INT8_T1_R, 1, MC_INT8_T1_S)
MC_DRIVER(int8q8_t1r1, int8q8_block, int8q8_epi, c->K, 1, 1, MC_INT8_T1_S) /* mc_set_one_row */
MC_DRIVER(int8q8_t2, int8q8_block, int8q8_epi, c->K, 2, 2, 2)
MC_DRIVER(int8q8_t3, int8q8_block, int8q8_epi, c->K, 2, 3, 1)
MC_DRIVER(int8q8_t4, int8q8_block, int8q8_epi, c->K, 2, 4, 1)
MC_DRIVER(int8q8_t5, int8q8_block, int8q8_epi, c->K, 1, 5, 1)
MC_DRIVER(int8q8_t6, int8q8_block, int8q8_epi, c->K, 1, 6, 1)
MC_DRIVER(int8q8_t7, int8q8_block, int8q8_epi, c->K, 1, 7, 1)
MC_DRIVER(int8q8_t8, int8q8_block, int8q8_epi, c->K, 1, 8, 1)

static const mc_rows_fn int8q8_fns[9] = {0, int8q8_t1, int8q8_t2, int8q8_t3, int8q8_t4,
                                         int8q8_t5, int8q8_t6, int8q8_t7, int8q8_t8};

/* Row-exact drivers: each (row, token) summed as int8q8_t1 sums it (see bf16_xfns). */
MC_DRIVER(int8q8_x2, int8q8_block, int8q8_epi, c->K, 1, 2, MC_INT8_T1_S)
MC_DRIVER(int8q8_x3, int8q8_block, int8q8_epi, c->K, 1, 3, MC_INT8_T1_S)
MC_DRIVER(int8q8_x4, int8q8_block, int8q8_epi, c->K, 1, 4, MC_INT8_T1_S)
MC_DRIVER(int8q8_x5, int8q8_block, int8q8_epi, c->K, 1, 5, MC_INT8_T1_S)
MC_DRIVER(int8q8_x6, int8q8_block, int8q8_epi, c->K, 1, 6, MC_INT8_T1_S)
MC_DRIVER(int8q8_x7, int8q8_block, int8q8_epi, c->K, 1, 7, MC_INT8_T1_S)
MC_DRIVER(int8q8_x8, int8q8_block, int8q8_epi, c->K, 1, 8, MC_INT8_T1_S)

static const mc_rows_fn int8q8_xfns[9] = {0, int8q8_t1, int8q8_x2, int8q8_x3, int8q8_x4,
                                          int8q8_x5, int8q8_x6, int8q8_x7, int8q8_x8};

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
