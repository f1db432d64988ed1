/*
 * onepass.c (part of kernels.c): the exported mc_linear_* entry points and one_pass, which runs several
 * weights of one format against the same x in one thread region (x prepared once per slice of 8 rows; int4
 * prompts up to 128 rows at once).
 * Each entry point picks its path: the GEMM from mc_get_gemm_min_rows() rows of x, one_pass below it, the
 * portable loops without AVX2. In one file because mc_linear_multi and the fallbacks call across formats.
 */

#if MC_AVX2

MC_MAYBE_UNUSED static int group_index(int G) { return G == 32 ? 0 : G == 64 ? 1 : 2; }

/* The one-pass kernels for n weights that share x (kind 0: bf16; 1: int8 with Q8 x; 2: int4 with Q8 x):
 * x is taken in slices of up to 8 rows, each slice prepared once (reordered, or rounded to int8, row by
 * row) and run against every weight in one thread region (mc_run_jobs). int4 prompts prepare up to
 * MC_INT4_SLICE_ROWS rows at once, and each job walks its rows in blocks through all their 8-row slices
 * (int4q8_sliced). The single-weight entry points are the n = 1 case.
 * exact: every row of y is bit for bit what a call with that row of x alone gives (the row-exact drivers),
 * which drafting's verify pass needs to reproduce plain decoding; otherwise each row count gets the
 * accumulator layout that is fastest for it, which changes the order of the fp32 sums. */
static int one_pass(int kind, const float *x, int T, int64_t K, int n, const void *const *w,
                    const void *const *scale, const void *const *zero, int G, const int64_t *N, float *const *y,
                    int exact)
{
#ifndef MC_INT4_UNSLICED
    const int rows = kind == 2 && T > 8 ? MC_INT4_SLICE_ROWS : 8;
#else
    const int rows = 8;
#endif
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
            /* the row-exact drivers carry their sums across chunks (bf16_block_c), so they chunk too */
            c.KC = tt >= 3 ? mc_chunk(K32, 4.0 * tt) : (K32 > 0 ? K32 : 1);
            fn = exact ? bf16_xfns[tt] : bf16_fns[tt];
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
                fn = exact ? int8q8_xfns[tt] : int8q8_fns[tt];
            } else {
                prep_q8(xt, tt, K, G, xq, xd, xs);
                c.xs = xs;
                const mc_rows_fn *fns = (exact ? int4q8_xfns : int4q8_fns)[group_index(G)];
                if (tt > 8) { /* the same kernels, 8 rows of x at a time, each weight block through all */
                    c.TA = tt;
                    c.fns = fns;
                    fn = int4q8_sliced;
                } else {
                    fn = fns[tt];
                }
            }
            c.xq = xq;
            c.xd = xd;
        }
        if (tt == 1 && mc_one_row_applies(kind, K) == 1) /* kind is the MC_FMT_* of the weights */
            fn = kind == 0 ? bf16_rows_t1r1 : kind == 1 ? int8q8_t1r1 : int4q8_r1fns[group_index(G)];
        for (int i = 0; i < n; i++) {
            jobs[i] = (mc_job){fn, c, 0};
            jobs[i].c.w = w[i];
            jobs[i].c.N = N[i];
            /* the kernels index y[t * N + n]: a slice of rows of x is a slice of rows of y */
            jobs[i].c.y = y[i] + (int64_t)t0 * N[i];
            if (kind == 1) jobs[i].c.scale = (const float *)scale[i];
            if (kind == 2) {
                jobs[i].c.hscale = (const uint16_t *)scale[i];
                jobs[i].c.hzero = (const uint16_t *)zero[i];
            }
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
#if MC_BF16DOT
        if (g_gemm_bf16dot && K % 32 == 0) return gemm2_run(&c, pack2_bf16);
#endif
        return gemm_run(&c, pack_bf16);
    }
    const void *wv = w;
    return one_pass(0, x, T, K, 1, &wv, NULL, NULL, 0, &N, &y, 0);
#else
    mc_ctx c = {.x = x, .w = w, .y = y, .N = N, .K = K, .T = T};
    mc_run(bf16_rows_scalar, &c, 0);
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
        mc_run(int8_fns[tt], &c, 0);
    }
#else
    mc_ctx c = {.x = x, .w = q, .scale = scale, .y = y, .N = N, .K = K, .T = T};
    mc_run(int8_rows_scalar, &c, 0);
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
 * it faster: for fewer than the GEMM's rows and K % 32 == 0; from the GEMM's rows on, with vdpbf16ps,
 * rounded to bf16 for the vdpbf16ps GEMM. Otherwise it is mc_linear_int8 (x exact). */
