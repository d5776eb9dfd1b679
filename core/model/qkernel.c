/* int8 weights x int16 activations on AVX2, for gptchat's QuantLinear (core/model/quant.py).

   Weights: q int8 in groups of 4 output rows, each group stored as Kp/32 blocks of 4 rows x 32 inputs
   ([ceil(N/4), Kp/32, 4, 32], Kp = K rounded up to 32, zero padded), so that one group is read as a
   single forward stream; one fp32 scale per output row. Activations: each row of x quantized to int16
   with its own scale (max |x| / X16_MAX), so a row's result never depends on the other rows of a call.
   Products are summed exactly in int32 over 256 inputs at a time, then in fp32.
   Built at first use by core/model/native.py (gcc or cc, -O3 -mavx2 -mfma -fopenmp); its OpenMP calls
   resolve to the runtime PyTorch already loaded, so the kernel shares PyTorch's threads. */
#ifdef _OPENMP
#include <omp.h>
#endif
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* bytes ahead of the read in the int8 products (groups), chosen per machine by timing (gptchat_set_prefetch;
   core/model/quant.py). AMD Zen 4 (Genoa, 2 cores, int8 124M products alternating in one process against a plain
   read of as many bytes): 256 as fast as none and as the read itself (0.996 of it at ~36 GB/s, 0.73 at ~60), 512
   0.96, 768-2048 0.88-0.91 slow and 0.58-0.61 fast; AMD Milan had measured 2048-8192 alike, none 10% slower. A
   2-core Xeon with AMX the other way round: batch-1 decode at 0.56-0.59 of the read's ceiling with 256, 0.63 with
   512, 0.65-0.74 with 1024, 0.73-0.88 with 2048, 0.66-0.67 with 4096 */
static long prefetch_ahead = 256;
void gptchat_set_prefetch(long bytes) { prefetch_ahead = bytes; }
/* an activation row's largest |x| becomes this int16: not 32767, so that gptchat_split16's two bytes of every
   value, 256 h + l, keep h within [-127, 127], and both ways of multiplying an int8 product sum the same integers */
#define X16_MAX 32639
#define STREAMS 4     /* rows of a block read at once by one thread in a batch-1 product (dot_rows) */

/* bf16 is the top half of an fp32: widened exactly by a shift, so bf16 weights are multiplied in fp32 with
   plain AVX2 (the products are memory-bound at batch 1; the activations stay fp32). */
static inline __attribute__((always_inline)) __m256 bf8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
/* 8 floats at element i of p: fp32, or bf16 widened (bf a constant at each inlined call) */
static inline __attribute__((always_inline)) __m256 load8(const void *p, long i, int bf) {
    return bf ? bf8((const uint16_t *)p + i) : _mm256_loadu_ps((const float *)p + i);
}
static inline float ld1(const void *p, long i, int bf) {
    if (!bf) return ((const float *)p)[i];
    union { uint32_t u; float f; } c = {(uint32_t)((const uint16_t *)p)[i] << 16};
    return c.f;
}
/* fp32 -> bf16 rounded to nearest, ties to even, NaN kept quiet (as PyTorch converts) */
static inline uint16_t to_bf16(float f) {
    union { float f; uint32_t u; } c = {f};
    if ((c.u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((c.u + 0x7fffu + ((c.u >> 16) & 1u)) >> 16);
}

/* the sum of 8 floats */
static inline float hsum8(__m256 a) {
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    return _mm_cvtss_f32(_mm_add_ss(r, _mm_movehdup_ps(r)));
}

/* e^x for 8 floats: 2^n * e^r with |r| <= ln2/2, a degree-6 polynomial (relative error ~2e-7) */
/* (its constants, shared with exp16: the clamp, log2(e), ln2 in two parts, the polynomial's coefficients) */
#define EXP_LO -87.3f
#define EXP_HI 88.3f
#define EXP_LOG2E 1.44269504f
#define EXP_LN2_HI 0.693359375f
#define EXP_LN2_LO -2.12194440e-4f
#define EXP_P0 1.9875691500e-4f
#define EXP_P1 1.3981999507e-3f
#define EXP_P2 8.3334519073e-3f
#define EXP_P3 4.1665795894e-2f
#define EXP_P4 1.6666665459e-1f
#define EXP_P5 5.0000001201e-1f
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(EXP_LO)), _mm256_set1_ps(EXP_HI));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(EXP_LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_HI), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_LO), r);
    __m256 p = _mm256_set1_ps(EXP_P0);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P1));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P5));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static void groups(const int8_t *q, const float *s, const float *b, const int16_t *x, float xs, float *y,
                   long g0, long g1, long Kp, long N) {
    const long steps = Kp / 32;
    for (long g = g0; g < g1; g++) {
        const int8_t *p = q + g * Kp * 4;
        __m256 f0 = _mm256_setzero_ps(), f1 = f0, f2 = f0, f3 = f0;
        for (long c0 = 0; c0 < steps; c0 += 8) { /* 8 blocks: |sum| <= 256 * 127 * X16_MAX < 2^31 */
            long c1 = c0 + 8 < steps ? c0 + 8 : steps;
            __m256i i0 = _mm256_setzero_si256(), i1 = i0, i2 = i0, i3 = i0;
            for (long c = c0; c < c1; c++) {
                const int8_t *pc = p + c * 128;
                _mm_prefetch((const char *)(pc + prefetch_ahead), _MM_HINT_T0);
                _mm_prefetch((const char *)(pc + prefetch_ahead + 64), _MM_HINT_T0);
                __m256i xl = _mm256_loadu_si256((const __m256i *)(x + c * 32));
                __m256i xh = _mm256_loadu_si256((const __m256i *)(x + c * 32 + 16));
/* each half widened straight from memory: loading 32 bytes and extracting the high half cost ~25% of the loop's
   speed from cache (AMD EPYC Zen 4: 54 -> 68 GB/s on 2 cores) */
#define ROW(r, acc)                                                                                        \
    {                                                                                                      \
        const __m128i *w = (const __m128i *)(pc + 32 * r);                                                 \
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128(w)), xl));        \
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128(w + 1)), xh));    \
    }
                ROW(0, i0) ROW(1, i1) ROW(2, i2) ROW(3, i3)
#undef ROW
            }
            f0 = _mm256_add_ps(f0, _mm256_cvtepi32_ps(i0));
            f1 = _mm256_add_ps(f1, _mm256_cvtepi32_ps(i1));
            f2 = _mm256_add_ps(f2, _mm256_cvtepi32_ps(i2));
            f3 = _mm256_add_ps(f3, _mm256_cvtepi32_ps(i3));
        }
        __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(f0, f1), _mm256_hadd_ps(f2, f3));
        __m128 r = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        float t[4];
        _mm_storeu_ps(t, r);
        long n = g * 4;
        for (long i = 0; i < 4 && n + i < N; i++) y[n + i] = t[i] * xs * s[n + i] + (b ? b[n + i] : 0.f);
    }
}

/* groups g0..g1 widened to int16 once, into w16 ([g1 - g0, Kp/32, 4, 32] int16), for many activation rows */
static void widen(const int8_t *q, int16_t *w16, long g0, long g1, long Kp) {
    const int8_t *p = q + g0 * Kp * 4;
    for (long i = 0; i < (g1 - g0) * Kp * 4; i += 16)
        _mm256_storeu_si256((__m256i *)(w16 + i), _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p + i))));
}

/* groups2 on widened weights: two activation rows, no widening in the loop */
static void groups2w(const int16_t *w16, long g0, const float *s, const float *b, const int16_t *x, const int16_t *x2,
                     float xs, float xs2, float *y, float *y2, long a, long e, long Kp, long N) {
    const long steps = Kp / 32;
    for (long g = a; g < e; g++) {
        const int16_t *p = w16 + (g - g0) * Kp * 4;
        __m256 f[8];
        for (int i = 0; i < 8; i++) f[i] = _mm256_setzero_ps();
        for (long c0 = 0; c0 < steps; c0 += 8) {
            long c1 = c0 + 8 < steps ? c0 + 8 : steps;
            __m256i acc[8];
            for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_si256();
            for (long c = c0; c < c1; c++) {
                const int16_t *pc = p + c * 128;
                const __m256i xl = _mm256_loadu_si256((const __m256i *)(x + c * 32));
                const __m256i xh = _mm256_loadu_si256((const __m256i *)(x + c * 32 + 16));
                const __m256i zl = _mm256_loadu_si256((const __m256i *)(x2 + c * 32));
                const __m256i zh = _mm256_loadu_si256((const __m256i *)(x2 + c * 32 + 16));
                for (int r = 0; r < 4; r++) {
                    const __m256i wl = _mm256_loadu_si256((const __m256i *)(pc + 32 * r));
                    const __m256i wh = _mm256_loadu_si256((const __m256i *)(pc + 32 * r + 16));
                    acc[r] = _mm256_add_epi32(acc[r], _mm256_add_epi32(_mm256_madd_epi16(wl, xl), _mm256_madd_epi16(wh, xh)));
                    acc[4 + r] = _mm256_add_epi32(acc[4 + r], _mm256_add_epi32(_mm256_madd_epi16(wl, zl), _mm256_madd_epi16(wh, zh)));
                }
            }
            for (int i = 0; i < 8; i++) f[i] = _mm256_add_ps(f[i], _mm256_cvtepi32_ps(acc[i]));
        }
        for (int half = 0; half < 2; half++) {
            __m256 *h4 = f + 4 * half;
            __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(h4[0], h4[1]), _mm256_hadd_ps(h4[2], h4[3]));
            __m128 r = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
            float t[4];
            _mm_storeu_ps(t, r);
            const long n = g * 4;
            float *out = half ? y2 : y;
            const float sc = half ? xs2 : xs;
            for (long i = 0; i < 4 && n + i < N; i++) out[n + i] = t[i] * sc * s[n + i] + (b ? b[n + i] : 0.f);
        }
    }
}

/* x [M, K] fp32 -> x16 [M, Kp] int16 (zero padded), xs [M] */
/* a row's int16 scale: max |x| / X16_MAX (1 for a row of zeros or with an infinity or NaN) */
static float row_scale(const float *r, long K) {
    const __m256 nosign = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 a8 = _mm256_setzero_ps();
    long k = 0;
    for (; k + 8 <= K; k += 8) a8 = _mm256_max_ps(a8, _mm256_and_ps(_mm256_loadu_ps(r + k), nosign));
    float t[8], a = 0.f;
    _mm256_storeu_ps(t, a8);
    for (int i = 0; i < 8; i++) a = fmaxf(a, t[i]);
    for (; k < K; k++) a = fmaxf(a, fabsf(r[k]));
    return a > 0.f && isfinite(a) ? a / (float)X16_MAX : 1.f;
}

static void quantize_rows(const float *x, int16_t *x16, float *xs, long M, long K, long Kp) {
    for (long m = 0; m < M; m++) {
        const float *r = x + m * K;
        const float sc = row_scale(r, K);
        const __m256 inv = _mm256_set1_ps(1.f / sc);
        int16_t *o = x16 + m * Kp;
        long k = 0;
        for (; k + 16 <= K; k += 16) { /* round to nearest even, saturate to int16 */
            __m256i lo = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(r + k), inv));
            __m256i hi = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(r + k + 8), inv));
            _mm256_storeu_si256((__m256i *)(o + k), _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xd8));
        }
        for (; k < K; k++) o[k] = (int16_t)lrintf(r[k] * (1.f / sc));
        for (; k < Kp; k++) o[k] = 0;
        xs[m] = sc;
    }
}

/* The block [n0, n1) of N that thread t of T takes: ceil(N / T) each, in order */
static void rows_share(long N, long t, long T, long *n0, long *n1) {
    const long per = (N + T - 1) / T;
    *n0 = t * per < N ? t * per : N;
    *n1 = *n0 + per < N ? *n0 + per : N;
}

/* the calling thread of the current region and the region's size (0 and 1 without OpenMP) */
static void team_of(long *t, long *nt) {
#ifdef _OPENMP
    *t = omp_get_thread_num(), *nt = omp_get_num_threads();
#else
    *t = 0, *nt = 1;
#endif
}

/* rows_share for the calling thread of the current region */
static void my_share(long n, long *lo, long *hi) {
    long t, nt;
    team_of(&t, &nt);
    rows_share(n, t, nt, lo, hi);
}

/* Rows up to which a product multiplies each row straight from the int8 groups (re-read from cache) rather than
   from a widened copy: a 2-core Zen 4, int8 124M batched greedy decode (8-token prompts, 32 new) alternating in
   one process, 1.43x at 2 rows, 1.26x at 4, 1.15x at 8, 1.06x at 16, 1.00-1.02x at 24-32; prefills of 2-16
   tokens 1.08-1.30x, of 64 0.93x. (The int8 -> int16 widening and its second read cost more than the int16
   multiply-adds it saves, until many rows share it.) */
#define ROWWISE 16

/* y [M, N] = (x [M, K] @ (q * s)^T) + b. Returns 0, or -1 where scratch memory could not be had. */
int gptchat_qgemm(const int8_t *q, const float *s, const float *b, const float *x, float *y, long M, long N, long K,
                  long Kp, int threads) {
    int16_t *x16 = aligned_alloc(64, (M * Kp * sizeof(int16_t) + M * sizeof(float) + 63) / 64 * 64);
    if (!x16) return -1;
    float *xs = (float *)(x16 + M * Kp);
    quantize_rows(x, x16, xs, M, K, Kp);
    const long G = (N + 3) / 4;
    /* one row: groups streamed straight from q. Up to ROWWISE rows: a span of groups (24 KB of q) streamed
       for the first row and read again from cache for each next one. More: a span widened to int16 once (24 KB,
       kept in L1) and multiplied with every row, two at a time */
    const int rowwise = M <= ROWWISE;
    const long per_span = rowwise ? 24576 / (4 * Kp) : 24576 / (8 * Kp);
    const long span = M == 1 ? G : per_span > 1 ? per_span : 1;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        long g0, g1;
        my_share(G, &g0, &g1);
        int16_t *w16 = !rowwise && g0 < g1 ? aligned_alloc(64, span * Kp * 4 * sizeof(int16_t)) : NULL;
        if (!rowwise && g0 < g1 && !w16) failed = 1;
        for (long a = g0; a < g1 && !failed; a += span) {
            const long e = a + span < g1 ? a + span : g1;
            if (rowwise) {
                for (long m = 0; m < M; m++) groups(q, s, b, x16 + m * Kp, xs[m], y + m * N, a, e, Kp, N);
                continue;
            }
            widen(q, w16, a, e, Kp);
            long m = 0;
            for (; m + 2 <= M; m += 2)
                groups2w(w16, a, s, b, x16 + m * Kp, x16 + (m + 1) * Kp, xs[m], xs[m + 1], y + m * N, y + (m + 1) * N,
                         a, e, Kp, N);
            if (m < M) groups(q, s, b, x16 + m * Kp, xs[m], y + m * N, a, e, Kp, N);
        }
        free(w16);
    }
    if (failed) {
        free(x16);
        return -1;
    }
    free(x16);
    return 0;
}

/* out [n1 - n0, K] fp32 = rows n0..n1 of q * s (n0 a multiple of 4) */
void gptchat_dequant(const int8_t *q, const float *s, float *out, long n0, long n1, long K, long Kp, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long n = n0; n < n1; n++) {
        const int8_t *p = q + (n / 4) * Kp * 4 + (n % 4) * 32;
        float *o = out + (n - n0) * K;
        const __m256 sc = _mm256_set1_ps(s[n]);
        long k = 0;
        for (; k + 32 <= K; k += 32, p += 128)
            for (int j = 0; j < 32; j += 8)
                _mm256_storeu_ps(o + k + j, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                                              _mm_loadl_epi64((const __m128i *)(p + j)))), sc));
        for (long j = 0; k < K; k++, j++) o[k] = p[j] * s[n];
    }
}

/* For PyTorch's int8 x int8 product (torch._int_mm; AMX or VNNI tiles through oneDNN), which sums bytes: each row
   of x rounded to int16 as quantize_rows does (scale max |x| / X16_MAX, the same rounding) and split into two
   signed bytes, x16 = 256 h + l (h in [-127, 127], l in [-128, 127]), so the two products h.q and l.q are exact in
   int32 and 256 h.q + l.q is the int16 row's exact sum: the same integers as gptchat_qgemm's.
   x [M, K] fp32 -> a [M, 2, Kp] int8 (row 2m: h, 2m + 1: l; zero padded), xs [M] */
void gptchat_split16(const float *x, int8_t *a, float *xs, long M, long K, long Kp, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long m = 0; m < M; m++) {
        const float *r = x + m * K;
        const float sc = row_scale(r, K);
        const __m256 inv = _mm256_set1_ps(1.f / sc), lim = _mm256_set1_ps((float)X16_MAX);
        const __m256i half = _mm256_set1_epi32(128), lowbyte = _mm256_set1_epi32(0xff);
        int8_t *h = a + 2 * m * Kp, *l = h + Kp;
        long k = 0;
        for (; k + 8 <= K; k += 8) { /* round to nearest even; h = floor((x16 + 128) / 256), l = x16 - 256 h */
            __m256 v = _mm256_mul_ps(_mm256_loadu_ps(r + k), inv);
            v = _mm256_min_ps(_mm256_max_ps(v, _mm256_sub_ps(_mm256_setzero_ps(), lim)), lim);
            const __m256i x16 = _mm256_cvtps_epi32(v);
            const __m256i hi = _mm256_srai_epi32(_mm256_add_epi32(x16, half), 8);
            const __m256i lo = _mm256_sub_epi32(x16, _mm256_slli_epi32(hi, 8));
            int32_t th[8], tl[8];
            _mm256_storeu_si256((__m256i *)th, _mm256_and_si256(hi, lowbyte));
            _mm256_storeu_si256((__m256i *)tl, _mm256_and_si256(lo, lowbyte));
            for (int i = 0; i < 8; i++) h[k + i] = (int8_t)th[i], l[k + i] = (int8_t)tl[i];
        }
        for (; k < K; k++) {
            const long v = lrintf(fminf(fmaxf(r[k] * (1.f / sc), -(float)X16_MAX), (float)X16_MAX));
            const long hv = (v + 128) >> 8;
            h[k] = (int8_t)hv, l[k] = (int8_t)(v - 256 * hv);
        }
        for (; k < Kp; k++) h[k] = l[k] = 0;
        xs[m] = sc;
    }
}

