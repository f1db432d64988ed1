/*
 * decode.c: one decoded token through a transformer layer in a single call (part of kernels.c, after
 * onepass.c, whose one-pass kernels it drives).
 *
 * A 7B decode step is 32 layers of about 40 small torch ops each (norms, rotary, cache writes,
 * attention, activation, residual adds) around the weight products. Each op costs a few microseconds of
 * dispatch and a thread-pool hand-off even on a 4096-element vector: measured 40-65 ms per token, a
 * quarter of an int4 step. Here the same arithmetic runs as plain loops between the products:
 *   attention block: h += wo(attend(rope(wq xn), rope(wk xn), wv xn)), xn = rmsnorm(h) * attn_norm
 *   feed-forward:    h += w2(silu(w1 xn) * w3 xn),                     xn = rmsnorm(h) * ffn_norm
 * in fp32, with keys and values stored into the caller's KV cache (bf16 or fp32) at the given slot.
 * Only weights the one-pass kernels take; everything else stays in model.py, which is also the
 * reference these functions are tested against.
 *
 * T > 1 tokens (drafting's verify pass) are T decoded tokens at once, each row bit for bit what the
 * one-token step gives it: the products go through the row-exact kernels (one read of each weight for
 * all T), and everything between them runs row by row in the one-token order, token t's key written
 * just before token t attends (a rolling window's slot may be one that token t still needs).
 */

/* Everything about one layer that does not change between tokens (built once by kernels.DecodeLayer).
 * Weights in order wq, wk, wv, wo, w1, w2, w3; w1..w3 may be absent (MoE layers: the experts stay in
 * Python). All weights share one format: kind 0 bf16 [N, K]; 1 int8 + fp32 scale [N]; 2 int4 + fp16 scale
 * and zero [N, K/G]. */
typedef struct {
    int32_t kind, group;
    int32_t n_heads, n_kv_heads, head_dim, has_ffn;
    int32_t norm_bf16, unused;
    int64_t dim, hidden;
    float eps;
    const void *attn_norm, *ffn_norm; /* [dim], bf16 when norm_bf16 else fp32 */
    const void *w[7];
    const void *scale[7], *zero[7]; /* int8: fp32 scale; int4: fp16 scale and zero */
} mc_layer;

/* A Mixtral feed-forward (router and experts) for the fused step. w/scale/zero hold n_experts * 3 entries,
 * expert e's w1, w2, w3 at 3e, 3e + 1, 3e + 2, all in one format (kind, group); with w2_transposed
 * (bf16 torrent layout) every w2 is stored [hidden, dim]. The router is bf16 [n_experts, dim]. */
typedef struct {
    int32_t kind, group, n_experts, top_k, norm_bf16, w2_transposed;
    int64_t dim, hidden;
    float eps;
    const void *ffn_norm;
    const uint16_t *gate;
    const void *const *w;
    const void *const *scale, *const *zero;
} mc_moe;

/* Scratch for the vectors between the products: separate from mc_scratch, which one_pass uses for x. */
static __thread void *tl_dbuf;
static __thread size_t tl_dcap;

MC_MAYBE_UNUSED static float *mc_decode_scratch(size_t floats)
{
    size_t bytes = floats * sizeof(float);
    if (bytes > tl_dcap) {
        free(tl_dbuf);
        tl_dcap = (bytes + 4095) & ~(size_t)4095;
        tl_dbuf = aligned_alloc(64, tl_dcap);
        if (!tl_dbuf) tl_dcap = 0;
    }
    return (float *)tl_dbuf;
}

MC_MAYBE_UNUSED static inline uint16_t f32_to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);                 /* round to nearest even */
}

#if MC_AVX2

/* e^x for 8 lanes: x = n ln2 + r, |r| <= ln2/2, e^r by a degree-6 polynomial (Cephes' expf
 * coefficients, ~1 ulp), 2^n built in the exponent bits. Clamped so n stays a normal exponent. */
MC_INLINE __m256 exp8(__m256 x)
{
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

MC_INLINE float exp1(float x)
{
    return _mm256_cvtss_f32(exp8(_mm256_set1_ps(x)));
}

MC_INLINE __m256 load8_kv(const void *p, int64_t i, int bf16)
{
    if (!bf16) return _mm256_loadu_ps((const float *)p + i);
    return _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i))), 16));
}