MC_API int mc_linear_int8_q8(const float *x, int T, int64_t K, const int8_t *q, const float *scale, int64_t N,
                             float *y)
{
    if (T < 1 || K < 1 || N < 1) return MC_EBADARG;
#if MC_BF16DOT
    /* prompts: the vdpbf16ps GEMM rounds x to bf16 instead (finer than Q8, and exact int8 weights) */
    if (T >= g_gemm_min_rows && g_gemm_bf16dot && K % 32 == 0) {
        mc_ctx c = {.x = x, .w = q, .scale = scale, .y = y, .N = N, .K = K, .T = T};
        return gemm2_run(&c, pack2_int8);
    }
#endif
    if (T >= g_gemm_min_rows || K % 32) return mc_linear_int8(x, T, K, q, scale, N, y);
#if MC_AVX2
    const void *wv = q;
    const void *sv = scale;
    return one_pass(1, x, T, K, 1, &wv, &sv, NULL, 0, &N, &y, 0);
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

MC_API int mc_linear_int4(const float *x, int T, int64_t K, const uint8_t *packed, const uint16_t *scale,
                          const uint16_t *zero, int G, int64_t N, float *y)
{
    if (!int4_args_ok(T, K, N, G)) return MC_EBADARG;
#if MC_AVX2
    if (T >= g_gemm_min_rows) { /* exact x: rounding it buys nothing once FMAs, not bytes, are the limit */
        mc_ctx c = {.x = x, .w = packed, .hscale = scale, .hzero = zero, .y = y, .N = N, .K = K, .T = T, .G = G};
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
        mc_ctx c = {.x = xt, .xp = xp, .xs = xs, .w = packed, .hscale = scale, .hzero = zero,
                    .y = y + (int64_t)t0 * N, .N = N, .K = K, .KC = K, .T = tt, .G = G};
        mc_run(int4_fns[group_index(G)][tt], &c, 0);
    }
#else
    mc_ctx c = {.x = x, .w = packed, .hscale = scale, .hzero = zero, .y = y, .N = N, .K = K, .T = T, .G = G};
    mc_run(int4_rows_scalar, &c, 0);
#endif
    return 0;
}

MC_API int mc_linear_int4_q8(const float *x, int T, int64_t K, const uint8_t *packed, const uint16_t *scale,
                             const uint16_t *zero, int G, int64_t N, float *y)
{
    if (!int4_args_ok(T, K, N, G)) return MC_EBADARG;
#if MC_AVX2
    /* Every row count: integer multiply-adds on 8 rows of x per pass beat the fp32 GEMM on prompts too
     * (126-141 against 113-116 GFLOP/s on a 7B's shapes at T = 128, 2 cores), unlike int8, whose GEMM
     * converts a byte per weight with no unpacking to share. */
    const void *wv = packed, *sv = scale, *zv = zero;
    return one_pass(2, x, T, K, 1, &wv, &sv, &zv, G, &N, &y, 0);
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
        mc_run(bf16t_fns[tt], &c, 1); /* rows here are output columns */
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

/* The checks mc_linear_multi and mc_linear_rows share: n weights of one kind, each with outputs, int4's K. */
static int multi_args_ok(int kind, int T, int64_t K, int n, int G, const int64_t *N)
{
    if (n < 1 || n > MC_MULTI_MAX || T < 1 || K < 1 || kind < 0 || kind > 2) return 0;
    for (int i = 0; i < n; i++) {
        if (N[i] < 1) return 0;
        if (kind == 2 && !int4_args_ok(T, K, N[i], G)) return 0;
    }
    return 1;
}

/* One weight of `kind` through its single entry point (what the multi-weight calls fall back to). */
static int single_product(int kind, const float *x, int T, int64_t K, const void *w, const void *scale,
                          const void *zero, int G, int64_t N, float *y)
{
    return kind == 0   ? mc_linear_bf16(x, T, K, (const uint16_t *)w, N, y)
           : kind == 1 ? mc_linear_int8_q8(x, T, K, (const int8_t *)w, (const float *)scale, N, y)
                       : mc_linear_int4_q8(x, T, K, (const uint8_t *)w, (const uint16_t *)scale,
                                           (const uint16_t *)zero, G, N, y);
}

/* Several products of the same x, in one thread region (see mc_run_jobs): y_i = x w_i^T for
 * i < n, every w_i [N_i, K] in one format. kind 0: bf16 as mc_linear_bf16; 1: int8 as mc_linear_int8_q8
 * (scale[i]); 2: int4 as mc_linear_int4_q8 (scale[i], zero[i], G). x is prepared once for all of them.
 * From the GEMM's row count on, or without AVX2, the single entry points run in turn. */
MC_API int mc_linear_multi(int kind, const float *x, int T, int64_t K, int n, const void *const *w,
                           const void *const *scale, const void *const *zero, int G, const int64_t *N,
                           float *const *y)
{
    if (!multi_args_ok(kind, T, K, n, G, N)) return MC_EBADARG;
#if MC_AVX2
    if (T < g_gemm_min_rows && (kind != 1 || K % 32 == 0))
        return one_pass(kind, x, T, K, n, w, scale, zero, G, N, y, 0);
#endif
    for (int i = 0; i < n; i++) {
        int rc = single_product(kind, x, T, K, w[i], scale ? scale[i] : NULL, zero ? zero[i] : NULL, G, N[i], y[i]);
        if (rc) return rc;
    }
    return 0;
}

/* mc_linear_multi with every row of y bit for bit what the one-token call (T = 1, which is also what a
 * decoded token's layer step runs) gives for that row of x alone, whatever T: the products of drafting's
 * verify pass. Slower per row than mc_linear_multi's layouts for T > 1, still one read of each weight per
 * 8 rows. Without AVX2 (or for int8 with K % 32 != 0) the rows go one at a time through the entry points. */
MC_API int mc_linear_rows(int kind, const float *x, int T, int64_t K, int n, const void *const *w,
                          const void *const *scale, const void *const *zero, int G, const int64_t *N,
                          float *const *y)
{
    if (!multi_args_ok(kind, T, K, n, G, N)) return MC_EBADARG;
#if MC_AVX2
    if (kind != 1 || K % 32 == 0) return one_pass(kind, x, T, K, n, w, scale, zero, G, N, y, 1);
#endif
    for (int t = 0; t < T; t++)
        for (int i = 0; i < n; i++) {
            int rc = single_product(kind, x + (int64_t)t * K, 1, K, w[i], scale ? scale[i] : NULL,
                                    zero ? zero[i] : NULL, G, N[i], y[i] + (int64_t)t * N[i]);
            if (rc) return rc;
        }
    return 0;
}