/* rows n0..n1 of the packed groups (n0 a multiple of 4) -> out [n1 - n0, Kp] int8 row-major, for torch._int_mm */
void gptchat_unpack(const int8_t *q, int8_t *out, long n0, long n1, long Kp, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long n = n0; n < n1; n++) {
        const int8_t *p = q + (n / 4) * Kp * 4 + (n % 4) * 32;
        int8_t *o = out + (n - n0) * Kp;
        for (long k = 0; k < Kp; k += 32, p += 128) _mm256_storeu_si256((__m256i *)(o + k), _mm256_loadu_si256((const __m256i *)p));
    }
}

/* y[m, j] (row stride ldy) = (256 Y[2m, j] + Y[2m + 1, j]) xs[m] s[j] + b[j]: gptchat_split16's two byte products
   [2M, nb] int32 back to fp32 (s, b: this block's scales and bias; b may be NULL) */
void gptchat_join16(const int32_t *Y, const float *xs, const float *s, const float *b, float *y, long M, long nb,
                    long ldy, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long m = 0; m < M; m++) {
        const int32_t *hi = Y + 2 * m * nb, *lo = hi + nb;
        float *o = y + m * ldy;
        const __m256 c = _mm256_set1_ps(xs[m]), w = _mm256_set1_ps(256.f);
        long j = 0;
        for (; j + 8 <= nb; j += 8) {
            const __m256 v = _mm256_fmadd_ps(w, _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *)(hi + j))),
                                             _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *)(lo + j))));
            const __m256 r = _mm256_mul_ps(_mm256_mul_ps(v, c), _mm256_loadu_ps(s + j));
            _mm256_storeu_ps(o + j, b ? _mm256_add_ps(r, _mm256_loadu_ps(b + j)) : r);
        }
        for (; j < nb; j++) o[j] = (256.f * (float)hi[j] + (float)lo[j]) * xs[m] * s[j] + (b ? b[j] : 0.f);
    }
}

/* q [N, K] int8 row-major -> out [ceil(N/4), Kp/32, 4, 32], zero padded */
void gptchat_pack(const int8_t *q, int8_t *out, long N, long K, long Kp) {
    const long G = (N + 3) / 4;
    for (long g = 0; g < G; g++)
        for (long c = 0; c < Kp / 32; c++)
            for (long r = 0; r < 4; r++) {
                int8_t *o = out + ((g * (Kp / 32) + c) * 4 + r) * 32;
                const long n = g * 4 + r;
                for (long j = 0; j < 32; j++) {
                    const long k = c * 32 + j;
                    o[j] = n < N && k < K ? q[n * K + k] : 0;
                }
            }
}

/* lane u: the sum of a[u]'s eight lanes */
static inline __m256 hsum8x8(const __m256 *a) {
    const __m256 h01 = _mm256_hadd_ps(a[0], a[1]), h23 = _mm256_hadd_ps(a[2], a[3]);
    const __m256 h45 = _mm256_hadd_ps(a[4], a[5]), h67 = _mm256_hadd_ps(a[6], a[7]);
    const __m256 lo = _mm256_hadd_ps(h01, h23), hi = _mm256_hadd_ps(h45, h67); /* [0-3 | 0-3], [4-7 | 4-7] */
    return _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
}

/* o[d0, d0 + 8 nv) = inv * sum over keys j of sc[j] v_j there: one sum a dimension, the keys in order */
static inline __attribute__((always_inline)) void weigh_keys(const float *sc, const void *v, long ks, long n, long d0,
                                                             const int nv, float inv, float *o, int bf) {
    __m256 y[8];
    for (int u = 0; u < nv; u++) y[u] = _mm256_setzero_ps();
    for (long j = 0; j < n; j++) {
        const __m256 w = _mm256_set1_ps(sc[j]);
        for (int u = 0; u < nv; u++) y[u] = _mm256_fmadd_ps(w, load8(v, j * ks + d0 + 8 * u, bf), y[u]);
    }
    for (int u = 0; u < nv; u++) _mm256_storeu_ps(o + d0 + 8 * u, _mm256_mul_ps(y[u], _mm256_set1_ps(inv)));
}

/* softmax(scale q . k_j, j < n) @ v for one query and one head: q [hs], keys and values at elements j * ks
   of k and v (fp32, or bf16 with bf); sc [n] scratch, the result into o [hs]. hs a multiple of 8. vis (NULL:
   every slot) says which slots the query sees (a padded batch's row); at least one must be. Scores go eight keys
   at a time and the weighted sum key by key into one accumulator a dimension (eight independent chains each
   way): a key at a time into one chain, then a dimension block at a time over all keys, took ~1 ms more a token
   than the cache's bytes of a 124M step at slot 1000 (2-core Zen 4). */
static inline __attribute__((always_inline)) void attend_one(const float *q, const void *k, const void *v, long ks,
                                                             long n, long hs, float scale, float *sc, float *o, int bf,
                                                             const uint8_t *vis) {
    long j = 0;
    const __m256 sc8 = _mm256_set1_ps(scale);
    __m256 mx = _mm256_set1_ps(-INFINITY);
    for (; j + 8 <= n; j += 8) {
        __m256 a[8];
        for (int u = 0; u < 8; u++) a[u] = _mm256_setzero_ps();
        for (long d = 0; d < hs; d += 8) {
            const __m256 qd = _mm256_loadu_ps(q + d);
            for (int u = 0; u < 8; u++) a[u] = _mm256_fmadd_ps(qd, load8(k, (j + u) * ks + d, bf), a[u]);
        }
        const __m256 s8 = _mm256_mul_ps(hsum8x8(a), sc8);
        _mm256_storeu_ps(sc + j, s8);
        if (!vis) mx = _mm256_max_ps(mx, s8);
    }
    float m = -INFINITY, sum = 0.f;
    {
        float t[8];
        _mm256_storeu_ps(t, mx);
        for (int u = 0; u < 8; u++) m = fmaxf(m, t[u]);
    }
    for (; j < n; j++) {
        __m256 a = _mm256_setzero_ps();
        for (long d = 0; d < hs; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(k, j * ks + d, bf), a);
        sc[j] = hsum8(a) * scale;
        if (!vis) m = fmaxf(m, sc[j]);
    }
    if (vis) { /* unseen slots take no part in the maximum, and no weight below */
        m = -INFINITY;
        for (j = 0; j < n; j++) m = vis[j] ? fmaxf(m, sc[j]) : m;
    }
    for (j = 0; j + 8 <= n; j += 8) _mm256_storeu_ps(sc + j, exp8(_mm256_sub_ps(_mm256_loadu_ps(sc + j), _mm256_set1_ps(m))));
    for (; j < n; j++) sc[j] = expf(sc[j] - m);
    for (j = 0; vis && j < n; j++)
        if (!vis[j]) sc[j] = 0.f; /* exp8 floors at e^-87: an unseen slot gets exactly no weight */
    __m256 acc = _mm256_setzero_ps();
    for (j = 0; j + 8 <= n; j += 8) acc = _mm256_add_ps(acc, _mm256_loadu_ps(sc + j));
    for (sum = hsum8(acc); j < n; j++) sum += sc[j];
    for (long d0 = 0; d0 < hs; d0 += 64) {
        if (hs - d0 >= 64)
            weigh_keys(sc, v, ks, n, d0, 8, 1.f / sum, o, bf); /* (8: a constant, the eight sums in registers) */
        else
            weigh_keys(sc, v, ks, n, d0, (int)((hs - d0) / 8), 1.f / sum, o, bf);
    }
}

/* Attention of one query a row over n cached keys (a decode step with no padding): for each row b and
   head h, out[b, h*hs .. h*hs+hs) = softmax(scale * q . k_j, j < n) @ v. q [B, nh, hs] and the caches
   [B, nh, >= n, hs] are read through their strides (elements; the last dimension contiguous); hs a
   multiple of 8; scores [B * nh, n] is scratch. PyTorch's CPU flash kernel took ~3x longer here on a 2-core EPYC (2-2.5 ms a token
   of 124M at ~250 cached slots). q and out fp32; the caches fp32, or bf16 with bf (widened as read). vis (NULL:
   no padding) [B, n] bytes at row stride vs: the slots each row sees (a padded batch). */
void gptchat_attend1(const float *q, long qb, long qh, const void *k, const void *v, long kb, long kh, long ks,
                     float *out, float *scores, long B, long nh, long n, long hs, float scale, int threads, int bf,
                     const uint8_t *vis, long vs) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long bh = 0; bh < B * nh; bh++) {
        const long b = bh / nh, h = bh % nh, e = bf ? 2 : 4, kv = (b * kb + h * kh) * e;
        const uint8_t *row = vis ? vis + b * vs : NULL;
        if (bf)
            attend_one(q + b * qb + h * qh, (const char *)k + kv, (const char *)v + kv, ks, n, hs, scale,
                       scores + bh * n, out + bh * hs, 1, row);
        else
            attend_one(q + b * qb + h * qh, (const char *)k + kv, (const char *)v + kv, ks, n, hs, scale,
                       scores + bh * n, out + bh * hs, 0, row);
    }
}

/* ---- One whole decode step of one row (batch 1, no padding), every layer, in one call ----------------
   Why: at batch 1 the products are memory-bound and fast (int8: ~8.6 ms of a 124M token on a 2-core EPYC),
   and the rest of a step run from Python (layer norms, GELU, residuals, cache writes, ~15 module calls a
   layer) cost 6-9 ms more. Here the threads stay in one parallel region for the whole step and meet at
   barriers. fp32 weights are read in the inference layout ([in, out] rows): each thread streams its own
   block of input rows into a partial sum, the partials are added by column afterwards. int8 weights are
   the packed groups above: each thread takes its groups, with the activation rounded to int16 as in
   gptchat_qgemm, so the products equal that kernel's. bf16 weights are [out, in] rows, each thread a
   block of outputs (see linear()); with them the norms, biases, tables and caches are bf16 too, widened
   as read and the cache written rounded; the activations stay fp32 throughout. */

enum { ACT_GELU_TANH = 0, ACT_GELU = 1, ACT_RELU = 2 };
enum { POST_STORE = 0, POST_ACT = 1, POST_ADD = 2 };

/* y[n0..n1) = post(v): stored, through the activation, or added to y (the residual) */
static void finish(float *y, const float *v, long n0, long n1, int post, int act) {
    long n = n0;
    if (post == POST_ADD) {
        for (; n < n1; n++) y[n] += v[n];
    } else if (post == POST_STORE || act == ACT_RELU) {
        for (; n < n1; n++) y[n] = post == POST_STORE || v[n] > 0.f ? v[n] : 0.f;
    } else if (act == ACT_GELU_TANH) { /* 0.5 x (1 + tanh(u)) = x - x / (1 + e^(2u)), u = sqrt(2/pi)(x + 0.044715 x^3) */
        for (; n + 8 <= n1; n += 8) {
            const __m256 x = _mm256_loadu_ps(v + n), x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
            const __m256 u2 = _mm256_mul_ps(_mm256_set1_ps(1.5957691216f), _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), x3, x));
            const __m256 d = _mm256_add_ps(_mm256_set1_ps(1.f), exp8(u2));
            _mm256_storeu_ps(y + n, _mm256_sub_ps(x, _mm256_div_ps(x, d)));
        }
        for (; n < n1; n++) y[n] = 0.5f * v[n] * (1.f + tanhf(0.7978845608f * (v[n] + 0.044715f * v[n] * v[n] * v[n])));
    } else { /* 0.5 x (1 + erf(x / sqrt 2)); erf by Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7) */
        const __m256 sign = _mm256_set1_ps(-0.f), one = _mm256_set1_ps(1.f);
        for (; n + 8 <= n1; n += 8) {
            const __m256 x = _mm256_loadu_ps(v + n), z = _mm256_mul_ps(x, _mm256_set1_ps(0.70710678f));
            const __m256 a = _mm256_andnot_ps(sign, z);
            const __m256 t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(0.3275911f), a, one));
            __m256 p = _mm256_set1_ps(1.061405429f);
            p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-1.453152027f));
            p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.421413741f));
            p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.284496736f));
            p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.254829592f));
            p = _mm256_mul_ps(p, t);
            const __m256 e = _mm256_fnmadd_ps(p, exp8(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(a, a))), one);
            const __m256 erf = _mm256_or_ps(e, _mm256_and_ps(sign, z)); /* erf is odd */
            _mm256_storeu_ps(y + n, _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x), _mm256_add_ps(one, erf)));
        }
        for (; n < n1; n++) y[n] = 0.5f * v[n] * (1.f + erff(v[n] * 0.70710678f));
    }
}

/* 8 floats' sum into two running double sums of 4 */
static inline void addd(__m256 v, __m256d *lo, __m256d *hi) {
    *lo = _mm256_add_pd(*lo, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
    *hi = _mm256_add_pd(*hi, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
}
static inline double hsumd(__m256d lo, __m256d hi) {
    double t[4];
    _mm256_storeu_pd(t, _mm256_add_pd(lo, hi));
    return (t[0] + t[1]) + (t[2] + t[3]);
}

/* The sums in double, eight lanes at a time (scalar, one dependent chain each, a 768-wide norm took ~3 us, 25
   of them a step, on one thread while the others waited) */
static void layer_norm(const float *x, const void *w, const void *b, float *out, long C, float eps, int bf) {
    __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
    long i = 0;
    for (; i + 8 <= C; i += 8) addd(_mm256_loadu_ps(x + i), &lo, &hi);
    double s = hsumd(lo, hi), ss;
    for (; i < C; i++) s += x[i];
    const float mean = (float)(s / C);
    const __m256 m8 = _mm256_set1_ps(mean);
    lo = hi = _mm256_setzero_pd();
    for (i = 0; i + 8 <= C; i += 8) {
        const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(x + i), m8);
        const __m256d dl = _mm256_cvtps_pd(_mm256_castps256_ps128(d)), dh = _mm256_cvtps_pd(_mm256_extractf128_ps(d, 1));
        lo = _mm256_fmadd_pd(dl, dl, lo);
        hi = _mm256_fmadd_pd(dh, dh, hi);
    }
    for (ss = hsumd(lo, hi); i < C; i++) ss += (double)(x[i] - mean) * (x[i] - mean);
    const float rstd = 1.f / sqrtf((float)(ss / C) + eps);
    const __m256 r8 = _mm256_set1_ps(rstd);
    for (i = 0; i + 8 <= C; i += 8) {
        const __m256 d = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), m8), r8);
        const __m256 y = w ? _mm256_mul_ps(d, load8(w, i, bf)) : d;
        _mm256_storeu_ps(out + i, b ? _mm256_add_ps(y, load8(b, i, bf)) : y);
    }
    for (; i < C; i++) out[i] = (x[i] - mean) * rstd * (w ? ld1(w, i, bf) : 1.f) + (b ? ld1(b, i, bf) : 0.f);
}

typedef struct {
    long t, T;         /* this thread, of T */
    float *part;       /* [T, 4C] fp32 partial sums, shared */
    float *tmp;        /* [4C] shared: summed products before post() */
    int16_t *x16;      /* [4C] this thread's int16 activation */
    float *xd;         /* [4C] this thread's activation for bf16 pairs (deinterleave) */
    int wide;          /* bf16 rows by dot_rows_wide (AVX-512) */
} team_t;

/* The columns [n0, n1) of N this thread finishes (groups of 4 for the int8 layout) */
static void share(long N, long t, long T, long *n0, long *n1) {
    const long G = (N + 3) / 4, per = (G + T - 1) / T;
    *n0 = t * per * 4 < N ? t * per * 4 : N;
    *n1 = (t + 1) * per * 4 < N ? (t + 1) * per * 4 : N;
}

/* One row's 16 products from k: fp32 (8 + 8), or bf16 as pairs: a 32-bit lane holds the weights of inputs 2j and
   2j + 1, the low half shifted up and the high half masked are both exact floats, multiplied by the even and the
   odd inputs (xd: x's even entries, then its odd ones): two operations for 16 weights instead of four. */
static inline __attribute__((always_inline)) void dot16(const char *w, const float *x, const float *xd, long K, long k,
                                                        __m256 *a, __m256 *c, int bf) {
    if (bf) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(w + 2 * k));
        *a = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), _mm256_loadu_ps(xd + k / 2), *a);
        *c = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000))),
                             _mm256_loadu_ps(xd + K / 2 + k / 2), *c);
    } else {
        *a = _mm256_fmadd_ps(_mm256_loadu_ps((const float *)w + k), _mm256_loadu_ps(x + k), *a);
        *c = _mm256_fmadd_ps(_mm256_loadu_ps((const float *)w + k + 8), _mm256_loadu_ps(x + k + 8), *c);
    }
}

/* x's even entries, then its odd ones (K even), for dot16's bf16 pairs */
static void deinterleave(const float *x, float *xd, long K) {
    for (long k = 0; k < K / 2; k++) {
        xd[k] = x[2 * k];
        xd[K / 2 + k] = x[2 * k + 1];
    }
}

/* y[n] = W[n] . x over rows [n0, n1) of W [N, K] (fp32, or bf16 with bf: a constant at each inlined call, and
   xd as dot16 reads it; K a multiple of 8). The rows are read as S streams at once, one in each S-th of the
   block: one forward stream a core read 40-41 GB/s on 2 cores of an AMD EPYC (Zen 4) in a phase where two or
   more read 58-64 (in slower phases all alike). bf16 rows from memory, alternating in one process: 35-41
   GB/s one row at a time, 42-48 as four streams, 43-51 with the pairs; from cache ~80, ~110 and ~150. fp32 in
   AVX-512 (16 lanes, double-pumped on Zen 4) read 0.87x these AVX2 rows there: fp32 stays AVX2. */
