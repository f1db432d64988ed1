/*
 * int4.c (part of kernels.c): int4 weights (two nibbles per byte, fp16 scale and zero per group of
 * 32/64/128, converted to fp32 as they are read). The shared scale-vector and zero-point epilogue, the exact path (fp32 activations, nibbles
 * converted in place), the Q8 path (x rounded to int8 per 32 columns, or per group of 128, prepared by
 * prep_q8 in the nibble order), and the portable scalar loop. The entry points are in onepass.c.
 */

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
                s += mc_h2f(c->hscale[n * ng + g]) * d + mc_h2f(c->hzero[n * ng + g]) * sx;
            }
            c->y[t * c->N + n] = s;
        }
}

#if MC_AVX2

/* ------------------------------------------------------------------------------------------------- */
/* int4 common: scale vectors and the zero-point epilogue                                            */
/* ------------------------------------------------------------------------------------------------- */
/* A 64-column block of int4 weights is one 32-byte load. For G >= 64 one scale covers the block; for
 * G = 32 lanes 0-3 of the block's results belong to its first group and lanes 4-7 to the second
 * (both kernels below arrange their lanes that way). */

MC_INLINE __m256 int4_scale_vec(const uint16_t *sc_row, int64_t k, const int GS)
{
    if (GS >= 64) return _mm256_set1_ps(mc_h2f(sc_row[(uint64_t)k / GS]));
    return _mm256_setr_m128(_mm_set1_ps(mc_h2f(sc_row[(uint64_t)k / 32])),
                            _mm_set1_ps(mc_h2f(sc_row[(uint64_t)k / 32 + 1])));
}