MC_INLINE float kv_at(const void *p, int64_t i, int bf16)
{
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* y = x / rms(x) * w, as torch's rms_norm(x) * weight: the sum of squares in fp32 over 8 lanes. */
static void rms_norm(const float *x, const void *wv, int w_bf16, int64_t n, float eps, float *y)
{
    __m256 s = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        s = _mm256_fmadd_ps(v, v, s);
    }
    float ss = hsum8(s);
    for (; i < n; i++) ss += x[i] * x[i];
    float r = 1.f / sqrtf(ss / (float)n + eps);
    __m256 rv = _mm256_set1_ps(r);
    for (i = 0; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), rv), load8_kv(wv, i, w_bf16)));
    for (; i < n; i++) y[i] = x[i] * r * kv_at(wv, i, w_bf16);
}

/* Interleaved pairs (x[2j], x[2j+1]) times the complex rot[j] = (cos, sin), for `heads` heads. */
static void rope(float *x, int heads, int hd, const float *rot)
{
    for (int h = 0; h < heads; h++) {
        float *v = x + (int64_t)h * hd;
        for (int j = 0; j < hd / 2; j++) {
            float a = v[2 * j], b = v[2 * j + 1], c = rot[2 * j], s = rot[2 * j + 1];
            v[2 * j] = a * c - b * s;
            v[2 * j + 1] = a * s + b * c;
        }
    }
}

/* One query head against slots [0, S) of its kv head: softmax(q k^T / sqrt(hd)) v, masked slots left
 * out (mask[s] == 0), as scaled_dot_product_attention with a boolean mask. p: S floats of scratch. */
static void attend_head(const float *q, const void *kh, const void *vh, int hd, int64_t S, const uint8_t *mask,
                        int bf16, float *p, float *out)
{
    const float scale = 1.f / sqrtf((float)hd);
    float m = -INFINITY;
    for (int64_t s = 0; s < S; s++) {
        if (mask && !mask[s]) {
            p[s] = -INFINITY;
            continue;
        }
        const int64_t base = s * hd;
        __m256 acc = _mm256_setzero_ps();
        int j = 0;
        for (; j + 8 <= hd; j += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + j), load8_kv(kh, base + j, bf16), acc);
        float d = hsum8(acc);
        for (; j < hd; j++) d += q[j] * kv_at(kh, base + j, bf16);
        p[s] = d * scale;
        if (p[s] > m) m = p[s];
    }
    float sum = 0.f;
    for (int64_t s = 0; s < S; s++) {
        p[s] = p[s] == -INFINITY ? 0.f : exp1(p[s] - m);
        sum += p[s];
    }
    const float inv = 1.f / sum;
    for (int j = 0; j < hd; j++) out[j] = 0.f;
    for (int64_t s = 0; s < S; s++) {
        if (p[s] == 0.f) continue;
        const __m256 w = _mm256_set1_ps(p[s] * inv);
        const int64_t base = s * hd;
        int j = 0;
        for (; j + 8 <= hd; j += 8)
            _mm256_storeu_ps(out + j, _mm256_fmadd_ps(w, load8_kv(vh, base + j, bf16), _mm256_loadu_ps(out + j)));
        for (; j < hd; j++) out[j] += p[s] * inv * kv_at(vh, base + j, bf16);
    }
}