#define S STREAMS
static inline __attribute__((always_inline)) void dot_rows(const void *W, const float *x, const float *xd, float *y,
                                                           long K, long n0, long n1, int bf) {
    const long e = bf ? 2 : 4, q = (n1 - n0) / S;
    for (long i = 0; i < q; i++) {
        const char *w[S];
        __m256 a[S], c[S];
        for (int j = 0; j < S; j++) {
            w[j] = (const char *)W + (n0 + j * q + i) * K * e;
            a[j] = c[j] = _mm256_setzero_ps();
        }
        long k = 0;
        for (; k + 16 <= K; k += 16)
            for (int j = 0; j < S; j++) dot16(w[j], x, xd, K, k, &a[j], &c[j], bf);
        if (k < K)
            for (int j = 0; j < S; j++) a[j] = _mm256_fmadd_ps(load8(w[j], k, bf), _mm256_loadu_ps(x + k), a[j]);
        for (int j = 0; j < S; j++) y[n0 + j * q + i] = hsum8(_mm256_add_ps(a[j], c[j]));
    }
    for (long n = n0 + S * q; n < n1; n++) { /* the rows left over */
        const char *w = (const char *)W + n * K * e;
        __m256 a = _mm256_setzero_ps();
        for (long k = 0; k < K; k += 8) a = _mm256_fmadd_ps(load8(w, k, bf), _mm256_loadu_ps(x + k), a);
        y[n] = hsum8(a);
    }
}
#undef S

/* dot_rows' bf16 pairs in AVX-512 where the CPU has it (defined in the AVX-512 section; elsewhere dot_rows):
   the same bytes in half the instructions. On a 2-core Zen 4, 247 MB of bf16 rows alternating in one process:
   1.09x the AVX2 pairs (57 against 53 GB/s, summing a buffer 57), a bf16 124M step 1.03x. */
static void dot_rows_wide(const uint16_t *W, const float *x, const float *xd, float *y, long K, long n0, long n1);

/* y[n] = W[n] . x over rows [n0, n1) of W [N, K], fp32 or bf16 (bf) rows; xd: scratch of K floats for bf16 */
static void dot_block(const void *W, const float *x, float *xd, float *y, long K, long n0, long n1, int bf, int wide) {
    if (!bf) {
        dot_rows(W, x, NULL, y, K, n0, n1, 0);
        return;
    }
    deinterleave(x, xd, K);
    if (wide)
        dot_rows_wide(W, x, xd, y, K, n0, n1);
    else
        dot_rows(W, x, xd, y, K, n0, n1, 1);
}

enum { W_FP32 = 0, W_INT8 = 1, W_BF16 = 2 }; /* the step's kinds of weights */

/* y = post(x @ W + b) over all threads of the region; every thread returns after its columns are done
   (the caller's barrier makes them visible). int8: W packed groups with scales s; fp32: W [K, N] rows, each
   thread a block of input rows into partial sums added by column afterwards; bf16: W [N, K] rows (nn.Linear's
   own order), each thread its block of outputs, the bias bf16 too. Measured on a 2-core AMD EPYC (Zen 4),
   bf16 weights streamed at 17-22 GB/s as [K, N] partial sums (4 or 8 input rows a pass, AVX2 or AVX-512)
   and at 30-31 GB/s as [N, K] row dots, where summing the buffer read 30-33. fp32 reads its block as four
   streams (a row from each quarter a pass): against two (two rows from each half), a 124M step in the same
   process, alternating x12, median 1.24x while the memory ran fast (10.3-11.9 ms, ~45 GB/s) and 1.07x while it
   ran slow (15-17 ms); eight streams measured 1.01-1.04x over four (noise): not taken. */
static void linear(const team_t *tm, int kind, const void *W, const float *s, const void *b, const float *x,
                   float *y, long K, long N, int post, int act) {
    long n0, n1;
    share(N, tm->t, tm->T, &n0, &n1);
    if (kind == W_INT8) {
        const long Kp = (K + 31) / 32 * 32;
        float xs;
        quantize_rows(x, tm->x16, &xs, 1, K, Kp);
        groups((const int8_t *)W, s, (const float *)b, tm->x16, xs, tm->tmp, n0 / 4, (n1 + 3) / 4, Kp, N);
        finish(y, tm->tmp, n0, n1, post, act);
        return;
    }
    if (kind == W_BF16) {
        float *z = post == POST_STORE ? y : tm->tmp; /* stored: straight into y */
        dot_block(W, x, tm->xd, z, K, n0, n1, 1, tm->wide);
        if (b)
            for (long n = n0; n < n1; n++) z[n] += ld1(b, n, 1);
        if (z != y) finish(y, z, n0, n1, post, act);
        return;
    }
    const float *w = (const float *)W;
    const long per = (K + tm->T - 1) / tm->T, k0 = tm->t * per < K ? tm->t * per : K, k1 = k0 + per < K ? k0 + per : K;
    float *p = tm->part + tm->t * N;
    /* four input rows a pass, the first pass storing: one from each quarter of the thread's block while they
       last, so that the block is read as four streams (see dot_rows), then the rows left over */
    const long len = k1 - k0, h = len / 4;
    if (len == 0) memset(p, 0, N * sizeof(float));
    for (long i = 0, pass = 0; i < len; pass++) {
        long kr[4], r = 4;
        if (i < h) {
            kr[0] = k0 + i, kr[1] = k0 + h + i, kr[2] = k0 + 2 * h + i, kr[3] = k0 + 3 * h + i;
            i += 1;
            if (i == h) i = 4 * h;
        } else {
            r = len - i < 4 ? len - i : 4;
            for (long j = 0; j < 4; j++) kr[j] = k0 + i + (j < r ? j : 0);
            i += r;
        }
        const __m256 a0 = _mm256_set1_ps(x[kr[0]]), a1 = _mm256_set1_ps(r > 1 ? x[kr[1]] : 0.f);
        const __m256 a2 = _mm256_set1_ps(r > 2 ? x[kr[2]] : 0.f), a3 = _mm256_set1_ps(r > 3 ? x[kr[3]] : 0.f);
        const float *w0 = w + kr[0] * N, *w1 = w + kr[1] * N, *w2 = w + kr[2] * N, *w3 = w + kr[3] * N;
        long n = 0;
        for (; n + 8 <= N; n += 8) {
            __m256 acc = pass == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(p + n);
            acc = _mm256_fmadd_ps(a0, _mm256_loadu_ps(w0 + n), acc);
            acc = _mm256_fmadd_ps(a1, _mm256_loadu_ps(w1 + n), acc);
            acc = _mm256_fmadd_ps(a2, _mm256_loadu_ps(w2 + n), acc);
            acc = _mm256_fmadd_ps(a3, _mm256_loadu_ps(w3 + n), acc);
            _mm256_storeu_ps(p + n, acc);
        }
        for (; n < N; n++) {
            float acc = pass == 0 ? 0.f : p[n];
            for (long j = 0; j < r; j++) acc += x[kr[j]] * w[kr[j] * N + n];
            p[n] = acc;
        }
    }
#pragma omp barrier
    for (long n = n0; n < n1; n++) {
        float acc = b ? ((const float *)b)[n] : 0.f;
        for (long u = 0; u < tm->T; u++) acc += tm->part[u * N + n];
        tm->tmp[n] = acc;
    }
    finish(y, tm->tmp, n0, n1, post, act);
}

/* y [N] = W [N, K] @ x [K], each thread a block of rows: the tied head read in the token table's own order,
   which then needs no transposed copy at load */
static void rows_dot(const team_t *tm, const void *W, const float *x, float *y, long K, long N, int bf) {
    long n0, n1;
    rows_share(N, tm->t, tm->T, &n0, &n1);
    dot_block(W, x, tm->xd, y, K, n0, n1, bf, tm->wide);
}

typedef struct { float v; long i; int nan; } best_t; /* a block's largest logit and its first index, or its first NaN */

/* The first largest of y[n0, n1) (a NaN counting as larger than any number, as torch.argmax has it); i -1: none */
static best_t best_of(const float *y, long n0, long n1) {
    best_t b = {-INFINITY, -1, 0};
    if (n0 >= n1) return b;
    __m256 m = _mm256_set1_ps(-INFINITY), nan = _mm256_setzero_ps();
    long i = n0;
    for (; i + 8 <= n1; i += 8) {
        const __m256 a = _mm256_loadu_ps(y + i);
        m = _mm256_max_ps(m, a);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
    }
    float t[8];
    _mm256_storeu_ps(t, m);
    for (int j = 0; j < 8; j++) b.v = t[j] > b.v ? t[j] : b.v;
    b.nan = _mm256_movemask_ps(nan) != 0;
    for (; i < n1; i++) {
        b.nan |= y[i] != y[i];
        b.v = y[i] > b.v ? y[i] : b.v;
    }
    for (i = n0; i < n1 && (b.nan ? y[i] == y[i] : y[i] != b.v); i++) {
    }
    b.i = i;
    return b;
}

/* y [N] = W [N, K] . x for one row x [K] (fp32 W, or bf16 W with bf; K a multiple of 8; wide: bf16 by
   dot_rows_wide), each thread a block of W's rows read as dot_rows' streams: the head of a prefill's last row
   (PyTorch's one-row product of 124M's tied head read ~12 GB/s on a 2-core Zen 4, where summing a buffer read
   35). 0, or -1 (no memory) */
int gptchat_rows(const void *W, const float *x, float *y, long N, long K, int threads, int bf, int wide) {
    float *xd = bf ? aligned_alloc(64, (threads * K * sizeof(float) + 63) / 64 * 64) : NULL;
    if (bf && !xd) return -1;
#pragma omp parallel num_threads(threads)
    {
        long n0, n1;
        my_share(N, &n0, &n1);
#ifdef _OPENMP
        float *mine = bf ? xd + omp_get_thread_num() * K : NULL;
#else
        float *mine = xd;
#endif
        dot_block(W, x, mine, y, K, n0, n1, bf, wide);
    }
    free(xd);
    return 0;
}

/* Attention of the row's query for heads [h0, h1) over slots 0..slot, after writing this slot's k and v
   (caches of fp32, or of bf16 with bf: written rounded) */
static void attend_heads(const float *qkv, void *const kc, void *const vc, long kh, long ks, long slot, long C,
                         long hs, long h0, long h1, float scale, float *sc, float *out, int bf) {
    for (long h = h0; h < h1; h++) {
        const float *kn = qkv + C + h * hs, *vn = qkv + 2 * C + h * hs;
        if (bf) {
            uint16_t *kk = (uint16_t *)kc + h * kh, *vv = (uint16_t *)vc + h * kh;
            for (long d = 0; d < hs; d++) {
                kk[slot * ks + d] = to_bf16(kn[d]);
                vv[slot * ks + d] = to_bf16(vn[d]);
            }
            attend_one(qkv + h * hs, kk, vv, ks, slot + 1, hs, scale, sc, out + h * hs, 1, NULL);
        } else {
            float *kk = (float *)kc + h * kh, *vv = (float *)vc + h * kh;
            memcpy(kk + slot * ks, kn, hs * sizeof(float));
            memcpy(vv + slot * ks, vn, hs * sizeof(float));
            attend_one(qkv + h * hs, kk, vv, ks, slot + 1, hs, scale, sc, out + h * hs, 0, NULL);
        }
    }
}

#define STEP_PTRS 16 /* per layer: ln_1 w b, c_attn W s b, attn.c_proj W s b, ln_2 w b, c_fc W s b, mlp.c_proj W s b */

/* The token's embedding plus its position's, into x [C]. emb_s NULL: emb is a table of floats (fp32, or
   bf16 with bf, as the position row pos) read through strides (es0 a row, es1 an element); else emb is the
   head's packed int8 groups (rows of Kp) with scales emb_s, as QuantEmbedding reads them. The product and
   the sum rounded apart, as PyTorch does them. */
static void embed(long tok, const void *emb, const float *emb_s, long es0, long es1, long Kp, const void *pos,
                  float *x, long C, int bf) {
    if (emb_s == NULL) {
        for (long i = 0; i < C; i++) x[i] = ld1(emb, tok * es0 + i * es1, bf) + ld1(pos, i, bf);
        return;
    }
    const int8_t *g = (const int8_t *)emb + (tok / 4) * Kp * 4 + (tok % 4) * 32;
    const float s = emb_s[tok];
    for (long i = 0; i < C; i++) {
        volatile float e = (float)g[(i / 32) * 128 + i % 32] * s; /* rounded here, not fused into the add */
        x[i] = e + ((const float *)pos)[i];
    }
}

/* x [C]: the row's embedding in (or, with emb, written here from token *tok and the position row pos: see
   embed()), the final layer norm's output out. wp: STEP_PTRS pointers a layer (absent
   biases / scales NULL); kv: per layer its key then value cache, [nh, >= slot+1, hs] through strides kh, ks;
   scales: the attention scale of each layer. kind: W_FP32 or W_INT8 (every other tensor fp32), or W_BF16
   (the weights, norms, biases, tables and KV caches all bf16; the activations and logits stay fp32); kv_bf:
   bf16 KV caches under fp32 or int8 weights (written rounded, read widened). head (scales head_s when int8):
   the tied head, whose V logits are then written to logits, read as [C, V] rows like the blocks' weights, or
   with head_rows (not int8) as [V, C] rows; NULL: none. wide: bf16 rows by dot_rows_wide (the CPU has
   AVX-512). Each thread normalises the row itself into its own buffer (the norms were one thread's while the
   others waited at a barrier: a bf16 step 1.01-1.02x). pick (NULL: none): the index of the largest of the first
   vlim logits, as torch.argmax gives it, each thread over the block it has just written (greedy's token without
   reading the logits again from the other cores' caches: a 124M generation 1.025x int8, 1.016x bf16). Returns
   0, -1 where scratch memory could not be had, or -2 where the token is not in the table. */
int gptchat_step1(const void *const *wp, void *const *kv, const float *scales, long L, long C, long nh, long kh,
                  long ks, long slot, int kind, int act, float eps, const void *lnf_w, const void *lnf_b, float *x,
                  const void *head, const float *head_s, long V, float *logits, int threads, const int64_t *tok,
                  const void *emb, const float *emb_s, long es0, long es1, long emb_kp, const void *pos,
                  int head_rows, int kv_bf, int wide, int64_t *pick, long vlim) {
    const int bf = kind == W_BF16;
    kv_bf = kv_bf || bf;
    if (emb) {
        if (*tok < 0 || *tok >= V) return -2;
        embed(*tok, emb, emb_s, es0, es1, emb_kp, pos, x, C, bf);
    }
    const long hs = C / nh, N4 = 4 * C, NP = head && V > N4 ? V : N4; /* the widest product */
    const long T = threads > 0 ? threads : 1;
    /* shared: part [T, NP], tmp [NP], qkv [3C], att [C], h [4C]; per thread: x16 [4C + 32], xd [4C], ln [C],
       scores [slot+1 + 8] */
    const long shared = T * NP + NP + 3 * C + C + N4, per_thread = (N4 + 32) / 2 + N4 + C + slot + 1 + 8;
    float *buf = aligned_alloc(64, ((shared + T * per_thread) * sizeof(float) + 63) / 64 * 64);
    best_t *cand = head && pick ? malloc(T * sizeof(best_t)) : NULL;
    if (!buf || (head && pick && !cand)) {
        free(buf);
        return -1;
    }
    for (long u = 0; cand && u < T; u++) cand[u].i = -1; /* (a region may get fewer threads than asked) */
    float *part = buf, *tmp = part + T * NP, *qkv = tmp + NP, *att = qkv + 3 * C, *h = att + C, *priv = h + N4;
#pragma omp parallel num_threads(T)
    {
#ifdef _OPENMP
        const long t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
        const long t = 0, nt = 1;
#endif
        team_t tm = {t, nt, part, tmp, (int16_t *)(priv + t * per_thread), priv + t * per_thread + (N4 + 32) / 2, wide};
        float *ln = tm.xd + N4, *sc = ln + C;
        long h0, h1; /* this thread's heads */
        rows_share(nh, t, nt, &h0, &h1);
        for (long l = 0; l < L; l++) {
            const void *const *p = wp + l * STEP_PTRS;
            layer_norm(x, p[0], p[1], ln, C, eps, bf);
            linear(&tm, kind, p[2], p[3], p[4], ln, qkv, C, 3 * C, POST_STORE, act);
#pragma omp barrier
            attend_heads(qkv, kv[2 * l], kv[2 * l + 1], kh, ks, slot, C, hs, h0, h1, scales[l], sc, att, kv_bf);
#pragma omp barrier
            linear(&tm, kind, p[5], p[6], p[7], att, x, C, C, POST_ADD, act);
#pragma omp barrier
            layer_norm(x, p[8], p[9], ln, C, eps, bf);
            linear(&tm, kind, p[10], p[11], p[12], ln, h, C, N4, POST_ACT, act);
#pragma omp barrier
            linear(&tm, kind, p[13], p[14], p[15], h, x, N4, C, POST_ADD, act);
#pragma omp barrier
        }
#pragma omp single
        layer_norm(x, lnf_w, lnf_b, x, C, eps, bf);
        if (head && head_rows) rows_dot(&tm, head, x, logits, C, V, bf);
        else if (head) linear(&tm, kind, head, head_s, NULL, x, logits, C, V, POST_STORE, act);
        if (cand) { /* greedy's pick: each thread over the logits it just wrote, while they are in its caches */
            long n0, n1;
            if (head_rows) rows_share(V, t, nt, &n0, &n1);
            else share(V, t, nt, &n0, &n1);
            cand[t] = best_of(logits, n0, n1 < vlim ? n1 : vlim);
        }
    }
    if (cand) { /* the blocks in order: the first NaN, else the first of the largest */
        long at = -1;
        float top = -INFINITY;
        for (long u = 0; u < T && at < 0; u++)
            if (cand[u].i >= 0 && cand[u].nan) at = cand[u].i;
        if (at < 0)
            for (long u = 0; u < T; u++)
                if (cand[u].i >= 0 && (at < 0 || cand[u].v > top)) at = cand[u].i, top = cand[u].v;
        *pick = at < 0 ? 0 : at;
    }
    free(cand);
    free(buf);
    return 0;
}

/* y = act(y) in place over n floats (fp32, or bf16 with bf: computed in fp32, stored rounded; no gradients):
   the MLP's activation outside the one-call step. PyTorch's tanh GELU ran at ~0.55 G elements/s on 2 EPYC
   threads (66 ms of a 1000-token 124M prefill); in bf16 37 ms of a 685 ms prefill on a Zen 4.
   bias (fp32 only; else NULL): y = act(y + bias), rows of `width`, the bias added to each chunk while it is in
   cache: the product before it skips its own bias (PyTorch's addmm copies the bias into every output row first). */
static void gelu16(float *y, const float *v, long n0, long n1);