/* y = partial + sum_g (zero_g - 8 * scale_g) * sum_{k in g} x_k */
MC_INLINE void int4_epi(const mc_ctx *c, int64_t n, const int T, const float *part)
{
    const int64_t ng = c->K / c->G;
    const uint16_t *sc = c->hscale + n * ng, *zp = c->hzero + n * ng;
    for (int t = 0; t < T; t++) {
        const float *xs = c->xs + t * ng;
        __m256 z = _mm256_setzero_ps();
        int64_t g = 0;
        for (; g + 8 <= ng; g += 8) {
            __m256 off = _mm256_fnmadd_ps(_mm256_set1_ps(8.f), mc_h2f8(sc + g), mc_h2f8(zp + g));
            z = _mm256_fmadd_ps(off, _mm256_loadu_ps(xs + g), z);
        }
        float s = part[t] + hsum8(z);
        for (; g < ng; g++) s += (mc_h2f(zp[g]) - 8.f * mc_h2f(sc[g])) * xs[g];
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
    mc_pf pfs = mc_pf_init(c, w, R, K / 2, k0 / 2, MC_FMT_INT4);
    __m256 y[1][2][4];
    MC_ZERO_ACC(y, 1, R, T);
    for (int64_t k = k0; k < k1; k += SPAN) {
        __m256 acc[4][2][4];
        MC_ZERO_ACC(acc, S, R, T);
        MC_UNROLL for (int b = 0; b < SPAN / 64; b++) {
            if (((k + 64 * b) & 127) == 0) mc_prefetch(&pfs, R, (k + 64 * b) / 2);
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
            __m256 sv = int4_scale_vec(c->hscale + (n0 + r) * ng, k, GS);
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

#if MC_AVX512
/* AVX-512: 128 columns (64 bytes) per step and row, one load. The 128-bit lane L of the loaded weights is the
 * 32-column block L, as in the AVX2 code, so its int32 sums (lanes 4L..4L+3) belong to block L; x's even and
 * odd halves are one 512-bit load each (prep_q8 orders x per 128 columns in the AVX-512 build; gathering
 * them from its AVX2 order took four 256-bit loads and two shuffles per step), and the 16
 * block scales of x are prep_q8's two 8-lane vectors side by side. The integer sums are the AVX2 code's
 * (VNNI: vpdpbusd for each half; BW: vpmaddubsw, add, vpmaddwd, as in AVX2), each lane converted and scaled
 * by x's and w's block scales, as in AVX2; only the order of the fp32 additions across lanes differs.
 * `full` = 0: the last 64 columns of a row alone (K % 128 == 64, groups of 32 or 64), upper lanes zero. */
MC_INLINE __m512 int4_scale_vec512(const uint16_t *sc_row, int64_t k, const int GS, const int full)
{
    const uint64_t g = (uint64_t)k / GS;
    if (GS == 128) return _mm512_set1_ps(mc_h2f(sc_row[g]));
    if (GS == 64)
        return _mm512_mask_blend_ps((__mmask16)0xff00, _mm512_set1_ps(mc_h2f(sc_row[g])),
                                    _mm512_set1_ps(full ? mc_h2f(sc_row[g + 1]) : 0.f));
    /* GS == 32: lanes 4L..4L+3 take block L's scale (four fp16, or two where the row ends) */
    __m128 s4 = _mm_cvtph_ps(full ? _mm_loadl_epi64((const __m128i *)(sc_row + g))
                                  : _mm_maskz_loadu_epi16((__mmask8)0x3, sc_row + g));
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
                                 _mm512_castps128_ps512(s4));
}

MC_INLINE void int4q8_step512(const mc_ctx *c, const uint8_t *w, int64_t n0, int64_t k, const int R, const int T,
                              const int GS, const int full, __m512 (*y)[8])
{
    const int64_t K = c->K, ng = K / GS, nb = K / 64;
    const __m512i lo_mask = _mm512_set1_epi8(0x0f);
    __m512i ql[4], qh[4];
    __m512 sv[4];
    MC_UNROLL for (int r = 0; r < R; r++) {
        const uint8_t *wr = w + r * (K / 2) + k / 2;
        __m512i v = full ? _mm512_loadu_si512((const void *)wr) : _mm512_maskz_loadu_epi8((__mmask64)0xffffffffu, wr);
        MC_REG(v);
        ql[r] = _mm512_and_si512(v, lo_mask);
        qh[r] = _mm512_and_si512(_mm512_srli_epi16(v, 4), lo_mask);
        sv[r] = int4_scale_vec512(c->hscale + (n0 + r) * ng, k, GS, full);
    }
    MC_UNROLL for (int t = 0; t < T; t++) {
        const int8_t *xb = c->xq + t * K + k;
        __m512i xl, xh;
        __m512 d;
        if (full) { /* prep_q8 put the four blocks' even halves, then their odd halves, side by side */
            xl = _mm512_loadu_si512((const void *)xb);
            xh = _mm512_loadu_si512((const void *)(xb + 64));
        } else {
            xl = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_load_si256((const __m256i *)xb), 0);
            xh = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_load_si256((const __m256i *)(xb + 32)), 0);
        }
        if (GS == 128) d = _mm512_set1_ps(c->xd[t * ng + (uint64_t)k / 128]);
        else if (full) d = _mm512_loadu_ps(c->xd + (t * nb + (uint64_t)k / 64) * 8);
        else {
            __m256 d8 = _mm256_load_ps(c->xd + (t * nb + (uint64_t)k / 64) * 8);
            d = _mm512_castpd_ps(_mm512_insertf64x4(_mm512_setzero_pd(), _mm256_castps_pd(d8), 0));
        }
        if (R > 1) {
            MC_REG(xl);
            MC_REG(xh);
        }
        MC_UNROLL for (int r = 0; r < R; r++) {
#if MC_VNNI
            __m512i p = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), ql[r], xl), qh[r], xh);
#else
            /* q <= 15, |x| <= 127: an int16 lane holds at most 2 * 2 * 15 * 127 = 7620 */
            __m512i p16 = _mm512_add_epi16(_mm512_maddubs_epi16(ql[r], xl), _mm512_maddubs_epi16(qh[r], xh));
            __m512i p = _mm512_madd_epi16(p16, _mm512_set1_epi16(1));
#endif
            y[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(d, sv[r]), y[r][t]);
        }
    }
}

MC_INLINE void int4q8_block(const mc_ctx *c, int64_t n0, int64_t k0, int64_t k1, const int R, const int T,
                            const int S, const int GS, float (*part)[8])
{
    const int64_t K = c->K;
    const uint8_t *w = (const uint8_t *)c->w + n0 * (K / 2);
    mc_pf pfs = mc_pf_init(c, w, R, K / 2, k0 / 2, MC_FMT_INT4);
    __m512 y[2][4][8];
    MC_ZERO_ACC512(y, S, R, T);
    int64_t k = k0;
    for (; k + 128 * S <= k1; k += 128 * S) {
        MC_UNROLL for (int u = 0; u < S; u++) {
            /* one 64-byte line per row and 128 columns */
            mc_prefetch(&pfs, R, (k + 128 * u) / 2);
            int4q8_step512(c, w, n0, k + 128 * u, R, T, GS, 1, y[u]);
        }
    }
    for (; k + 128 <= k1; k += 128) int4q8_step512(c, w, n0, k, R, T, GS, 1, y[0]);
    if (k < k1) int4q8_step512(c, w, n0, k, R, T, GS, 0, y[0]); /* 64 columns: K % 128 == 64, G 32 or 64 */
    MC_FLUSH_ACC512(y, S, R, T, part);
}