/* gate[i] <- silu(gate[i]) * up[i] */
static void silu_mul(float *gate, const float *up, int64_t n)
{
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 g = _mm256_loadu_ps(gate + i);
        __m256 sig = _mm256_div_ps(_mm256_set1_ps(1.f), _mm256_add_ps(_mm256_set1_ps(1.f),
                                                                     exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
        _mm256_storeu_ps(gate + i, _mm256_mul_ps(_mm256_mul_ps(g, sig), _mm256_loadu_ps(up + i)));
    }
    for (; i < n; i++) gate[i] = gate[i] / (1.f + exp1(-gate[i])) * up[i];
}

static int layer_ok(const mc_layer *L)
{
    if (L->kind < 0 || L->kind > 2 || L->n_heads < 1 || L->n_kv_heads < 1 || L->n_heads % L->n_kv_heads ||
        L->head_dim < 2 || L->head_dim % 2 || L->dim < 1)
        return 0;
    const int64_t qd = (int64_t)L->n_heads * L->head_dim;
    const int64_t ks[4] = {L->dim, qd, L->dim, L->hidden};
    for (int i = 0; i < (L->has_ffn ? 4 : 2); i++) {
        if (L->kind == 1 && ks[i] % 32) return 0;
        if (L->kind == 2 && !int4_args_ok(1, ks[i], 1, L->group)) return 0;
    }
    return 1;
}

/* o[T, D] = w2(silu(w1 xn) * w3 xn) for T tokens (row-exact): the dense feed-forward and each MoE expert. w,
 * scale and zero hold w1, w2, w3 in that order; with w2_transposed w2 is bf16 stored [F, D]. buf: 2TF floats. */
static int swiglu(int kind, int group, int w2_transposed, const void *const *w, const void *const *scale,
                  const void *const *zero, const float *xn, int T, int64_t D, int64_t F, float *buf, float *o)
{
    float *gate = buf, *up = gate + (int64_t)T * F;
    const void *w13[2] = {w[0], w[2]};
    const void *s13[2] = {scale[0], scale[2]}, *z13[2] = {zero[0], zero[2]};
    const int64_t nf[2] = {F, F};
    float *const y13[2] = {gate, up};
    int rc = one_pass(kind, xn, T, D, 2, w13, s13, z13, group, nf, y13, 1);
    if (rc) return rc;
    /* row by row: a row's tail past its last 8 lanes takes the scalar formula, as with T = 1 */
    for (int t = 0; t < T; t++) silu_mul(gate + (int64_t)t * F, up + (int64_t)t * F, F);
    if (w2_transposed) { /* one row at a time: the transposed kernels' sums depend on T */
        for (int t = 0; t < T && rc == 0; t++)
            rc = mc_linear_bf16_t(gate + (int64_t)t * F, 1, F, (const uint16_t *)w[1], D, o + (int64_t)t * D);
        return rc;
    }
    float *const yo[1] = {o};
    return one_pass(kind, gate, T, F, 1, &w[1], &scale[1], &zero[1], group, &D, yo, 1);
}

/* n products of x (T tokens, row-exact) with weights L->w[first..first+n), outputs N[i] into y[i]. */
static int products(const mc_layer *L, const float *x, int T, int64_t K, int first, int n, const int64_t *N,
                    float *const *y)
{
    return one_pass(L->kind, x, T, K, n, &L->w[first], &L->scale[first], &L->zero[first], L->group, N, y, 1);
}

#endif /* MC_AVX2 */

/* h[T, dim] += attention block of T tokens (T = 1: one decoded token), token t at cache slot slot[t]
 * attending to slots [0, S[t]) of its kv head, those with mask[t * mask_stride + s] == 0 left out (mask may be
 * NULL: all of them); k_cache/v_cache are this layer's [n_kv_heads, capacity, head_dim] (bf16 when cache_bf16,
 * else fp32); rot[t] is token t's (cos, sin) pairs, [T][head_dim / 2][2]. */
MC_API int mc_decode_attention(const mc_layer *L, float *h, int T, const float *rot, void *k_cache, void *v_cache,
                               int cache_bf16, int64_t capacity, const int64_t *slot, const int64_t *S,
                               const uint8_t *mask, int64_t mask_stride)
{
#if MC_AVX2
    if (!layer_ok(L) || T < 1 || T > 64) return MC_EBADARG;
    int64_t smax = 1;
    for (int t = 0; t < T; t++) {
        if (slot[t] < 0 || slot[t] >= capacity || S[t] < 1 || S[t] > capacity || (mask && S[t] > mask_stride))
            return MC_EBADARG;
        if (S[t] > smax) smax = S[t];
    }
    const int H = L->n_heads, Hkv = L->n_kv_heads, hd = L->head_dim;
    const int64_t D = L->dim, qd = (int64_t)H * hd, kvd = (int64_t)Hkv * hd;
    float *buf = mc_decode_scratch((size_t)T * (size_t)(D + qd + 2 * kvd + qd + D) + (size_t)H * (size_t)smax);
    if (!buf) return MC_ENOMEM;
    float *xn = buf, *q = xn + T * D, *k = q + T * qd, *v = k + T * kvd, *att = v + T * kvd, *o = att + T * qd;
    float *p = o + T * D;

    for (int t = 0; t < T; t++) rms_norm(h + t * D, L->attn_norm, L->norm_bf16, D, L->eps, xn + t * D);
    const int64_t nqkv[3] = {qd, kvd, kvd};
    float *const yqkv[3] = {q, k, v};
    int rc = products(L, xn, T, D, 0, 3, nqkv, yqkv);
    if (rc) return rc;
    const size_t el = cache_bf16 ? 2 : 4;
    const int per_group = H / Hkv;
    for (int t = 0; t < T; t++) {
        float *qt = q + t * qd, *kt = k + t * kvd, *vt = v + t * kvd;
        const float *rt = rot + (int64_t)t * hd;
        rope(qt, H, hd, rt);
        rope(kt, Hkv, hd, rt);
        for (int g = 0; g < Hkv; g++) {
            const int64_t at = ((int64_t)g * capacity + slot[t]) * hd;
            for (int j = 0; j < hd; j++) {
                if (cache_bf16) {
                    ((uint16_t *)k_cache)[at + j] = f32_to_bf16(kt[g * hd + j]);
                    ((uint16_t *)v_cache)[at + j] = f32_to_bf16(vt[g * hd + j]);
                } else {
                    ((float *)k_cache)[at + j] = kt[g * hd + j];
                    ((float *)v_cache)[at + j] = vt[g * hd + j];
                }
            }
        }
        const int64_t St = S[t];
        const uint8_t *mt = mask ? mask + t * mask_stride : NULL;
        /* Heads in contiguous runs per thread, so the heads that share a kv head share its reads. */
        const int nt = (int64_t)H * St * hd < 65536 ? 1 : g_threads < H ? g_threads : H;
#ifdef _OPENMP
#pragma omp parallel for num_threads(nt) schedule(static)
#endif
        for (int hh = 0; hh < H; hh++) {
            const int64_t off = (int64_t)(hh / per_group) * capacity * hd;
            attend_head(qt + (int64_t)hh * hd, (const char *)k_cache + off * el, (const char *)v_cache + off * el, hd,
                        St, mt, cache_bf16, p + (int64_t)hh * St, att + t * qd + (int64_t)hh * hd);
        }
    }
    const int64_t nd = D;
    float *const yo[1] = {o};
    rc = products(L, att, T, qd, 3, 1, &nd, yo);
    if (rc) return rc;
    for (int64_t i = 0; i < T * D; i++) h[i] += o[i];
    return 0;
#else
    (void)L; (void)h; (void)T; (void)rot; (void)k_cache; (void)v_cache; (void)cache_bf16; (void)capacity; (void)slot;
    (void)S; (void)mask; (void)mask_stride;
    return MC_EBADARG;
#endif
}

/* h[T, dim] += w2(silu(w1 xn) * w3 xn), xn = rmsnorm(h) * ffn_norm: the dense feed-forward of T tokens. */
MC_API int mc_decode_ffn(const mc_layer *L, float *h, int T)
{
#if MC_AVX2
    if (!layer_ok(L) || !L->has_ffn || L->hidden < 1 || T < 1 || T > 64) return MC_EBADARG;
    const int64_t D = L->dim, F = L->hidden;
    float *buf = mc_decode_scratch((size_t)T * (size_t)(2 * D + 2 * F));
    if (!buf) return MC_ENOMEM;
    float *xn = buf, *o = xn + T * D;
    for (int t = 0; t < T; t++) rms_norm(h + t * D, L->ffn_norm, L->norm_bf16, D, L->eps, xn + t * D);
    int rc = swiglu(L->kind, L->group, 0, &L->w[4], &L->scale[4], &L->zero[4], xn, T, D, F, o + T * D, o);
    if (rc) return rc;
    for (int64_t i = 0; i < T * D; i++) h[i] += o[i];
    return 0;
#else
    (void)L; (void)h; (void)T;
    return MC_EBADARG;
#endif
}

/* dst += w * src with each product rounded before the add (no fused multiply-add): an expert's share of a row
 * is then the same number wherever it is computed, so the sums the expert split adds across ranks
 * (mixchat.distributed) are the one process's, bit for bit. */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
static void add_weighted(float *dst, const float *src, float w, int64_t n)
{
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
    for (int64_t c = 0; c < n; c++) dst[c] += src[c] * w;
}

/* The MoE feed-forward of T tokens (T = 1: one decoded token), in two phases so that a caller whose experts
 * are loaded on demand can fetch the chosen ones in between (phase 1 | 2 does both):
 *   phase 1: xn[T, dim] = rmsnorm(h) * ffn_norm; router; per token the top_k experts by router logit into
 *            chosen[T, top_k], best first (the lower index wins a tie), and a softmax over their logits into
 *            weights[T, top_k];
 *   phase 2: h[t] += sum over token t's chosen experts, in ascending id as model.MoeFeedForward adds them, of
 *            weight * w2(silu(w1 xn) * w3 xn). Each expert runs once, on the rows routed to it (row-exact), so
 *            every token's sum is the one-token step's. Only the chosen experts' pointers need to be set.
 *   phase bit 4 (with 2): an expert without weights is held by another rank (mixchat.distributed's expert
 *            split): it is left out of the sum, which the caller adds across ranks (into an h of zeros). */
MC_API int mc_decode_moe(const mc_moe *M, float *h, int T, float *xn, int64_t *chosen, float *weights, int phase)
{
#if MC_AVX2
    if (M->n_experts < 1 || M->n_experts > 256 || M->top_k < 1 || M->top_k > M->n_experts || M->dim < 1 || T < 1 ||
        T > 64)
        return MC_EBADARG;
    /* the experts' format matters from phase 2 on (routing needs only the router) */
    if ((phase & 2) && (M->kind < 0 || M->kind > 2 || M->hidden < 1 || (M->w2_transposed && M->kind != 0) ||
                        (M->kind == 1 && (M->dim % 32 || M->hidden % 32)) ||
                        (M->kind == 2 && (!int4_args_ok(1, M->dim, 1, M->group) ||
                                          !int4_args_ok(1, M->hidden, 1, M->group)))))
        return MC_EBADARG;
    const int64_t D = M->dim, F = M->hidden;
    const int E = M->n_experts, k = M->top_k;
    if (phase < 1 || phase > 7 || phase == 4 || phase == 5) return MC_EBADARG;
    const int partial = phase & 4;
    /* out, the routed rows of xn, their expert outputs: T x D each; the expert's 2 T F; the router's T E */
    float *buf = mc_decode_scratch((size_t)T * (size_t)(3 * D + 2 * F + E));
    if (!buf) return MC_ENOMEM;
    float *out = buf, *xe = out + T * D, *oe = xe + T * D, *ebuf = oe + T * D, *logits = ebuf + 2 * T * F;
    int rc;
    if (phase & 1) {
        for (int t = 0; t < T; t++) rms_norm(h + t * D, M->ffn_norm, M->norm_bf16, D, M->eps, xn + t * D);
        const void *gw = M->gate;
        const int64_t ne = E;
        float *const yl[1] = {logits};
        rc = one_pass(0, xn, T, D, 1, &gw, NULL, NULL, 0, &ne, yl, 1);
        if (rc) return rc;
        for (int t = 0; t < T; t++) {
            const float *lt = logits + (int64_t)t * E;
            int64_t *ct = chosen + (int64_t)t * k;
            float *wt = weights + (int64_t)t * k;
            uint8_t taken[256] = {0};
            float top[256];
            for (int j = 0; j < k; j++) {
                int best = -1;
                for (int e = 0; e < E; e++)
                    if (!taken[e] && (best < 0 || lt[e] > lt[best])) best = e;
                taken[best] = 1;
                ct[j] = best;
                top[j] = lt[best];
            }
            float sum = 0.f;
            for (int j = 0; j < k; j++) sum += (wt[j] = exp1(top[j] - top[0]));
            for (int j = 0; j < k; j++) wt[j] /= sum;
        }
    }
    if (!(phase & 2)) return 0;
    for (int64_t i = 0; i < (int64_t)T * k; i++)
        if (chosen[i] < 0 || chosen[i] >= E || (!partial && (!M->w[3 * chosen[i]] || !M->w[3 * chosen[i] + 1] ||
                                                             !M->w[3 * chosen[i] + 2])))
            return MC_EBADARG;
    for (int64_t i = 0; i < T * D; i++) out[i] = 0.f;
    int rows[64];
    float mix[64];
    for (int e = 0; e < E; e++) {
        if (partial && (!M->w[3 * e] || !M->w[3 * e + 1] || !M->w[3 * e + 2])) continue;
        int n = 0;
        for (int t = 0; t < T; t++)
            for (int j = 0; j < k; j++)
                if (chosen[(int64_t)t * k + j] == e) {
                    rows[n] = t;
                    mix[n++] = weights[(int64_t)t * k + j];
                    break;
                }
        if (!n) continue;
        for (int i = 0; i < n; i++) memcpy(xe + i * D, xn + rows[i] * D, (size_t)D * sizeof(float));
        rc = swiglu(M->kind, M->group, M->w2_transposed, &M->w[3 * e], &M->scale[3 * e], &M->zero[3 * e], xe, n, D, F,
                    ebuf, oe);
        if (rc) return rc;
        for (int i = 0; i < n; i++) add_weighted(out + rows[i] * D, oe + i * D, mix[i], D);
    }
    for (int64_t i = 0; i < T * D; i++) h[i] += out[i];
    return 0;
#else
    (void)M; (void)h; (void)T; (void)xn; (void)chosen; (void)weights; (void)phase;
    return MC_EBADARG;
#endif
}

/* sizeof the structs above, so the Python side can check its ctypes copies of them (kernels.py's
 * _LayerStruct and _MoeStruct): which 0 = mc_layer, 1 = mc_moe; -1 for any other. */
MC_API int64_t mc_struct_size(int which)
{
    return which == 0 ? (int64_t)sizeof(mc_layer) : which == 1 ? (int64_t)sizeof(mc_moe) : -1;
}