void gptchat_act(void *y, long n, int act, int threads, int bf, int wide, const float *bias, long width) {
    const int zmm = wide && act == ACT_GELU_TANH;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long c = 0; c < n; c += 8192) {
        const long e = c + 8192 < n ? c + 8192 : n;
        if (!bf) {
            if (bias) /* row by row within the chunk: the inner loop vectorises */
                for (long i = c; i < e;) {
                    const long col = i % width, len = width - col < e - i ? width - col : e - i;
                    float *yi = (float *)y + i;
                    const float *bi = bias + col;
                    for (long j = 0; j < len; j++) yi[j] += bi[j];
                    i += len;
                }
            if (zmm) gelu16((float *)y, (float *)y, c, e);
            else finish((float *)y, (float *)y, c, e, POST_ACT, act);
            continue;
        }
        float f[8192];
        uint16_t *h = (uint16_t *)y + c;
        for (long i = 0; i < e - c; i++) f[i] = ld1(h, i, 1);
        if (zmm) gelu16(f, f, 0, e - c);
        else finish(f, f, 0, e - c, POST_ACT, act);
        for (long i = 0; i < e - c; i++) h[i] = to_bf16(f[i]);
    }
}

/* ---- Top-k sampling of rows of logits (core/generate/sampling.py: sample) ----------------------------
   Why: PyTorch's topk over GPT-2's 50257 logits took ~90 us and the whole top-k draw ~175 us on a 2-core
   Zen 4, 5-6% of an int8 124M token. Per row, as sampling._top_k_probs and _draw have it: the k + 1 largest
   logits in one pass (an entry is compared with the (k+1)-th largest so far, eight at a time, and only the
   few larger are inserted), the softmax of the k best over the temperature, top-p's nucleus on them (the
   most likely always kept), then walked in token order until the running mass passes u times their total.
   In double throughout. A row whose k + 1 best hold a tie, a NaN or an infinity gets -1: the caller draws it
   from the whole row (a tie at the k-th place keeps every tied token there). */
#define TOPK_MAX 256

/* x[i] into the descending bv/bi of n entries, at most k1 kept */
static inline void topk_put(float *bv, long *bi, long *n, long k1, float v, long i) {
    long j = *n < k1 ? (*n)++ : k1 - 1;
    while (j > 0 && bv[j - 1] < v) {
        bv[j] = bv[j - 1];
        bi[j] = bi[j - 1];
        j--;
    }
    bv[j] = v;
    bi[j] = i;
}

/* the k1 largest of x[0, V) in descending order; 0, or -1 on a NaN */
static int topk_row(const float *x, long V, long k1, float *bv, long *bi) {
    long n = 0, i = 0;
    for (; i < V && n < k1; i++) {
        if (x[i] != x[i]) return -1;
        topk_put(bv, bi, &n, k1, x[i], i);
    }
    for (; i + 8 <= V; i += 8) { /* > the k1-th largest, or NaN */
        int m = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), _mm256_set1_ps(bv[k1 - 1]), _CMP_NLE_UQ));
        while (m) {
            const int b = __builtin_ctz(m);
            m &= m - 1;
            if (x[i + b] != x[i + b]) return -1;
            if (x[i + b] > bv[k1 - 1]) topk_put(bv, bi, &n, k1, x[i + b], i + b);
        }
    }
    for (; i < V; i++) {
        if (x[i] != x[i]) return -1;
        if (x[i] > bv[k1 - 1]) topk_put(bv, bi, &n, k1, x[i], i);
    }
    return 0;
}

/* The token drawn with uniform u from the k + 1 largest logits bv/bi (descending; reordered here), or -1 */
static long topk_draw(float *bv, long *bi, long k, double temperature, double top_p, double u) {
    double p[TOPK_MAX];
    if (!isfinite(bv[0]) || !isfinite(bv[k])) return -1;
    for (long j = 1; j <= k; j++)
        if (bv[j] == bv[j - 1]) return -1;
    double sum = 0.0;
    for (long j = 0; j < k; j++) sum += p[j] = exp(((double)bv[j] - (double)bv[0]) / temperature);
    double before = 0.0; /* the mass ranked above entry j */
    for (long j = 0; j < k; j++) {
        p[j] /= sum;
        const double q = p[j];
        if (j > 0 && top_p < 1.0 && before > top_p) p[j] = 0.0;
        before += q;
    }
    for (long j = 1; j < k; j++) { /* token order (insertion: k is small) */
        const long t = bi[j];
        const double q = p[j];
        long i = j;
        for (; i > 0 && bi[i - 1] > t; i--) {
            bi[i] = bi[i - 1];
            p[i] = p[i - 1];
        }
        bi[i] = t;
        p[i] = q;
    }
    double total = 0.0;
    for (long j = 0; j < k; j++) total += p[j];
    const double target = u * total;
    double c = 0.0;
    long last = 0;
    for (long j = 0; j < k; j++) { /* the first whose running mass passes the target; else the last with mass */
        c += p[j];
        if (p[j] > 0.0) last = j;
        if (c > target) return bi[j];
    }
    return bi[last];
}

/* out[b] = the index of row b's largest value (rows of V fp32, or bf16 with bf; ld elements apart), as
   torch.argmax takes it: the first of equal values, and the first NaN where a row has one. Greedy decoding's one
   step on the logits: PyTorch's took 1.2 ms for 16 rows of 50257 on a 2-core Xeon (2.5% of a batch-16 fp32 step). */
static long row_argmax(const void *r, long V, int bf) {
    const long n8 = V / 8 * 8;
    long at = -1;
    float top = 0.f;
    if (n8) {
        __m256 best = load8(r, 0, bf), nan = _mm256_cmp_ps(best, best, _CMP_UNORD_Q);
        __m256i where = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), cur = where;
        const __m256i eight = _mm256_set1_epi32(8);
        for (long k = 8; k < n8; k += 8) {
            cur = _mm256_add_epi32(cur, eight);
            const __m256 v = load8(r, k, bf), gt = _mm256_cmp_ps(v, best, _CMP_GT_OQ);
            nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
            best = _mm256_blendv_ps(best, v, gt);
            where = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(where), _mm256_castsi256_ps(cur), gt));
        }
        if (_mm256_movemask_ps(nan)) {
            for (long k = 0; k < V; k++)
                if (isnan(ld1(r, k, bf))) return k;
        }
        float bv[8];
        int32_t bi[8];
        _mm256_storeu_ps(bv, best);
        _mm256_storeu_si256((__m256i *)bi, where);
        at = bi[0], top = bv[0];
        for (int i = 1; i < 8; i++)
            if (bv[i] > top || (bv[i] == top && bi[i] < at)) at = bi[i], top = bv[i];
    }
    for (long k = n8; k < V; k++) {
        const float v = ld1(r, k, bf);
        if (isnan(v)) return k;
        if (at < 0 || v > top) at = k, top = v;
    }
    return at;
}

void gptchat_argmax(const void *x, long B, long V, long ld, int bf, int64_t *out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long b = 0; b < B; b++) out[b] = row_argmax((const char *)x + b * ld * (bf ? 2 : 4), V, bf);
}

/* out[r] = the token drawn for row r of logits [B][ld] (V used) with uniform u[r], rows shared among threads;
   -1: see above. k < V, 1 < k <= TOPK_MAX, temperature > 0, 0 < top_p <= 1 (1: off). Returns how many rows
   got -1. */
int gptchat_sample_topk(const float *logits, long B, long V, long ld, long k, double temperature, double top_p,
                        const double *u, int64_t *out, int threads) {
    int left = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(+ : left) if (B > 1)
    for (long r = 0; r < B; r++) {
        float bv[TOPK_MAX + 1];
        long bi[TOPK_MAX + 1];
        out[r] = topk_row(logits + r * ld, V, k + 1, bv, bi) ? -1 : topk_draw(bv, bi, k, temperature, top_p, u[r]);
        left += out[r] < 0;
    }
    return left;
}

/* x1 = sum_j p1[j] v_j, x2 likewise with p2, over dv x 8 dimensions of v (element d0 on; fp32, or bf16 with
   bf; dv <= 4; inlined with dv = 4) */
static inline __attribute__((always_inline)) void weigh(const void *v, long d0, long ks, const float *p1,
                                                        const float *p2, long len, const int dv, __m256 *x1,
                                                        __m256 *x2, int bf) {
    for (int u = 0; u < dv; u++) x1[u] = x2[u] = _mm256_setzero_ps();
    for (long j = 0; j < len; j++) {
        const __m256 a = _mm256_set1_ps(p1[j]), c = _mm256_set1_ps(p2[j]);
        for (int u = 0; u < dv; u++) {
            const __m256 x = load8(v, j * ks + d0 + 8 * u, bf);
            x1[u] = _mm256_fmadd_ps(a, x, x1[u]);
            x2[u] = _mm256_fmadd_ps(c, x, x2[u]);
        }
    }
}

/* Causal attention from slot 0 (a prefill, eval's windows): out[b, i, h*hs ..] = softmax(scale q_i . k_j,
   j <= i) @ v for i < T. q [B, nh, T, hs], k and v [B, nh, >= T, hs] are read through their strides
   (elements; the last dimension contiguous); out is [B, T, nh * hs], the layout c_proj reads; hs a
   multiple of 8. Keys are first copied per (row, head) into blocks of 16 keys x hs transposed
   (kt: [B * nh, Tp / 16, hs, 16], zero padded), so that 4 queries x 16 keys are multiplied from 2 loads
   and 4 broadcasts of contiguous memory; the weighted sum of values takes 2 queries x 32 dimensions at a
   time. Work goes out 4 queries at a time, longest first. q and out are fp32; k and v fp32, or bf16 with bf
   (a bf16 model's prefill: widened as read, the sums in fp32; PyTorch's bf16 flash kernel took 200 of a
   685 ms 124M prefill on a Zen 4). Returns 0, or -1 where scratch memory could not be had. */
#define QB 4
int gptchat_attend_causal(const float *q, long qb, long qh, long qt, const void *k, const void *v, long kb, long kh,
                          long ks, float *out, long B, long nh, long T, long hs, float scale, int threads, int bf) {
    const long Tp = (T + 15) / 16 * 16, blocks = (T + QB - 1) / QB;
    float *kt = aligned_alloc(64, (B * nh * hs * Tp * sizeof(float) + 63) / 64 * 64);
    float *sc = aligned_alloc(64, ((long)threads * QB * Tp * sizeof(float) + 63) / 64 * 64);
    if (!kt || !sc) {
        free(kt);
        free(sc);
        return -1;
    }
#pragma omp parallel num_threads(threads)
    {
#ifdef _OPENMP
        const long t = omp_get_thread_num();
#else
        const long t = 0;
#endif
#pragma omp for schedule(static)
        for (long bh = 0; bh < B * nh; bh++) {
            const long k0 = (bh / nh) * kb + (bh % nh) * kh;
            float *o = kt + bh * hs * Tp;
            for (long j0 = 0; j0 < Tp; j0 += 16, o += 16 * hs)
                for (long j = j0; j < j0 + 16; j++)
                    for (long d = 0; d < hs; d++) o[d * 16 + j - j0] = j < T ? ld1(k, k0 + j * ks + d, bf) : 0.f;
        }
        float *s = sc + t * QB * Tp;
#pragma omp for schedule(dynamic, 1)
        for (long w = 0; w < B * nh * blocks; w++) {
            const long bh = w % (B * nh), i0 = (blocks - 1 - w / (B * nh)) * QB; /* longest rows first */
            const long b = bh / nh, h = bh % nh, rows = T - i0 < QB ? T - i0 : QB, n = i0 + rows;
            const float *qq = q + b * qb + h * qh + i0 * qt, *kT = kt + bh * hs * Tp;
            const long v0 = b * kb + h * kh;
            const float *qr[QB];
            for (int r = 0; r < QB; r++) qr[r] = qq + (r < rows ? r : 0) * qt;
            __m256 mx[QB]; /* each row's running max over the blocks every row sees whole */
            for (int r = 0; r < QB; r++) mx[r] = _mm256_set1_ps(-INFINITY);
            const long whole = (i0 + 1) / 16 * 16; /* keys [0, whole) are seen by every row of the block */
            for (long j = 0; j < n; j += 16) {
                const float *kb16 = kT + j * hs; /* this block of 16 keys: [hs, 16] */
                __m256 a[QB], c[QB];
                for (int r = 0; r < QB; r++) a[r] = c[r] = _mm256_setzero_ps();
                for (long d = 0; d < hs; d++) {
                    const __m256 k0 = _mm256_load_ps(kb16 + d * 16), k1 = _mm256_load_ps(kb16 + d * 16 + 8);
                    for (int r = 0; r < QB; r++) {
                        const __m256 qd = _mm256_broadcast_ss(qr[r] + d);
                        a[r] = _mm256_fmadd_ps(qd, k0, a[r]);
                        c[r] = _mm256_fmadd_ps(qd, k1, c[r]);
                    }
                }
                const __m256 sv = _mm256_set1_ps(scale);
                for (int r = 0; r < QB; r++) {
                    a[r] = _mm256_mul_ps(a[r], sv);
                    c[r] = _mm256_mul_ps(c[r], sv);
                    _mm256_storeu_ps(s + r * Tp + j, a[r]);
                    _mm256_storeu_ps(s + r * Tp + j + 8, c[r]);
                    if (j < whole) mx[r] = _mm256_max_ps(mx[r], _mm256_max_ps(a[r], c[r]));
                }
            }
            float inv[QB];
            for (long r = 0; r < rows; r++) { /* row i0 + r sees keys 0 .. i0 + r */
                float *sr = s + r * Tp;
                const long len = i0 + r + 1;
                float mm[8], m = -INFINITY, sum = 0.f;
                _mm256_storeu_ps(mm, mx[r]);
                for (int u = 0; u < 8; u++) m = fmaxf(m, mm[u]);
                long j = whole;
                for (; j < len; j++) m = fmaxf(m, sr[j]);
                __m256 s8 = _mm256_setzero_ps();
                for (j = 0; j + 8 <= len; j += 8) {
                    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sr + j), _mm256_set1_ps(m)));
                    s8 = _mm256_add_ps(s8, e);
                    _mm256_storeu_ps(sr + j, e);
                }
                for (; j < len; j++) sum += sr[j] = expf(sr[j] - m);
                _mm256_storeu_ps(mm, s8);
                for (int u = 0; u < 8; u++) sum += mm[u];
                inv[r] = 1.f / sum; /* applied to the weighted sum of values */
                for (; j < n; j++) sr[j] = 0.f; /* keys after this row's own: no weight */
            }
            for (long r = 0; r < rows; r += 2) {
                const long r2 = r + 1 < rows ? r + 1 : r, len = i0 + r2 + 1;
                const float *s1 = s + r * Tp, *s2 = s + r2 * Tp;
                float *o1 = out + (b * T + i0 + r) * nh * hs + h * hs, *o2 = out + (b * T + i0 + r2) * nh * hs + h * hs;
                for (long d0 = 0; d0 < hs; d0 += 32) {
                    const long dv = hs - d0 < 32 ? (hs - d0) / 8 : 4;
                    __m256 x1[4], x2[4];
                    if (dv == 4 && bf)
                        weigh(v, v0 + d0, ks, s1, s2, len, 4, x1, x2, 1);
                    else if (dv == 4)
                        weigh(v, v0 + d0, ks, s1, s2, len, 4, x1, x2, 0);
                    else
                        weigh(v, v0 + d0, ks, s1, s2, len, dv, x1, x2, bf);
                    for (int u = 0; u < dv; u++) {
                        _mm256_storeu_ps(o1 + d0 + 8 * u, _mm256_mul_ps(x1[u], _mm256_set1_ps(inv[r])));
                        if (r2 != r) _mm256_storeu_ps(o2 + d0 + 8 * u, _mm256_mul_ps(x2[u], _mm256_set1_ps(inv[r2])));
                    }
                }
            }
        }
    }
    free(kt);
    free(sc);
    return 0;
}

/* ---- fp32 products of a few rows on the inference layout ([in, out] rows): short prefills -------------
   Why: PyTorch's GEMM at 2-32 rows streams the weights slowly (2-core Zen 4, the 124M model's 48 matrices:
   29.9 ms at 2 rows, 40.2 at 8, 47.6 at 16, 60.6 at 32, where reading them takes ~10). Here, as the batch-1
   step reads them: each thread a block of input rows, four streams of whole rows (a row from each quarter of
   the block), every row of x multiplied into the thread's partial sums while the weights are in cache; the
   partials are added by column afterwards. The same 48 matrices: 10.2 ms at 2 rows, 18.2 at 8, 27 at 16, 45 at
   32 (a harness, alternating rounds). Partial sums of more than 8 rows go 512 columns at a time, which keeps
   them in L1 (at 32 rows: 45 against 56 ms with whole rows). */
#define FEW_NC 512

/* part[m][nc, nc + nn) += x[m][k] W[k][nc, nc + nn) over the four rows kr (r of them valid) */
static inline __attribute__((always_inline)) void few_pass(const float *W, const float *x, float *part, long M,
                                                           long K, long N, long nc, long nn, const long *kr, long r) {
    const float *w0 = W + kr[0] * N + nc, *w1 = W + kr[1] * N + nc, *w2 = W + kr[2] * N + nc, *w3 = W + kr[3] * N + nc;
    for (long m = 0; m < M; m++) {
        const float *xm = x + m * K;
        const __m256 a0 = _mm256_set1_ps(xm[kr[0]]), a1 = _mm256_set1_ps(r > 1 ? xm[kr[1]] : 0.f);
        const __m256 a2 = _mm256_set1_ps(r > 2 ? xm[kr[2]] : 0.f), a3 = _mm256_set1_ps(r > 3 ? xm[kr[3]] : 0.f);
        float *pm = part + m * N + nc;
        for (long c = 0; c < nn; c += 8) {
            __m256 acc = _mm256_loadu_ps(pm + c);
            acc = _mm256_fmadd_ps(a0, _mm256_loadu_ps(w0 + c), acc);
            acc = _mm256_fmadd_ps(a1, _mm256_loadu_ps(w1 + c), acc);
            acc = _mm256_fmadd_ps(a2, _mm256_loadu_ps(w2 + c), acc);
            acc = _mm256_fmadd_ps(a3, _mm256_loadu_ps(w3 + c), acc);
            _mm256_storeu_ps(pm + c, acc);
        }
    }
}