#else /* AVX2 */

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
        sv[r] = int4_scale_vec(c->hscale + (n0 + r) * ng, k, GS);
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
        sv[r] = _mm256_set1_ps(mc_h2f(c->hscale[(n0 + r) * ng + (uint64_t)k / 128]));
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
    mc_pf pfs = mc_pf_init(c, w, R, K / 2, k0 / 2, MC_FMT_INT4);
    __m256 y[2][4][8];
    MC_ZERO_ACC(y, S, R, T);
    int64_t k = k0;
    for (; k + W * S <= k1; k += W * S) {
        /* one 64-byte line per row and 128 columns */
        MC_UNROLL for (int64_t kk = k; kk < k + W * S; kk += 64) if ((kk & 127) == 0) mc_prefetch(&pfs, R, kk / 2);
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

#endif /* MC_AVX512 */

/* Rows per pass for 5-8 rows of x (prompts): AVX-512's 32 registers hold two rows' accumulators, and two
 * rows share each token's x loads and scale (AVX2's 16 do not). -D overrides are for tuning. */
#ifndef MC_INT4_TN_R
#define MC_INT4_TN_R (MC_AVX512 ? 2 : 1)
#endif

/* R1, S1: the one-token kernel's rows and accumulator splits. */
#define MC_INT4_Q8(GS, R1, S1)                                                                      \
    MC_INLINE void int4q8_block_g##GS(const mc_ctx *c, int64_t n0, int64_t k0, int64_t k1, const int R, \
                                      const int T, const int S, float (*part)[8])                   \
    {                                                                                               \
        int4q8_block(c, n0, k0, k1, R, T, S, GS, part);                                             \
    }                                                                                               \
    MC_DRIVER(int4q8_g##GS##_t1, int4q8_block_g##GS, int4_epi, c->K, R1, 1, S1)                     \
    MC_DRIVER(int4q8_g##GS##_t1r1, int4q8_block_g##GS, int4_epi, c->K, 1, 1, S1) /* mc_set_one_row */ \
    MC_DRIVER(int4q8_g##GS##_t2, int4q8_block_g##GS, int4_epi, c->K, 2, 2, 1)                       \
    MC_DRIVER(int4q8_g##GS##_t3, int4q8_block_g##GS, int4_epi, c->K, 1, 3, 2)                       \
    MC_DRIVER(int4q8_g##GS##_t4, int4q8_block_g##GS, int4_epi, c->K, 1, 4, 2)                       \
    MC_DRIVER(int4q8_g##GS##_t5, int4q8_block_g##GS, int4_epi, c->K, MC_INT4_TN_R, 5, 1)            \
    MC_DRIVER(int4q8_g##GS##_t6, int4q8_block_g##GS, int4_epi, c->K, MC_INT4_TN_R, 6, 1)            \
    MC_DRIVER(int4q8_g##GS##_t7, int4q8_block_g##GS, int4_epi, c->K, MC_INT4_TN_R, 7, 1)            \
    MC_DRIVER(int4q8_g##GS##_t8, int4q8_block_g##GS, int4_epi, c->K, MC_INT4_TN_R, 8, 1)            \
    /* row-exact: each (row, token) summed as the one-token kernel sums it (see bf16_xfns) */           \
    MC_DRIVER(int4q8_g##GS##_x2, int4q8_block_g##GS, int4_epi, c->K, 1, 2, S1)                      \
    MC_DRIVER(int4q8_g##GS##_x3, int4q8_block_g##GS, int4_epi, c->K, 1, 3, S1)                      \
    MC_DRIVER(int4q8_g##GS##_x4, int4q8_block_g##GS, int4_epi, c->K, 1, 4, S1)                      \
    MC_DRIVER(int4q8_g##GS##_x5, int4q8_block_g##GS, int4_epi, c->K, 1, 5, S1)                      \
    MC_DRIVER(int4q8_g##GS##_x6, int4q8_block_g##GS, int4_epi, c->K, 1, 6, S1)                      \
    MC_DRIVER(int4q8_g##GS##_x7, int4q8_block_g##GS, int4_epi, c->K, 1, 7, S1)                      \
    MC_DRIVER(int4q8_g##GS##_x8, int4q8_block_g##GS, int4_epi, c->K, 1, 8, S1)

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

static const mc_rows_fn int4q8_r1fns[3] = {int4q8_g32_t1r1, int4q8_g64_t1r1, int4q8_g128_t1r1};

static const mc_rows_fn int4q8_xfns[3][9] = {
    {0, int4q8_g32_t1, int4q8_g32_x2, int4q8_g32_x3, int4q8_g32_x4, int4q8_g32_x5, int4q8_g32_x6, int4q8_g32_x7,
     int4q8_g32_x8},
    {0, int4q8_g64_t1, int4q8_g64_x2, int4q8_g64_x3, int4q8_g64_x4, int4q8_g64_x5, int4q8_g64_x6, int4q8_g64_x7,
     int4q8_g64_x8},
    {0, int4q8_g128_t1, int4q8_g128_x2, int4q8_g128_x3, int4q8_g128_x4, int4q8_g128_x5, int4q8_g128_x6,
     int4q8_g128_x7, int4q8_g128_x8},
};

/* Prompts: the 8-row kernels take x a slice of 8 rows at a time, and run through one by one, each slice
 * streamed every weight from memory again (16 passes at 128 tokens). int4q8_sliced instead walks a block of
 * weight rows (MC_INT4_BLOCK_BYTES, which stays in L2) through every slice of x in turn before the next
 * block, so the weights come from memory once per MC_INT4_SLICE_ROWS rows of x. Each (row, token) is still
 * summed by the same 8-row kernel (c->fns[rows]), so no result changes. MC_INT4_UNSLICED: the old order. */
#ifndef MC_INT4_BLOCK_BYTES
#define MC_INT4_BLOCK_BYTES (128 * 1024)
#endif
#ifndef MC_INT4_SLICE_ROWS
#define MC_INT4_SLICE_ROWS 128 /* rows of x prepared at once: 1.8 MB at K = 14336, within L3 */
#endif
/* the slices must be the 8-row slices one_pass takes, or the sums' order (and bits) would change */
_Static_assert(MC_INT4_SLICE_ROWS % 8 == 0 && MC_INT4_SLICE_ROWS > 0, "MC_INT4_SLICE_ROWS: a multiple of 8");
MC_MAYBE_UNUSED static void int4q8_sliced(const mc_ctx *c, int64_t lo, int64_t hi)
{
    const int64_t K = c->K, xd_row = c->G == 128 ? K / 128 : K / 8, xs_row = K / c->G;
    int64_t rows = MC_INT4_BLOCK_BYTES / (K / 2);
    rows = rows < MC_RB ? MC_RB : rows / MC_RB * MC_RB;
    for (int64_t nb = lo; nb < hi; nb += rows) {
        const int64_t ne = nb + rows < hi ? nb + rows : hi;
        for (int t0 = 0; t0 < c->TA; t0 += 8) {
            mc_ctx s = *c;
            s.T = c->TA - t0 < 8 ? c->TA - t0 : 8;
            s.x = c->x + t0 * K;
            s.xq = c->xq + t0 * K;
            s.xd = c->xd + t0 * xd_row;
            s.xs = c->xs + t0 * xs_row;
            s.y = c->y + t0 * c->N;
            c->fns[s.T](&s, nb, ne);
        }
    }
}

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
#if MC_AVX512
            /* the AVX-512 kernel's order: per 128 columns the four blocks' even halves, then their odd ones,
             * so that one 512-bit load takes each; the last 64 columns of a row (K % 128 == 64) as in AVX2 */
            const int64_t base = (32 * b) & ~(int64_t)127;
            const int whole = base + 128 <= K;
            int8_t *dst = xq + t * K + (whole ? base + 16 * (b % 4) : (b / 2) * 64 + 16 * (b % 2));
            const int64_t odd = whole ? 64 : 32;
#else
            int8_t *dst = xq + t * K + (b / 2) * 64 + 16 * (b % 2);
            const int64_t odd = 32;
#endif
            _mm_store_si128((__m128i *)dst, _mm256_castsi256_si128(q));
            _mm_store_si128((__m128i *)(dst + odd), _mm256_extracti128_si256(q, 1));
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

#endif /* MC_AVX2 */