/* y [M, N] = x [M, K] W [K, N] (+ b [N]), W row-major (N a multiple of 8). 0, or -1 (no memory for the partials) */
int gptchat_fewrows(const float *W, const float *b, const float *x, float *y, long M, long K, long N, int threads) {
    const long T = threads > 0 ? threads : 1, NC = M <= 8 ? N : FEW_NC;
    float *part = aligned_alloc(64, (T * M * N * sizeof(float) + 63) / 64 * 64);
    if (!part) return -1;
#pragma omp parallel num_threads(T)
    {
        long t, nt, k0, k1;
        team_of(&t, &nt);
        rows_share(K, t, nt, &k0, &k1);
        const long len = k1 - k0, q = len / 4;
        float *mine = part + t * M * N;
        for (long nc = 0; nc < N; nc += NC) {
            const long nn = nc + NC < N ? NC : N - nc;
            for (long m = 0; m < M; m++) memset(mine + m * N + nc, 0, nn * sizeof(float));
            for (long i = 0; i < q; i++) {
                const long kr[4] = {k0 + i, k0 + q + i, k0 + 2 * q + i, k0 + 3 * q + i};
                few_pass(W, x, mine, M, K, N, nc, nn, kr, 4);
            }
            for (long k = k0 + 4 * q; k < k1; k++) {
                const long kr[4] = {k, k, k, k};
                few_pass(W, x, mine, M, K, N, nc, nn, kr, 1);
            }
        }
#pragma omp barrier
        long c0, c1;
        rows_share(N / 8, t, nt, &c0, &c1);
        for (long m = 0; m < M; m++)
            for (long c = c0 * 8; c < c1 * 8; c += 8) {
                __m256 acc = b ? _mm256_loadu_ps(b + c) : _mm256_setzero_ps();
                for (long u = 0; u < nt; u++) acc = _mm256_add_ps(acc, _mm256_loadu_ps(part + u * M * N + m * N + c));
                _mm256_storeu_ps(y + m * N + c, acc);
            }
    }
    free(part);
    return 0;
}

/* ---- fp32 products of a few rows (batched decode): weights in panels of 16 outputs ----

   Wp is [ceil(N/16), K, 16]: panel j holds outputs 16j..16j+15 for every input, so one panel is a single
   forward stream and each input's 16 weights are two aligned loads. Rows are taken 6 at a time (12 ymm
   accumulators, 2 weight loads and 6 broadcasts per input), over 512 inputs at a time so that the stretch
   of the panel the first 6 rows pulled in is still in L1/L2 for the next 6. Each thread takes whole
   panels. Measured on a 2-core AMD Milan for a 124M model's step (495 MB of weights): 16 rows 35-41 ms
   (90-110 GF/s), 4 rows 21-23 ms (the read bandwidth); oneDNN's packed products ~64 ms for 16 rows. */
#define SG_KC 512
#define SG_AHEAD 32 /* inputs ahead of the read (32 x 64 B): none was 25-40% slower, 8 or 64 no better */

static inline __attribute__((always_inline)) void panel_rows(const float *p, const float *x, long K, float *y,
                                                             long ys, long k0, long k1, const int R,
                                                             const float *b, int fetch) {
    __m256 a0[6], a1[6];
    _Pragma("GCC unroll 6") for (int r = 0; r < R; r++) {
        const float *src = k0 ? y + r * ys : b;
        a0[r] = src ? _mm256_loadu_ps(src) : _mm256_setzero_ps();
        a1[r] = src ? _mm256_loadu_ps(src + 8) : _mm256_setzero_ps();
    }
    p += k0 * 16;
    for (long k = k0; k < k1; k++, p += 16) {
        if (fetch) _mm_prefetch((const char *)(p + 16 * SG_AHEAD), _MM_HINT_T0);
        const __m256 w0 = _mm256_load_ps(p), w1 = _mm256_load_ps(p + 8);
        _Pragma("GCC unroll 6") for (int r = 0; r < R; r++) {
            const __m256 xv = _mm256_broadcast_ss(x + r * K + k);
            a0[r] = _mm256_fmadd_ps(xv, w0, a0[r]);
            a1[r] = _mm256_fmadd_ps(xv, w1, a1[r]);
        }
    }
    _Pragma("GCC unroll 6") for (int r = 0; r < R; r++) {
        _mm256_storeu_ps(y + r * ys, a0[r]);
        _mm256_storeu_ps(y + r * ys + 8, a1[r]);
    }
}

/* R rows of x times inputs k0..k1 of one panel into y (row stride ys): from k0 = 0 starting at the bias b
   (16 floats; NULL: zero), later adding to what y holds */
static void panel_block(const float *p, const float *x, long K, float *y, long ys, long k0, long k1, int R,
                        const float *b, int fetch) {
    switch (R) {
    case 6: panel_rows(p, x, K, y, ys, k0, k1, 6, b, fetch); break;
    case 5: panel_rows(p, x, K, y, ys, k0, k1, 5, b, fetch); break;
    case 4: panel_rows(p, x, K, y, ys, k0, k1, 4, b, fetch); break;
    case 3: panel_rows(p, x, K, y, ys, k0, k1, 3, b, fetch); break;
    case 2: panel_rows(p, x, K, y, ys, k0, k1, 2, b, fetch); break;
    default: panel_rows(p, x, K, y, ys, k0, k1, 1, b, fetch); break;
    }
}

/* The AVX-512 form of panel_block (in the AVX-512 section below): R <= SG_ROWS16 rows, a 16-float sum a row in
   one zmm register, so a pass takes up to 16 rows for one 64-byte load of the panel a step (a batch of 16 in one
   pass: its products 1.06x against 12 + 4). On CPUs with two 512-bit FMA units a cycle (Xeons) AVX2's 256-bit
   FMAs reach only half the machine's rate. */
#define SG_ROWS16 16
static void panel_block16(const float *p, const float *x, long K, float *y, long ys, long k0, long k1, int R,
                          const float *b, int fetch);

/* Panels [j0, j1) of the product of gemm_panels (below) by the calling thread: pb its [K, 16] buffer for a
   panel dequantized from int8 groups (Wp NULL), tail its [M, 16] one for a last panel with outputs past N */
static void panels_run(const float *Wp, const int8_t *q, const float *s, long Kp, const float *b, const float *x,
                       float *y, long M, long N, long K, long j0, long j1, float *pb, float *tail, int wide) {
    const long RB = wide ? SG_ROWS16 : 6, full = N / 16;
    for (long j = j0; j < j1; j++) {
        const long n0 = j * 16, rows = N - n0 < 16 ? N - n0 : 16;
        const float *p = Wp ? Wp + j * K * 16 : pb, *bj = Wp && b ? b + n0 : NULL;
        float bt[16] = {0};
        if (!Wp) { /* row n0 + r becomes column r of the panel (zeros past N), written in order */
            const int8_t *g[16];
            float sc[16];
            for (long r = 0; r < 16; r++) {
                const long n = n0 + (r < rows ? r : 0);
                g[r] = q + (n / 4) * Kp * 4 + (n % 4) * 32;
                sc[r] = r < rows ? s[n] : 0.f;
            }
            for (long k = 0; k < K; k++) {
                const long off = (k / 32) * 128 + k % 32;
                for (long r = 0; r < 16; r++) pb[k * 16 + r] = (float)g[r][off] * sc[r];
            }
            for (long r = 0; b && r < rows; r++) bt[r] = b[n0 + r];
            bj = b ? bt : NULL;
        }
        const int last = j >= full;
        float *yj = last ? tail : y + n0;
        const long ys = last ? 16 : N;
        for (long k0 = 0; k0 < K; k0 += SG_KC) {
            const long k1 = k0 + SG_KC < K ? k0 + SG_KC : K;
            for (long m = 0; m < M; m += RB) {
                const int R = M - m < RB ? (int)(M - m) : (int)RB;
                (wide ? panel_block16 : panel_block)(p, x + m * K, K, yj + m * ys, ys, k0, k1, R, bj, m == 0);
            }
        }
        if (last)
            for (long m = 0; m < M; m++) memcpy(y + m * N + n0, tail + m * 16, rows * sizeof(float));
    }
}

/* The panel loop of gptchat_sgemm and gptchat_qsgemm: y [M, N] = x [M, K] W (+ b), W either fp32 panels Wp (b,
   when given, padded to the panels) or (Wp NULL) int8 groups q of rows of Kp with scales s, each panel of 16
   outputs dequantized into a per-thread [K, 16] buffer first (b unpadded). Each thread takes whole panels; the
   last panel's outputs past N go to a buffer of its own, copied out at the end. ``wide``: the AVX-512 kernel
   (panel_block16). 0 or -1 (no memory). */
static int gemm_panels(const float *Wp, const int8_t *q, const float *s, long Kp, const float *b, const float *x,
                       float *y, long M, long N, long K, int threads, int wide) {
    if (M <= 0 || N <= 0) return 0;
    const long P = (N + 15) / 16, full = N / 16;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        long j0, j1;
        my_share(P, &j0, &j1);
        const int part = j1 > full && j0 < j1;
        float *pb = !Wp && j0 < j1 ? aligned_alloc(64, (K * 16 * sizeof(float) + 63) / 64 * 64) : NULL;
        float *tail = part ? aligned_alloc(64, (M * 16 * sizeof(float) + 63) / 64 * 64) : NULL;
        if ((!Wp && j0 < j1 && !pb) || (part && !tail)) failed = 1;
        if (!failed) panels_run(Wp, q, s, Kp, b, x, y, M, N, K, j0, j1, pb, tail, wide);
        free(pb);
        free(tail);
    }
    return failed ? -1 : 0;
}

/* y [M, N] = x [M, K] Wp (+ b). b, when given, is padded to the panels (ceil(N/16) x 16 floats); 0 or -1 (no
   memory for a tail buffer) */
int gptchat_sgemm(const float *Wp, const float *b, const float *x, float *y, long M, long N, long K, int threads,
                  int wide) {
    return gemm_panels(Wp, NULL, NULL, 0, b, x, y, M, N, K, threads, wide);
}

/* y [M, N] = x [M, K] (q * s)^T (+ b [N]) for many rows (prefill, eval): q in gptchat_pack's groups (rows of Kp),
   dequantized 16 outputs at a time into a per-thread [K, 16] panel (the layout gptchat_sgemm reads; 48 KB for
   K = 768) that the panel kernel then runs every row of x through: the fp32 weights never exist whole. Against
   PyTorch's GEMM on blocks of rows dequantized into a buffer, on a 2-core Zen 4, 1000 rows: 1.06-1.29x a product
   (124M's four shapes and the head). (Copying 16 columns of an fp32 [K, N] weight into such a panel the same way
   gave 0.96-1.23x a product and 1.03x a 124M prefill: not taken.) 0 or -1 (no memory for the buffers). */
int gptchat_qsgemm(const int8_t *q, const float *s, const float *b, const float *x, float *y, long M, long N, long K,
                   long Kp, int threads, int wide) {
    return gemm_panels(NULL, q, s, Kp, b, x, y, M, N, K, threads, wide);
}

/* ---- One whole decode step of a batch (M rows, one token each) on panels, in one call (gptchat_stepn, at the end
   of this file: its bf16 products are the AMX block's) ----------------------------------------------------------
   gptchat_step1's idea for a batch: the norms, products, cache writes, attention, activation and residuals of
   every layer, and the head, in one parallel region whose threads meet at barriers, instead of ~15 module calls
   a layer from Python, each of whose products entered a parallel region of its own. Each thread takes whole
   panels of each product (as gptchat_sgemm does: the same sums in the same order), then applies the activation
   or adds the residual on the columns it has just written; norms and embeddings go by rows, attention by
   (row, head). */

/* y [M, N] = post(x [M, K] Wp + b) for the calling thread's panels (t of nt): stored or activated in y, or (POST_ADD)
   computed into z and added to y, as the modules compute x + (h W + b) */
static void step_product(const float *Wp, const float *b, const float *x, float *y, float *z, long M, long N, long K,
                         long t, long nt, float *tail, int post, int act, int wide) {
    long j0, j1;
    rows_share((N + 15) / 16, t, nt, &j0, &j1);
    float *dst = post == POST_ADD ? z : y;
    panels_run(Wp, NULL, NULL, 0, b, x, dst, M, N, K, j0, j1, NULL, tail, wide);
    const long n0 = j0 * 16, n1 = j1 * 16 < N ? j1 * 16 : N;
    if (post != POST_STORE)
        for (long m = 0; m < M; m++) finish(y + m * N, dst + m * N, n0, n1, post, act);
}


/* ---- causal attention from slot 0 (fp32, or bf16 on CPUs with AVX512-BF16): training's forward and backward,
   and the forward of prefills and eval windows ----

   A 124M finetune step (4 x 1024 tokens, 2-core Zen 4) spent 13% (fp32) and 20% (bf16 autocast) of its time
   in PyTorch's CPU flash attention: 67 + 171 ms a layer forward + backward in fp32 (~95 GFLOP/s where its
   products ran at ~180), 67 + 137 in bf16 (~100 against ~400). Every product here is one microkernel,
   C (+)= A B over 4 rows of A and 16-64 outputs, with B packed in panels of 16 outputs: fp32 [n / 16][k][16]
   (one input's 16 weights a 64-byte load, times a broadcast of A's entry: FMA), bf16 [n / 16][k / 2][16][2]
   (a pair of inputs' 16 x 2 a 64-byte load, times a broadcast pair of A's: VDPBF16PS, 32 products an
   instruction). Both layouts put element (n, k) at the same element offset within a panel's 16 k, so the
   same offsets serve both. S = Q K^T, O = P V, dP = dO V^T, dV^T += dO^T P, dK^T += Q^T dS and dQ = dS K differ
   only in what is packed and which rows are read. Queries go by blocks of FQ rows over the keys they see; each
   (row, head) is one thread's, with its packed copies and its fp32 dK and dV sums. Softmax, log-sum-exp and dS
   are fp32; in bf16, P and dS are rounded to bf16 for their products, as PyTorch's bf16 kernel does. qkv is
   [B, T, 3C] (c_attn's output: q, k, v of head h at h * hs, C + h * hs, 2C + h * hs), out and dout [B, T, C]
   (the layout c_proj reads), lse [B, nh, T]; hs a multiple of 16. The forward may compute the last ``tail``
   queries only (out [B, tail, C], their lse rows): a prefill's or an eval window's last layer. (The bodies are
   functions of their own: OpenMP's outlined region does not inherit a target attribute.) */
#if (defined(__clang__) && __clang_major__ >= 9) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 10)
/* (compilers that know AVX512-BF16's intrinsics; with others gptchat_avx512_ok says 0 and the entry points are
   stubs: PyTorch's attention and oneDNN's bf16 products run) */
int gptchat_avx512_ok(void) { return 1; }
#define TGT __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#define AI static inline __attribute__((always_inline)) TGT
#define FQ 64 /* query rows a block */
#define FK 64 /* keys a block: each block of keys (or values) serves every row of the query block while in L1
                 (fp32, 124M's 12 layers at 1000 tokens on a 2-core Xeon: 96-98 -> 93-94 ms; bf16 the same) */

AI const void *at(const void *p, long i, const int bf) { return (const char *)p + i * (bf ? 2 : 4); }

/* 16 elements of p at i, widened */
AI __m512 ld16(const void *p, long i, const int bf) {
    if (!bf) return _mm512_loadu_ps((const float *)p + i);
    const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* panel_rows in zmm registers: R rows of x times inputs k0..k1 of one panel of 16 outputs */
AI void panel_rows16(const float *p, const float *x, long K, float *y, long ys, long k0, long k1, const int R,
                     const float *b, int fetch) {
    __m512 a[SG_ROWS16];
    _Pragma("GCC unroll 16") for (int r = 0; r < R; r++) {
        const float *src = k0 ? y + r * ys : b;
        a[r] = src ? _mm512_loadu_ps(src) : _mm512_setzero_ps();
    }
    p += k0 * 16;
    for (long k = k0; k < k1; k++, p += 16) {
        if (fetch) _mm_prefetch((const char *)(p + 16 * SG_AHEAD), _MM_HINT_T0);
        const __m512 w = _mm512_loadu_ps(p);
        _Pragma("GCC unroll 16") for (int r = 0; r < R; r++) a[r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * K + k]), w, a[r]);
    }
    _Pragma("GCC unroll 16") for (int r = 0; r < R; r++) _mm512_storeu_ps(y + r * ys, a[r]);
}

static TGT void panel_block16(const float *p, const float *x, long K, float *y, long ys, long k0, long k1, int R,
                              const float *b, int fetch) {
    switch (R) {
#define PR16(n) case n: panel_rows16(p, x, K, y, ys, k0, k1, n, b, fetch); break;
    PR16(16) PR16(15) PR16(14) PR16(13) PR16(12) PR16(11) PR16(10) PR16(9) PR16(8) PR16(7) PR16(6) PR16(5) PR16(4) PR16(3) PR16(2)
#undef PR16
    default: panel_rows16(p, x, K, y, ys, k0, k1, 1, b, fetch); break;
    }
}

/* dot_rows' bf16 pairs 32 inputs an iteration (one 64-byte load a row, two FMAs), then the last 8-24 inputs in
   dot_rows' AVX2 steps */
static TGT void dot_rows_wide(const uint16_t *W, const float *x, const float *xd, float *y, long K, long n0, long n1) {
    const long q = (n1 - n0) / STREAMS, K32 = K / 32 * 32;
    const __m512i hi = _mm512_set1_epi32((int)0xffff0000);
    for (long i = 0; i < q; i++) {
        const uint16_t *w[STREAMS];
        __m512 a[STREAMS], c[STREAMS];
        for (int j = 0; j < STREAMS; j++) {
            w[j] = W + (n0 + j * q + i) * K;
            a[j] = c[j] = _mm512_setzero_ps();
        }
        for (long k = 0; k < K32; k += 32)
            for (int j = 0; j < STREAMS; j++) {
                const __m512i v = _mm512_loadu_si512(w[j] + k);
                a[j] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), _mm512_loadu_ps(xd + k / 2), a[j]);
                c[j] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(v, hi)), _mm512_loadu_ps(xd + K / 2 + k / 2),
                                       c[j]);
            }
        for (int j = 0; j < STREAMS; j++) {
            __m256 a8 = _mm256_setzero_ps(), c8 = _mm256_setzero_ps();
            long k = K32;
            for (; k + 16 <= K; k += 16) dot16((const char *)w[j], x, xd, K, k, &a8, &c8, 1);
            if (k < K) a8 = _mm256_fmadd_ps(load8(w[j], k, 1), _mm256_loadu_ps(x + k), a8);
            y[n0 + j * q + i] = _mm512_reduce_add_ps(_mm512_add_ps(a[j], c[j])) + hsum8(_mm256_add_ps(a8, c8));
        }
    }
    dot_rows(W, x, xd, y, K, n0 + STREAMS * q, n1, 1); /* the rows left over */
}

/* C[r][0, 16 NV) (+)= A[r][0, k) B for the 4 rows A[r]; B's NV panels ps elements apart */
AI void mk(const void *const *A, const void *B, long ps, long k, float *C, long ldc, const int NV, int acc,
           const int bf) {
    __m512 c[4][4];
    for (int r = 0; r < 4; r++)
        for (int u = 0; u < NV; u++) c[r][u] = acc ? _mm512_loadu_ps(C + r * ldc + 16 * u) : _mm512_setzero_ps();
    if (bf) {
        const uint16_t *b0 = B;
        for (long p = 0; p < k / 2; p++) {
            __m512i b[4];
            for (int u = 0; u < NV; u++) b[u] = _mm512_loadu_si512(b0 + u * ps + p * 32);
            for (int r = 0; r < 4; r++) {
                int32_t w;
                memcpy(&w, (const uint16_t *)A[r] + 2 * p, 4);
                const __m512i a = _mm512_set1_epi32(w);
                for (int u = 0; u < NV; u++) c[r][u] = _mm512_dpbf16_ps(c[r][u], (__m512bh)a, (__m512bh)b[u]);
            }
        }
    } else {
        const float *b0 = B;
        for (long i = 0; i < k; i++) {
            __m512 b[4];
            for (int u = 0; u < NV; u++) b[u] = _mm512_loadu_ps(b0 + u * ps + i * 16);
            for (int r = 0; r < 4; r++) {
                const __m512 a = _mm512_set1_ps(((const float *)A[r])[i]);
                for (int u = 0; u < NV; u++) c[r][u] = _mm512_fmadd_ps(a, b[u], c[r][u]);
            }
        }
    }
    for (int r = 0; r < 4; r++)
        for (int u = 0; u < NV; u++) _mm512_storeu_ps(C + r * ldc + 16 * u, c[r][u]);
}

/* C[4][0, n) over B's panels (n a multiple of 16) */
AI void rows_of(const void *const *A, const void *B, long ps, long k, float *C, long ldc, long n, int acc, const int bf) {
    long u = 0;
    for (; u + 64 <= n; u += 64) mk(A, at(B, u / 16 * ps, bf), ps, k, C + u, ldc, 4, acc, bf);
    /* the last 16-48 in one call: one panel a call kept four sums in flight, half the FMAs' rate */
    if (n - u >= 48) {
        mk(A, at(B, u / 16 * ps, bf), ps, k, C + u, ldc, 3, acc, bf);
        u += 48;
    } else if (n - u >= 32) {
        mk(A, at(B, u / 16 * ps, bf), ps, k, C + u, ldc, 2, acc, bf);
        u += 32;
    }
    for (; u < n; u += 16) mk(A, at(B, u / 16 * ps, bf), ps, k, C + u, ldc, 1, acc, bf);
}
static TGT void mk_rows(const void *const *A, const void *B, long ps, long k, float *C, long ldc, long n, int acc,
                        int bf) {
    if (bf)
        rows_of(A, B, ps, k, C, ldc, n, acc, 1);
    else
        rows_of(A, B, ps, k, C, ldc, n, acc, 0);
}

/* Rows ahead of the one being packed that pack_nk and pack_kn prefetch: a head's keys and values are rows 3C apart
   in the qkv buffer (a page or more each), so no hardware prefetcher follows them; unprefetched, the loads of
   pack_nk's rows took ~12% of a 1000-token fp32 forward's time. On a 2-core Xeon, 124M's 12 layers at 1000 tokens:
   fp32 103 -> 92-94 ms, bf16 120 -> 114 ms (4, 8 or 32 rows ahead alike, 16 no better) */
#define PACK_AHEAD 8

/* rows [0, n) of src (row stride sn elements, k contiguous entries; k even) -> panels of 16 rows, rows past n
   zero. A panel's unit is a 32-bit word either way (one fp32 entry, or a pair of bf16 ones). ``bias``: k fp32
   entries added to every row (fp32 only; NULL: none) */
static void pack_nk(const void *src, long sn, long n, long n16, long k, void *dst, int bf, const float *bias) {
    const long W = bf ? k / 2 : k, rowb = sn * (bf ? 2 : 4);
    uint32_t *o = dst;
    for (long j0 = 0; j0 < n16; j0 += 16, o += 16 * W)
        for (long jj = 0; jj < 16; jj++) {
            const long j = j0 + jj;
            for (long c = 0; j + PACK_AHEAD < n && c < W * 4; c += 64)
                _mm_prefetch((const char *)src + (j + PACK_AHEAD) * rowb + c, _MM_HINT_T0);
            if (j < n && bias)
                for (long w = 0; w < W; w++) ((float *)o)[w * 16 + jj] = ((const float *)src)[j * sn + w] + bias[w];
            else if (j < n)
                for (long w = 0; w < W; w++) memcpy(o + w * 16 + jj, (const char *)src + j * rowb + 4 * w, 4);
            else
                for (long w = 0; w < W; w++) o[w * 16 + jj] = 0;
        }
}

/* rows [0, kn) of src (row stride sk elements, n contiguous entries; n a multiple of 16) as the inputs of a
   product -> n / 16 panels of k2 inputs (k2 even), rows past kn zero; ``bias`` as pack_nk's */
static TGT void pack_kn(const void *src, long sk, long kn, long k2, long n, void *dst, int bf, const float *bias) {
    const __m512i idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                         37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    for (long i = 0; i < k2; i += 2)
        for (long d = 0; d < n; d += 16) {
            for (long x = 0; d == 0 && x < 2 && i + x + PACK_AHEAD < kn; x++)
                for (long c = 0; c < n * (bf ? 2 : 4); c += 64)
                    _mm_prefetch((const char *)src + (i + x + PACK_AHEAD) * sk * (bf ? 2 : 4) + c, _MM_HINT_T0);
            if (!bf) {
                float *o = (float *)dst + (d / 16) * k2 * 16 + i * 16;
                const __m512 b = bias ? _mm512_loadu_ps(bias + d) : _mm512_setzero_ps();
                for (int x = 0; x < 2; x++)
                    _mm512_storeu_ps(o + 16 * x, i + x < kn ? _mm512_add_ps(_mm512_loadu_ps((const float *)src + (i + x) * sk + d), b)
                                                            : _mm512_setzero_ps());
                continue;
            }
            const uint16_t *s16 = src;
            const __m512i a = i < kn ? _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(s16 + i * sk + d)))
                                     : _mm512_setzero_si512();
            const __m512i b = i + 1 < kn
                                  ? _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(s16 + (i + 1) * sk + d)))
                                  : _mm512_setzero_si512();
            _mm512_storeu_si512((uint16_t *)dst + (d / 16) * k2 * 16 + i * 16, _mm512_permutex2var_epi16(a, idx, b));
        }
}

/* e^x for 16 floats, as exp8 (the power of two by scalef: the same product, four instructions fewer; a 124M
   layer's 1000-token fp32 attention on a 2-core Xeon 7.50 -> 7.37 ms) */
AI __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(EXP_LO)), _mm512_set1_ps(EXP_HI));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(EXP_LOG2E)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_HI), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_LO), r);
    __m512 p = _mm512_set1_ps(EXP_P0);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P5));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return _mm512_scalef_ps(p, n); /* p 2^n, as exp8's built power of two gives it, in one instruction */
}

/* finish's tanh GELU sixteen lanes at a time (the same operations as its AVX2 form, so the same results; the
   last n % 16 by finish). On a 2-core Xeon a [1000, 3072] buffer 2.65 -> 1.82 ms; in a 1000-token 124M fp32
   prefill the 12 activations 15.7 -> 12.5 ms (each reads and writes 12 MB the product has just written) */
static TGT void gelu16(float *y, const float *v, long n0, long n1) {
    long n = n0;
    for (; n + 16 <= n1; n += 16) {
        const __m512 x = _mm512_loadu_ps(v + n), x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
        const __m512 u2 = _mm512_mul_ps(_mm512_set1_ps(1.5957691216f), _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), x3, x));
        const __m512 d = _mm512_add_ps(_mm512_set1_ps(1.f), exp16(u2));
        _mm512_storeu_ps(y + n, _mm512_sub_ps(x, _mm512_div_ps(x, d)));
    }
    finish(y, v, n, n1, POST_ACT, ACT_GELU_TANH);
}

/* src rows [0, n) (row stride sn elements, hs contiguous entries) -> dst [hs][Tp] (row d: entry d of every row),
   zero past n */
static void transpose(const void *src, long sn, long n, long Tp, long hs, void *dst, int bf) {
    for (long i0 = 0; i0 < Tp; i0 += 16)
        for (long d = 0; d < hs; d++)
            for (long i = i0; i < i0 + 16; i++) {
                if (bf)
                    ((uint16_t *)dst)[d * Tp + i] = i < n ? ((const uint16_t *)src)[i * sn + d] : 0;
                else
                    ((float *)dst)[d * Tp + i] = i < n ? ((const float *)src)[i * sn + d] : 0.f;
            }
}

/* 4 row pointers from row r0 of a block (rows past the last valid one read the last: their sums are unused) */
AI void rows4(const void **A, const void *base, long stride, long r0, long last, const int bf) {
    for (int r = 0; r < 4; r++) A[r] = at(base, (r0 + r < last ? r0 + r : last) * stride, bf);
}

/* keys the rows [r0, r0 + 4) of a block at i0 need: through row r0 + 3, rounded up to 16, at most n16 */
static inline long seen(long i0, long r0, long n16) {
    const long n = (i0 + r0 + 4 + 15) / 16 * 16;
    return n < n16 ? n : n16;
}

/* n floats (a multiple of 16) to dst: stored, or rounded to bf16 */
AI void store16s(void *dst, const float *src, long n, const int bf) {
    for (long d = 0; d < n; d += 16) {
        if (bf)
            _mm256_storeu_si256((__m256i *)((uint16_t *)dst + d), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + d)));
        else
            _mm512_storeu_ps((float *)dst + d, _mm512_loadu_ps(src + d));
    }
}

/* max of s[0, n): sixteen lanes, four accumulators (a scalar loop, which the compiler leaves scalar without
   -ffast-math, was ~3 of the 7.5 ms a 124M layer's bf16 forward took at 1000 tokens) */
AI float rowmax(const float *s, long n) {
    __m512 m[4];
    for (int u = 0; u < 4; u++) m[u] = _mm512_set1_ps(-INFINITY);
    long j = 0;
    for (; j + 64 <= n; j += 64)
        for (int u = 0; u < 4; u++) m[u] = _mm512_max_ps(m[u], _mm512_loadu_ps(s + j + 16 * u));
    for (; j + 16 <= n; j += 16) m[0] = _mm512_max_ps(m[0], _mm512_loadu_ps(s + j));
    float r = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m[0], m[1]), _mm512_max_ps(m[2], m[3])));
    for (; j < n; j++) r = s[j] > r ? s[j] : r;
    return r;
}

/* rows [0, n) of src (row stride sn elements, hs contiguous entries), ``bias`` (fp32; NULL: none) added, to dst's
   rows (hs apart): a head's keys or values into its KV cache */
static TGT void rows_to(const void *src, long sn, long n, long hs, const float *bias, void *dst, const int bf) {
    const long e = bf ? 2 : 4;
    for (long j = 0; j < n; j++) {
        const char *r = (const char *)src + j * sn * e;
        for (long c = 0; j + PACK_AHEAD < n && c < hs * e; c += 64) _mm_prefetch(r + PACK_AHEAD * sn * e + c, _MM_HINT_T0);
        if (bias)
            for (long d = 0; d < hs; d += 16)
                _mm512_storeu_ps((float *)dst + j * hs + d, _mm512_add_ps(_mm512_loadu_ps((const float *)r + d),
                                                                          _mm512_loadu_ps(bias + d)));
        else
            memcpy((char *)dst + j * hs * e, r, hs * e);
    }
}

/* The forward of one (row, head) bh on one thread's scratch. ``bias``: c_attn's (3C fp32; NULL: qkv has it
   already), added to q, k and v as they are read; kc, vc: the KV cache (NULL: none), row b's head h at
   b sb + h sh elements in, its slots hs apart, whose slots [0, T) get the keys and values, then packed from there */
AI void fwd_head(const void *qkv, void *out, float *lse, long bh, long T, long tail, long C, long nh, long hs,
                 float scale, char *scratch, const float *bias, void *kc, void *vc, long sb, long sh, const int bf) {
    const long Tp = (T + FQ - 1) / FQ * FQ, ld3 = 3 * C, b = bh / nh, h = bh % nh;
    void *kp = scratch, *vp = (void *)at(kp, Tp * hs, bf), *P = (void *)at(vp, Tp * hs, bf);
    float *S = (float *)at(P, FQ * Tp, bf), *O = S + FQ * Tp;
    void *Qb = O + FQ * hs;
    const void *q0 = at(qkv, b * T * ld3 + h * hs, bf), *k0 = at(q0, C, bf), *v0 = at(q0, 2 * C, bf);
    const float *qb = bias ? bias + h * hs : NULL, *kb = bias ? bias + C + h * hs : NULL;
    const float *vb = bias ? bias + 2 * C + h * hs : NULL;
    if (kc) {
        void *kd = (void *)at(kc, b * sb + h * sh, bf), *vd = (void *)at(vc, b * sb + h * sh, bf);
        rows_to(k0, ld3, T, hs, kb, kd, bf);
        rows_to(v0, ld3, T, hs, vb, vd, bf);
        pack_nk(kd, hs, T, Tp, hs, kp, bf, NULL);
        pack_kn(vd, hs, T, Tp, hs, vp, bf, NULL);
    } else {
        pack_nk(k0, ld3, T, Tp, hs, kp, bf, kb);
        pack_kn(v0, ld3, T, Tp, hs, vp, bf, vb);
    }
    for (long i0 = T - tail; i0 < T; i0 += FQ) {
        const long rows = T - i0 < FQ ? T - i0 : FQ, n16 = (i0 + rows + 15) / 16 * 16;
        const void *A[4];
        float inv[FQ];
        for (long r = 0; r < rows; r++) { /* the block's queries side by side: their rows in qkv are 3C apart */
            const char *src = at(q0, (i0 + r) * ld3, bf);
            for (long c = 0; r + PACK_AHEAD < rows && c < hs * (bf ? 2 : 4); c += 64)
                _mm_prefetch(src + PACK_AHEAD * ld3 * (bf ? 2 : 4) + c, _MM_HINT_T0);
            memcpy((char *)Qb + r * hs * (bf ? 2 : 4), src, hs * (bf ? 2 : 4));
            for (long d = 0; qb && d < hs; d += 16)
                _mm512_storeu_ps((float *)Qb + r * hs + d,
                                 _mm512_add_ps(_mm512_loadu_ps((float *)Qb + r * hs + d), _mm512_loadu_ps(qb + d)));
        }
        for (long u = 0; u < n16; u += FK) /* a block of keys at a time, in L1 for every row of the block */
            for (long r0 = 0; r0 < rows; r0 += 4) {
                const long n = seen(i0, r0, n16);
                if (u >= n) continue;
                rows4(A, Qb, hs, r0, rows - 1, bf);
                mk_rows(A, at(kp, u * hs, bf), hs * 16, hs, S + r0 * Tp + u, Tp, n - u < FK ? n - u : FK, 0, bf);
            }
        for (long r = 0; r < rows; r++) { /* P = e^(s - max) as it comes, zero past the row's last key up to n16;
                                             the 1 / sum goes into O's row when it is stored */
            const long i = i0 + r, len = i + 1;
            const float *s = S + r * Tp;
            const float ms = rowmax(s, len) * scale;
            __m512 acc = _mm512_setzero_ps();
            for (long j = 0; j < n16; j += 16) {
                const long left = len - j;
                const __mmask16 m = left >= 16 ? (__mmask16)0xffff : left > 0 ? (__mmask16)((1u << left) - 1) : 0;
                const __m512 e = _mm512_maskz_mov_ps(
                    m, exp16(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(m, s + j), _mm512_set1_ps(scale), _mm512_set1_ps(ms))));
                acc = _mm512_add_ps(acc, e);
                if (bf)
                    _mm256_storeu_si256((__m256i *)((uint16_t *)P + r * Tp + j), (__m256i)_mm512_cvtneps_pbh(e));
                else
                    _mm512_storeu_ps((float *)P + r * Tp + j, e);
            }
            const float sum = _mm512_reduce_add_ps(acc);
            lse[bh * T + i] = ms + logf(sum);
            inv[r] = 1.f / sum;
        }
        for (long u = 0; u < n16; u += FK) /* the values a block of keys at a time, summed into O */
            for (long r0 = 0; r0 < rows; r0 += 4) {
                const long n = seen(i0, r0, n16);
                if (u >= n) continue;
                rows4(A, at(P, u, bf), Tp, r0, rows - 1, bf);
                mk_rows(A, at(vp, u * 16, bf), Tp * 16, n - u < FK ? n - u : FK, O + r0 * hs, hs, hs, u > 0, bf);
            }
        for (long r = 0; r < rows; r++) {
            float *o = O + r * hs;
            for (long d = 0; d < hs; d += 16) _mm512_storeu_ps(o + d, _mm512_mul_ps(_mm512_loadu_ps(o + d), _mm512_set1_ps(inv[r])));
            store16s((void *)at(out, (b * tail + i0 + r - (T - tail)) * C + h * hs, bf), o, hs, bf);
        }
    }
}
static TGT void fwd_head_f(const void *qkv, void *out, float *lse, long bh, long T, long tail, long C, long nh, long hs,
                           float scale, char *scratch, const float *bias, void *kc, void *vc, long sb, long sh, int bf) {
    if (bf)
        fwd_head(qkv, out, lse, bh, T, tail, C, nh, hs, scale, scratch, NULL, kc, vc, sb, sh, 1);
    else
        fwd_head(qkv, out, lse, bh, T, tail, C, nh, hs, scale, scratch, bias, kc, vc, sb, sh, 0);
}

/* The backward of one (row, head) bh on one thread's scratch. dV and dK are summed transposed ([hs][Tp]:
   dV^T += dO^T P, dK^T += Q^T dS), so that P and dS go into their panels straight from their rows, two rows
   at a time */
AI void bwd_head(const void *qkv, const void *out, const void *dout, const float *lse, void *dqkv, long bh, long T,
                 long C, long nh, long hs, float scale, char *scratch, const int bf) {
    const long Tp = (T + FQ - 1) / FQ * FQ, ld3 = 3 * C, b = bh / nh, h = bh % nh;
    const __m512i idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                         37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    void *kn = scratch, *vn = (void *)at(kn, Tp * hs, bf), *kk = (void *)at(vn, Tp * hs, bf);
    void *qT = (void *)at(kk, Tp * hs, bf), *gT = (void *)at(qT, Tp * hs, bf), *Pp = (void *)at(gT, Tp * hs, bf);
    void *dSp = (void *)at(Pp, FQ * Tp, bf), *dSb = (void *)at(dSp, FQ * Tp, bf);
    float *dKT = (float *)at(dSb, FQ * Tp, bf), *dVT = dKT + Tp * hs, *S = dVT + Tp * hs, *dP = S + FQ * Tp;
    float *dQ = dP + FQ * Tp;
    const void *q0 = at(qkv, b * T * ld3 + h * hs, bf), *k0 = at(q0, C, bf), *v0 = at(q0, 2 * C, bf);
    const void *o0 = at(out, b * T * C + h * hs, bf), *g0 = at(dout, b * T * C + h * hs, bf);
    pack_nk(k0, ld3, T, Tp, hs, kn, bf, NULL);
    pack_nk(v0, ld3, T, Tp, hs, vn, bf, NULL);
    pack_kn(k0, ld3, T, Tp, hs, kk, bf, NULL);
    transpose(q0, ld3, T, Tp, hs, qT, bf);
    transpose(g0, C, T, Tp, hs, gT, bf);
    memset(dKT, 0, 2 * Tp * hs * sizeof(float));
    for (long i0 = 0; i0 < T; i0 += FQ) {
        const long rows = T - i0 < FQ ? T - i0 : FQ, n16 = (i0 + rows + 15) / 16 * 16;
        const void *A[4];
        for (long r0 = 0; r0 < rows; r0 += 4) {
            const long n = seen(i0, r0, n16);
            rows4(A, q0, ld3, i0 + r0, T - 1, bf);
            mk_rows(A, kn, hs * 16, hs, S + r0 * Tp, Tp, n, 0, bf);
            rows4(A, g0, C, i0 + r0, T - 1, bf);
            mk_rows(A, vn, hs * 16, hs, dP + r0 * Tp, Tp, n, 0, bf);
        }
        for (long r = 0; r < FQ; r += 2) { /* P and dS of rows r and r + 1, 16 keys at a time */
            float L[2] = {0.f, 0.f}, dl[2] = {0.f, 0.f};
            long last[2] = {-1, -1}; /* the row's last key (-1: a row past T) */
            for (int x = 0; x < 2; x++) {
                const long i = i0 + r + x;
                if (r + x >= rows) continue;
                __m512 acc = _mm512_setzero_ps();
                for (long d = 0; d < hs; d += 16) acc = _mm512_fmadd_ps(ld16(g0, i * C + d, bf), ld16(o0, i * C + d, bf), acc);
                dl[x] = _mm512_reduce_add_ps(acc), L[x] = lse[bh * T + i], last[x] = i;
            }
            for (long j0 = 0; j0 < n16; j0 += 16) {
                __m512 p[2], g[2];
                for (int x = 0; x < 2; x++) {
                    p[x] = g[x] = _mm512_setzero_ps();
                    if (j0 <= last[x]) {
                        const __mmask16 m = _mm512_cmple_epi32_mask(_mm512_add_epi32(_mm512_set1_epi32(j0), iota),
                                                                    _mm512_set1_epi32(last[x]));
                        const float *s = S + (r + x) * Tp + j0, *dp = dP + (r + x) * Tp + j0;
                        p[x] = _mm512_maskz_mov_ps(m, exp16(_mm512_fmsub_ps(_mm512_loadu_ps(s), _mm512_set1_ps(scale),
                                                                            _mm512_set1_ps(L[x]))));
                        g[x] = _mm512_maskz_mul_ps(m, _mm512_mul_ps(p[x], _mm512_set1_ps(scale)),
                                                   _mm512_sub_ps(_mm512_loadu_ps(dp), _mm512_set1_ps(dl[x])));
                    }
                    store16s((void *)at(dSb, (r + x) * Tp + j0, bf), (const float *)&g[x], 16, bf);
                }
                const long o = (j0 / 16) * FQ * 16 + r * 16; /* rows r and r + 1 of the panel of keys j0.. */
                if (bf) {
                    const __m256i p0 = (__m256i)_mm512_cvtneps_pbh(p[0]), p1 = (__m256i)_mm512_cvtneps_pbh(p[1]);
                    const __m256i g0b = (__m256i)_mm512_cvtneps_pbh(g[0]), g1b = (__m256i)_mm512_cvtneps_pbh(g[1]);
                    _mm512_storeu_si512((uint16_t *)Pp + o, _mm512_permutex2var_epi16(_mm512_castsi256_si512(p0), idx,
                                                                                      _mm512_castsi256_si512(p1)));
                    _mm512_storeu_si512((uint16_t *)dSp + o, _mm512_permutex2var_epi16(_mm512_castsi256_si512(g0b), idx,
                                                                                       _mm512_castsi256_si512(g1b)));
                } else {
                    for (int x = 0; x < 2; x++) {
                        _mm512_storeu_ps((float *)Pp + o + 16 * x, p[x]);
                        _mm512_storeu_ps((float *)dSp + o + 16 * x, g[x]);
                    }
                }
            }
        }
        for (long d0 = 0; d0 < hs; d0 += 4) {
            rows4(A, at(gT, i0, bf), Tp, d0, hs - 1, bf);
            mk_rows(A, Pp, FQ * 16, FQ, dVT + d0 * Tp, Tp, n16, 1, bf);
            rows4(A, at(qT, i0, bf), Tp, d0, hs - 1, bf);
            mk_rows(A, dSp, FQ * 16, FQ, dKT + d0 * Tp, Tp, n16, 1, bf);
        }
        for (long r0 = 0; r0 < rows; r0 += 4) {
            rows4(A, dSb, Tp, r0, rows - 1, bf);
            mk_rows(A, kk, Tp * 16, n16, dQ + r0 * hs, hs, hs, 0, bf);
        }
        for (long r = 0; r < rows; r++) store16s((void *)at(dqkv, (b * T + i0 + r) * ld3 + h * hs, bf), dQ + r * hs, hs, bf);
    }
    for (long j = 0; j < T; j++) {
        void *dk = (void *)at(dqkv, (b * T + j) * ld3 + C + h * hs, bf), *dv = (void *)at(dk, C, bf);
        for (long d = 0; d < hs; d++) {
            if (bf) {
                ((uint16_t *)dk)[d] = to_bf16(dKT[d * Tp + j]);
                ((uint16_t *)dv)[d] = to_bf16(dVT[d * Tp + j]);
            } else {
                ((float *)dk)[d] = dKT[d * Tp + j];
                ((float *)dv)[d] = dVT[d * Tp + j];
            }
        }
    }
}
static TGT void bwd_head_f(const void *qkv, const void *out, const void *dout, const float *lse, void *dqkv, long bh,
                           long T, long C, long nh, long hs, float scale, char *scratch, int bf) {
    if (bf)
        bwd_head(qkv, out, dout, lse, dqkv, bh, T, C, nh, hs, scale, scratch, 1);
    else
        bwd_head(qkv, out, dout, lse, dqkv, bh, T, C, nh, hs, scale, scratch, 0);
}

/* Both directions: each thread a scratch of its own, the (row, head) pairs dealt out one at a time. The forward
   writes dst = out [B, T, C] and lse; the backward dst = dqkv [B, T, 3C] (every element) from dout and the
   forward's out and lse. 0, or -1 (no memory) */
static int each_head(int bwd, const void *qkv, const void *out, const void *dout, float *lse, void *dst, long B, long T,
                     long tail, long C, long nh, long hs, float scale, const float *bias, void *kc, void *vc, long sb,
                     long sh, int threads, int bf) {
    const long Tp = (T + FQ - 1) / FQ * FQ, e = bf ? 2 : 4;
    /* forward: packed K and V (Tp hs each), P (FQ Tp); fp32 S (FQ Tp), O (FQ hs). backward: packed K and V for S
       and dP, K for dQ, Q^T and dO^T (Tp hs each); P, dS packed, dS rows (FQ Tp each); fp32 dK^T, dV^T (hs Tp),
       S, dP (FQ Tp), dQ (FQ hs) */
    const long bytes = bwd ? (5 * Tp * hs + 3 * FQ * Tp) * e + (2 * Tp * hs + 2 * FQ * Tp + FQ * hs) * 4
                           : (2 * Tp * hs + FQ * Tp + FQ * hs) * e + (FQ * Tp + FQ * hs) * 4;
    const long per = (bytes + 63) / 64 * 64;
    char *buf = aligned_alloc(64, threads * per);
    if (!buf) return -1;
#pragma omp parallel num_threads(threads)
    {
#ifdef _OPENMP
        const long t = omp_get_thread_num();
#else
        const long t = 0;
#endif
#pragma omp for schedule(dynamic, 1)
        for (long bh = 0; bh < B * nh; bh++) {
            if (bwd)
                bwd_head_f(qkv, out, dout, lse, dst, bh, T, C, nh, hs, scale, buf + t * per, bf);
            else
                fwd_head_f(qkv, dst, lse, bh, T, tail, C, nh, hs, scale, buf + t * per, bias, kc, vc, sb, sh, bf);
        }
    }
    free(buf);
    return 0;
}

/* the forward of every (row, head); ``bias``, kc, vc, sb, sh as fwd_head's. 0, -1 (no memory) or -2 (a bias with
   bf16) */
int gptchat_attn_fwd(const void *qkv, void *out, float *lse, long B, long T, long tail, long C, long nh, long hs,
                     float scale, const float *bias, void *kc, void *vc, long sb, long sh, int threads, int bf) {
    if (bias && bf) return -2;
    return each_head(0, qkv, NULL, NULL, lse, out, B, T, tail, C, nh, hs, scale, bias, kc, vc, sb, sh, threads, bf);
}

int gptchat_attn_bwd(const void *qkv, const void *out, const void *dout, const float *lse, void *dqkv, long B, long T,
                     long C, long nh, long hs, float scale, int threads, int bf) {
    return each_head(1, qkv, out, dout, (float *)lse, dqkv, B, T, T, C, nh, hs, scale, NULL, NULL, NULL, 0, 0, threads, bf);
}

/* ---- bf16 products of a few rows (batched bf16 decode): weights in the panels above ---- */

/* W [N, K] bf16 (nn.Linear's rows, K even) -> [ceil(N / 16)][K / 2][16][2], outputs past N zero */
void gptchat_bpack(const uint16_t *W, uint16_t *out, long N, long K) {
    pack_nk(W, K, N, (N + 15) / 16 * 16, K, out, 1, NULL);
}

/* The outputs [u0, u1) (multiples of 64, or N16) of every row, on one thread's [M][64] fp32 buffer */
static TGT void bgemm_part(const uint16_t *Wp, const uint16_t *b, const uint16_t *x, uint16_t *y, long M, long N,
                           long K, long u0, long u1, float *acc) {
    const long N16 = (N + 15) / 16 * 16;
    for (long u = u0; u < u1; u += 64) {
        const int NV = N16 - u < 64 ? (int)((N16 - u) / 16) : 4;
        const void *A[4];
        for (long r0 = 0; r0 < M; r0 += 4) {
            rows4(A, x, K, r0, M - 1, 1);
            if (NV == 4)
                mk(A, Wp + (u / 16) * K * 16, K * 16, K, acc + r0 * 64, 64, 4, 0, 1);
            else
                for (int v = 0; v < NV; v++) mk(A, Wp + (u / 16 + v) * K * 16, K * 16, K, acc + r0 * 64 + 16 * v, 64, 1, 0, 1);
        }
        const long n1 = u + 64 < N ? u + 64 : N;
        for (long r = 0; r < M; r++)
            for (long n = u; n < n1; n++) y[r * N + n] = to_bf16(acc[r * 64 + n - u] + (b ? ld1(b, n, 1) : 0.f));
    }
}

/* y [M, N] = x [M, K] W^T (+ b [N]), bf16 in and out, fp32 sums; W from gptchat_bpack. Each thread takes
   blocks of 64 outputs, every row through each while its panels are in cache. 0, or -1 (no memory) */
int gptchat_bgemm(const uint16_t *Wp, const uint16_t *b, const uint16_t *x, uint16_t *y, long M, long N, long K,
                  int threads) {
    const long blocks = (N + 63) / 64;
    float *buf = aligned_alloc(64, ((long)threads * ((M + 3) / 4 * 4) * 64 * sizeof(float) + 63) / 64 * 64);
    if (!buf) return -1;
#pragma omp parallel num_threads(threads)
    {
#ifdef _OPENMP
        const long t = omp_get_thread_num(), T = omp_get_num_threads();
#else
        const long t = 0, T = 1;
#endif
        const long per = (blocks + T - 1) / T, b0 = t * per < blocks ? t * per : blocks;
        const long b1 = b0 + per < blocks ? b0 + per : blocks, N16 = (N + 15) / 16 * 16;
        const long u1 = b1 * 64 < N16 ? b1 * 64 : N16;
        if (b0 < b1) bgemm_part(Wp, b, x, y, M, N, K, b0 * 64, u1, buf + t * ((M + 3) / 4 * 4) * 64);
    }
    free(buf);
    return 0;
}
#undef TGT
#undef AI
#undef FQ
#else
int gptchat_avx512_ok(void) { return 0; }
static void gelu16(float *y, const float *v, long n0, long n1) { finish(y, v, n0, n1, POST_ACT, ACT_GELU_TANH); }
static void panel_block16(const float *p, const float *x, long K, float *y, long ys, long k0, long k1, int R,
                          const float *b, int fetch) {
    for (int r = 0; r < R; r += 6) panel_block(p, x + r * K, K, y + r * ys, ys, k0, k1, R - r < 6 ? R - r : 6, b, fetch);
}
static void dot_rows_wide(const uint16_t *W, const float *x, const float *xd, float *y, long K, long n0, long n1) {
    dot_rows(W, x, xd, y, K, n0, n1, 1);
}
void gptchat_bpack(const uint16_t *W, uint16_t *out, long N, long K) {}
int gptchat_bgemm(const uint16_t *Wp, const uint16_t *b, const uint16_t *x, uint16_t *y, long M, long N, long K,
                  int threads) {
    return -3;
}
int gptchat_attn_fwd(const void *qkv, void *out, float *lse, long B, long T, long tail, long C, long nh, long hs,
                     float scale, const float *bias, void *kc, void *vc, long sb, long sh, int threads, int bf) {
    return -3;
}
int gptchat_attn_bwd(const void *qkv, const void *out, const void *dout, const float *lse, void *dqkv, long B, long T,
                     long C, long nh, long hs, float scale, int threads, int bf) {
    return -3;
}
#endif

/* ---- bf16 products of up to 64 rows on AMX tiles (batched bf16 decode on CPUs with AMX) ----

   The bf16 panels above ([ceil(N / 16)][K / 2][16][2]) are already the layout AMX multiplies: 32 inputs of a
   panel, 16 pairs x 16 outputs, are 16 rows of 64 bytes, one B tile. Up to 16 activation rows are an A tile
   (32 inputs each), their 16 sums a C tile (fp32); each panel's tile is read once for up to four blocks of 16
   rows. Each thread takes whole panels. K a multiple of 32. On a 2-core Xeon with AMX, a 124M model's 49
   products at 16 rows: 0.69 of a plain read's speed with no software prefetch, 0.49-0.60 prefetching 1-16 tiles
   ahead, 0.65 taking two panels a pass; batch-16 bf16 decode 1.74-1.82x -> 2.14x transformers' against oneDNN's
   packed products, alternating. */
#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11)
#include <sys/syscall.h>
#include <unistd.h>
#define AMX __attribute__((target("amx-tile,amx-bf16")))
#define AMXI static inline __attribute__((always_inline, target("amx-tile,amx-bf16")))

typedef struct {
    uint8_t palette, start;
    uint8_t zero[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed)) tile_config;

/* Linux hands a process the tiles' state only when asked (arch_prctl ARCH_REQ_XCOMP_PERM, XTILEDATA): 1 granted */
int gptchat_amx_ok(void) { return syscall(SYS_arch_prctl, 0x1023, 18) == 0; }

/* one C tile's M x 16 sums + bias -> outputs n0.. of rows r0..: bf16 in y, or fp32 in y32 where given */
static void amx_out(const float *t, const uint16_t *b, uint16_t *y, float *y32, long rows, long r0, long n0, long N) {
    const long nn = N - n0 < 16 ? N - n0 : 16;
    for (long r = 0; r < rows; r++)
        for (long j = 0; j < nn; j++) {
            const float v = t[r * 16 + j] + (b ? ld1(b, n0 + j, 1) : 0.f);
            if (y32) y32[(r0 + r) * N + n0 + j] = v;
            else y[(r0 + r) * N + n0 + j] = to_bf16(v);
        }
}

/* The tiles for RB blocks of rows (the last of ``last`` rows): A 0 (16 rows) and 2 (the last block), B 1, C 4.. */
AMXI void amx_config(long RB, long last) {
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    c.rows[0] = 16, c.colsb[0] = 64;   /* A: a block of 16 rows */
    c.rows[1] = 16, c.colsb[1] = 64;   /* B: 16 pairs of inputs x 16 outputs */
    c.rows[2] = last, c.colsb[2] = 64; /* A: the last block */
    for (long t = 0; t < RB; t++) c.rows[4 + t] = t == RB - 1 ? last : 16, c.colsb[4 + t] = 64;
    _tile_loadconfig(&c);
}

/* One chunk of 32 inputs through the B tile (1), loaded: the RB blocks of 16 rows whose chunk starts at a (rows K
   apart; the last block through A tile 2, configured to its rows) summed into C tiles 4 to 3 + RB */
AMXI void amx_chunk(const uint16_t *a, long K, long RB) {
    switch (RB) { /* tile numbers are immediates */
    case 4:
        _tile_loadd(0, a, K * 2); _tile_dpbf16ps(4, 0, 1);
        _tile_loadd(0, a + 16 * K, K * 2); _tile_dpbf16ps(5, 0, 1);
        _tile_loadd(0, a + 32 * K, K * 2); _tile_dpbf16ps(6, 0, 1);
        _tile_loadd(2, a + 48 * K, K * 2); _tile_dpbf16ps(7, 2, 1);
        break;
    case 3:
        _tile_loadd(0, a, K * 2); _tile_dpbf16ps(4, 0, 1);
        _tile_loadd(0, a + 16 * K, K * 2); _tile_dpbf16ps(5, 0, 1);
        _tile_loadd(2, a + 32 * K, K * 2); _tile_dpbf16ps(6, 2, 1);
        break;
    case 2:
        _tile_loadd(0, a, K * 2); _tile_dpbf16ps(4, 0, 1);
        _tile_loadd(2, a + 16 * K, K * 2); _tile_dpbf16ps(5, 2, 1);
        break;
    default:
        _tile_loadd(2, a, K * 2); _tile_dpbf16ps(4, 2, 1);
    }
}

static AMX void amx_part(const uint16_t *Wp, const uint16_t *b, const uint16_t *x, uint16_t *y, float *y32, long M,
                         long N, long K, long p0, long p1) {
    const long RB = (M + 15) / 16, last = M - (RB - 1) * 16, chunks = K / 32;
    amx_config(RB, last);
    float out[16 * 16];
    for (long p = p0; p < p1; p++) {
        const uint16_t *panel = Wp + p * K * 16;
        switch (RB) { /* tile numbers are immediates */
        case 4: _tile_zero(7); /* fall through */
        case 3: _tile_zero(6); /* fall through */
        case 2: _tile_zero(5); /* fall through */
        default: _tile_zero(4);
        }
        for (long ch = 0; ch < chunks; ch++) {
            const uint16_t *bt = panel + ch * 512, *a = x + ch * 32;
            _tile_loadd(1, bt, 64);
            amx_chunk(a, K, RB);
        }
        switch (RB) {
        case 4: _tile_stored(7, out, 64); amx_out(out, b, y, y32, last, 48, p * 16, N); /* fall through */
        case 3: _tile_stored(6, out, 64); amx_out(out, b, y, y32, RB == 3 ? last : 16, 32, p * 16, N); /* fall through */
        case 2: _tile_stored(5, out, 64); amx_out(out, b, y, y32, RB == 2 ? last : 16, 16, p * 16, N); /* fall through */
        default: _tile_stored(4, out, 64); amx_out(out, b, y, y32, RB == 1 ? last : 16, 0, p * 16, N);
        }
    }
    _tile_release();
}

/* y [M, N] bf16 = x [M, K] bf16 times the bf16 panels (+ b, bf16), M <= 64: 0, or -3 (shapes it does not take) */
int gptchat_amx_bgemm(const uint16_t *Wp, const uint16_t *b, const uint16_t *x, uint16_t *y, long M, long N, long K,
                      int threads) {
    if (M < 1 || M > 64 || K % 32) return -3;
    const long P = (N + 15) / 16;
#pragma omp parallel num_threads(threads)
    {
        long p0, p1;
        my_share(P, &p0, &p1);
        if (p0 < p1) amx_part(Wp, b, x, y, NULL, M, N, K, p0, p1);
    }
    return 0;
}

/* Many rows through bf16 panels on AMX tiles, fp32 sums out (eval's head in bf16x3, split3.py): y [M, ldy] = x [M, K]
   Wp for the panels [p0, p1) of a block of up to 64 rows, AMX_KC inputs a pass: that many inputs of the block's
   rows (32 KB) stay in L1 while every panel goes by, each panel's sums kept in y between passes (on a 2-core Xeon,
   512 x 2048 x 2304 with amx_2x2: 1.6 -> 1.9 TFLOP/s against one pass over all K; runs vary by ~10%). */
#define AMX_KC 256
static AMX void amx_block32(const uint16_t *Wp, const uint16_t *x, float *y, long M, long ldy, long K, long p0,
                            long p1) {
    const long RB = (M + 15) / 16, last = M - (RB - 1) * 16;
    amx_config(RB, last);
    const long ys = ldy * 4;
    for (long k0 = 0; k0 < K; k0 += AMX_KC) {
        const long c0 = k0 / 32, c1 = (k0 + AMX_KC < K ? k0 + AMX_KC : K) / 32;
        for (long p = p0; p < p1; p++) {
            float *yp = y + p * 16;
            const uint16_t *panel = Wp + p * K * 16;
            if (k0 == 0) {
                switch (RB) {
                case 4: _tile_zero(7); /* fall through */
                case 3: _tile_zero(6); /* fall through */
                case 2: _tile_zero(5); /* fall through */
                default: _tile_zero(4);
                }
            } else {
                switch (RB) {
                case 4: _tile_loadd(7, yp + 48 * ldy, ys); /* fall through */
                case 3: _tile_loadd(6, yp + 32 * ldy, ys); /* fall through */
                case 2: _tile_loadd(5, yp + 16 * ldy, ys); /* fall through */
                default: _tile_loadd(4, yp, ys);
                }
            }
            for (long ch = c0; ch < c1; ch++) {
                const uint16_t *bt = panel + ch * 512, *a = x + ch * 32;
                _tile_loadd(1, bt, 64);
                amx_chunk(a, K, RB);
            }
            switch (RB) {
            case 4: _tile_stored(7, yp + 48 * ldy, ys); /* fall through */
            case 3: _tile_stored(6, yp + 32 * ldy, ys); /* fall through */
            case 2: _tile_stored(5, yp + 16 * ldy, ys); /* fall through */
            default: _tile_stored(4, yp, ys);
            }
        }
    }
    _tile_release();
}

/* amx_block32's passes for 32 whole rows and pairs of whole panels [p0, p1): two A and two B tiles a chunk of 32
   inputs for four products (amx_block32 loads five for four): 512 x 2048 x 2304 1.77 -> 2.09 TFLOP/s */
static AMX void amx_2x2(const uint16_t *Wp, const uint16_t *x, float *y, long ldy, long K, long p0, long p1) {
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) c.rows[t] = 16, c.colsb[t] = 64;
    _tile_loadconfig(&c);
    const long ys = ldy * 4;
    for (long k0 = 0; k0 < K; k0 += AMX_KC) {
        const long c0 = k0 / 32, c1 = (k0 + AMX_KC < K ? k0 + AMX_KC : K) / 32;
        for (long p = p0; p < p1; p += 2) {
            float *yp = y + p * 16;
            const uint16_t *pa = Wp + p * K * 16, *pb = pa + K * 16;
            if (k0 == 0) {
                _tile_zero(4); _tile_zero(5); _tile_zero(6); _tile_zero(7);
            } else {
                _tile_loadd(4, yp, ys); _tile_loadd(5, yp + 16, ys);
                _tile_loadd(6, yp + 16 * ldy, ys); _tile_loadd(7, yp + 16 * ldy + 16, ys);
            }
            for (long ch = c0; ch < c1; ch++) {
                const uint16_t *a = x + ch * 32;
                _tile_loadd(0, a, K * 2);
                _tile_loadd(2, pa + ch * 512, 64);
                _tile_loadd(3, pb + ch * 512, 64);
                _tile_loadd(1, a + 16 * K, K * 2);
                _tile_dpbf16ps(4, 0, 2);
                _tile_dpbf16ps(5, 0, 3);
                _tile_dpbf16ps(6, 1, 2);
                _tile_dpbf16ps(7, 1, 3);
            }
            _tile_stored(4, yp, ys); _tile_stored(5, yp + 16, ys);
            _tile_stored(6, yp + 16 * ldy, ys); _tile_stored(7, yp + 16 * ldy + 16, ys);
        }
    }
    _tile_release();
}

/* y [M, ceil(N / 16) * 16] fp32 = x [M, K] bf16 times the bf16 panels Wp (bpanels of [N, K]; the outputs past N are
   the panels' zero padding): each thread takes whole panels, AMX_GROUP bytes of them at a time, and runs every
   64-row block of x through them before the next group, so a group's tiles stay in L2 while x goes by. K a
   multiple of 32. 0, or -3 (shapes it does not take). */
#define AMX_GROUP (512 * 1024)
int gptchat_amx_gemm32(const uint16_t *Wp, const uint16_t *x, float *y, long M, long N, long K, int threads) {
    if (M < 1 || N < 1 || K % 32) return -3;
    const long P = (N + 15) / 16, G = AMX_GROUP / (K * 32) / 2 * 2 > 2 ? AMX_GROUP / (K * 32) / 2 * 2 : 2; /* even */
#pragma omp parallel num_threads(threads)
    {
        long p0, p1;
        my_share(P, &p0, &p1);
        for (long g = p0; g < p1; g += G) {
            const long g1 = g + G < p1 ? g + G : p1, pairs = g + (g1 - g) / 2 * 2;
            long m = 0;
            for (; m + 32 <= M; m += 32) {
                amx_2x2(Wp, x + m * K, y + m * P * 16, P * 16, K, g, pairs);
                if (pairs < g1) amx_block32(Wp, x + m * K, y + m * P * 16, 32, P * 16, K, pairs, g1);
            }
            if (m < M) amx_block32(Wp, x + m * K, y + m * P * 16, M - m, P * 16, K, g, g1);
        }
    }
    return 0;
}

/* y32 [M, N] = post(x16 [M, K] Wp + b) for the calling thread's panels (t of nt), 64 rows an AMX pass: fp32 sums
   stored or activated in y32, or (POST_ADD) computed into z and added to y32; then, with y16, the thread's columns
   of y32 rounded to bf16 there (the next product's input) */
static void stepb_product(const uint16_t *Wp, const uint16_t *b, const uint16_t *x16, float *y32, float *z,
                          uint16_t *y16, long M, long N, long K, long t, long nt, int post, int act) {
    long p0, p1;
    rows_share((N + 15) / 16, t, nt, &p0, &p1);
    float *dst = post == POST_ADD ? z : y32;
    for (long m = 0; m < M && p0 < p1; m += 64)
        amx_part(Wp, b, x16 + m * K, NULL, dst + m * N, M - m < 64 ? M - m : 64, N, K, p0, p1);
    const long n0 = p0 * 16, n1 = p1 * 16 < N ? p1 * 16 : N;
    for (long m = 0; m < M; m++) {
        if (post != POST_STORE) finish(y32 + m * N, dst + m * N, n0, n1, post, act);
        for (long n = n0; y16 && n < n1; n++) y16[m * N + n] = to_bf16(y32[m * N + n]);
    }
}

#undef AMX
#undef AMXI
#define STEP_AMX 1
#else
#define STEP_AMX 0
int gptchat_amx_ok(void) { return 0; }
int gptchat_amx_bgemm(const uint16_t *Wp, const uint16_t *b, const uint16_t *x, uint16_t *y, long M, long N, long K,
                      int threads) {
    return -3;
}
static void stepb_product(const uint16_t *Wp, const uint16_t *b, const uint16_t *x16, float *y32, float *z,
                          uint16_t *y16, long M, long N, long K, long t, long nt, int post, int act) {}
int gptchat_amx_gemm32(const uint16_t *Wp, const uint16_t *x, float *y, long M, long N, long K, int threads) {
    return -3;
}
#endif

/* The logits [M, V] after token tok[m] of each row m at cache slot ``slot`` (every row's; its position pos[m], or
   the slot with pos NULL), on panels (see the note above gptchat_stepn's first helper, step_product). wp:
   STEP_PTRS pointers a layer as gptchat_step1's, every product in panels with its bias (fp32 panels: padded to
   them); head: the tied head's panels (no bias). kv: per layer its key then value cache, [M, nh, > slot, hs]
   through strides kb, kh, ks. emb: the token table read through strides es0, es1 (n_vocab rows); wpe: the
   positions' [n_pos, C]. vis (NULL: every slot) [M, > slot] bytes at row stride vs: the slots each row sees (a
   padded batch's). fp32 (bf 0): everything fp32, products on native.panels (wide: panel_block16). bf16 (bf 1):
   the weights in bf16 panels on AMX tiles (C a multiple of 32), the norms, biases, tables and caches bf16, widened
   as read (the caches written rounded); the activations stay fp32 between products, as in gptchat_step1's bf16
   step, rounded to bf16 only as a product's input. Returns 0, -1 (no scratch memory), -2 (a token not in the
   table), -3 (a position past the table) or -4 (bf16 where this build has no AMX, or C not a multiple of 32). */
int gptchat_stepn(const void *const *wp, void *const *kv, const float *scales, long L, long C, long nh, long kb,
                  long kh, long ks, long slot, int act, float eps, const void *lnf_w, const void *lnf_b,
                  const void *head, long V, float *logits, long M, const int64_t *tok, const void *emb,
                  long n_vocab, long es0, long es1, const void *wpe, long n_pos, const int64_t *pos,
                  const uint8_t *vis, long vs, int threads, int wide, int bf) {
    if (bf && (!STEP_AMX || C % 32)) return -4;
    for (long m = 0; m < M; m++) {
        if (tok[m] < 0 || tok[m] >= n_vocab) return -2;
        if ((pos ? pos[m] : slot) < 0 || (pos ? pos[m] : slot) >= n_pos) return -3;
    }
    const long hs = C / nh, N4 = 4 * C, T = threads > 0 ? threads : 1;
    /* fp32: x, ln, att, tmp [M, C], qkv [M, 3C], h [M, 4C]; bf16 (products' inputs): a16 [M, C], h16 [M, 4C]; per
       thread: a norm's row [C], a tail [M, 16], scores [slot + 1], rounded up to whole cache lines */
    const long half = bf ? (M * (C + N4) + 1) / 2 : 0, shared = M * (4 * C + 3 * C + N4) + half;
    const long per = (C + M * 16 + slot + 1 + 15) / 16 * 16;
    float *buf = aligned_alloc(64, ((shared + T * per) * sizeof(float) + 63) / 64 * 64);
    if (!buf) return -1;
    float *x = buf, *ln = x + M * C, *att = ln + M * C, *tmp = att + M * C, *qkv = tmp + M * C, *h = qkv + 3 * M * C;
    uint16_t *a16 = (uint16_t *)(h + M * N4), *h16 = a16 + M * C;
    float *priv = h + M * N4 + half;
    const long e = bf ? 2 : 4;
#pragma omp parallel num_threads(T)
    {
        long t, nt, r0, r1, a0, a1;
        team_of(&t, &nt);
        float *row = priv + t * per, *tail = row + C, *sc = tail + M * 16;
        rows_share(M, t, nt, &r0, &r1);      /* rows for embeddings and norms */
        rows_share(M * nh, t, nt, &a0, &a1); /* (row, head) pairs for attention */
        for (long m = r0; m < r1; m++)
            embed(tok[m], emb, NULL, es0, es1, 0, (const char *)wpe + (pos ? pos[m] : slot) * C * e, x + m * C, C, bf);
        for (long l = 0; l <= L; l++) {
            const void *const *p = wp + (l < L ? l : 0) * STEP_PTRS;
            const void *nw = l < L ? p[0] : lnf_w, *nb = l < L ? p[1] : lnf_b;
            for (long m = r0; m < r1; m++) { /* ln_1 (after the last layer: ln_f); bf16: rounded as the input */
                layer_norm(x + m * C, nw, nb, bf ? row : ln + m * C, C, eps, bf);
                for (long c = 0; bf && c < C; c++) a16[m * C + c] = to_bf16(row[c]);
            }
#pragma omp barrier
            if (l == L) { /* the head */
                if (bf) stepb_product(head, NULL, a16, logits, NULL, NULL, M, V, C, t, nt, POST_STORE, act);
                else step_product(head, NULL, ln, logits, NULL, M, V, C, t, nt, tail, POST_STORE, act, wide);
                break;
            }
            if (bf) stepb_product(p[2], p[4], a16, qkv, NULL, NULL, M, 3 * C, C, t, nt, POST_STORE, act);
            else step_product(p[2], p[4], ln, qkv, NULL, M, 3 * C, C, t, nt, tail, POST_STORE, act, wide);
#pragma omp barrier
            for (long bh = a0; bh < a1; bh++) { /* this slot's key and value written, then the row's query */
                const long m = bh / nh, hh = bh % nh, at0 = (m * kb + hh * kh) * e;
                char *kk = (char *)kv[2 * l] + at0, *vv = (char *)kv[2 * l + 1] + at0;
                const float *r = qkv + m * 3 * C;
                float *o = att + m * C + hh * hs;
                for (long d = 0; bf && d < hs; d++) {
                    ((uint16_t *)kk)[slot * ks + d] = to_bf16(r[C + hh * hs + d]);
                    ((uint16_t *)vv)[slot * ks + d] = to_bf16(r[2 * C + hh * hs + d]);
                }
                if (!bf) {
                    memcpy((float *)kk + slot * ks, r + C + hh * hs, hs * sizeof(float));
                    memcpy((float *)vv + slot * ks, r + 2 * C + hh * hs, hs * sizeof(float));
                }
                attend_one(r + hh * hs, kk, vv, ks, slot + 1, hs, scales[l], sc, o, bf, vis ? vis + m * vs : NULL);
                for (long d = 0; bf && d < hs; d++) a16[m * C + hh * hs + d] = to_bf16(o[d]);
            }
#pragma omp barrier
            if (bf) stepb_product(p[5], p[7], a16, x, tmp, NULL, M, C, C, t, nt, POST_ADD, act);
            else step_product(p[5], p[7], att, x, tmp, M, C, C, t, nt, tail, POST_ADD, act, wide);
#pragma omp barrier
            for (long m = r0; m < r1; m++) {
                layer_norm(x + m * C, p[8], p[9], bf ? row : ln + m * C, C, eps, bf);
                for (long c = 0; bf && c < C; c++) a16[m * C + c] = to_bf16(row[c]);
            }
#pragma omp barrier
            if (bf) stepb_product(p[10], p[12], a16, h, NULL, h16, M, N4, C, t, nt, POST_ACT, act);
            else step_product(p[10], p[12], ln, h, NULL, M, N4, C, t, nt, tail, POST_ACT, act, wide);
#pragma omp barrier
            if (bf) stepb_product(p[13], p[15], h16, x, tmp, NULL, M, C, N4, t, nt, POST_ADD, act);
            else step_product(p[13], p[15], h, x, tmp, M, C, N4, t, nt, tail, POST_ADD, act, wide);
#pragma omp barrier
        }
    }
    free(buf);
    return 0;
}
