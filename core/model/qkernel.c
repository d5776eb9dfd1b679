/* int8 weights x int16 activations on AVX2, for gptchat's QuantLinear (core/model/quant.py).

   Weights: q int8 in groups of 4 output rows, each group stored as Kp/32 blocks of 4 rows x 32 inputs
   ([ceil(N/4), Kp/32, 4, 32], Kp = K rounded up to 32, zero padded), so that one group is read as a
   single forward stream; one fp32 scale per output row. Activations: each row of x quantized to int16
   with its own scale (max |x| / 32767), so a row's result never depends on the other rows of a call.
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

#define PREFETCH 2048 /* bytes ahead of the read: measured 2048-8192 alike, none 10% slower (AMD Milan) */

static void groups(const int8_t *q, const float *s, const float *b, const int16_t *x, float xs, float *y,
                   long g0, long g1, long Kp, long N) {
    const long steps = Kp / 32;
    for (long g = g0; g < g1; g++) {
        const int8_t *p = q + g * Kp * 4;
        __m256 f0 = _mm256_setzero_ps(), f1 = f0, f2 = f0, f3 = f0;
        for (long c0 = 0; c0 < steps; c0 += 8) { /* 8 blocks: |sum| <= 256 * 127 * 32767 < 2^31 */
            long c1 = c0 + 8 < steps ? c0 + 8 : steps;
            __m256i i0 = _mm256_setzero_si256(), i1 = i0, i2 = i0, i3 = i0;
            for (long c = c0; c < c1; c++) {
                const int8_t *pc = p + c * 128;
                _mm_prefetch((const char *)(pc + PREFETCH), _MM_HINT_T0);
                _mm_prefetch((const char *)(pc + PREFETCH + 64), _MM_HINT_T0);
                __m256i xl = _mm256_loadu_si256((const __m256i *)(x + c * 32));
                __m256i xh = _mm256_loadu_si256((const __m256i *)(x + c * 32 + 16));
#define ROW(r, acc)                                                                                        \
    {                                                                                                      \
        __m256i w = _mm256_loadu_si256((const __m256i *)(pc + 32 * r));                                    \
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm256_castsi256_si128(w)), xl)); \
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm256_extracti128_si256(w, 1)), xh)); \
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
static void quantize_rows(const float *x, int16_t *x16, float *xs, long M, long K, long Kp) {
    const __m256 nosign = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (long m = 0; m < M; m++) {
        const float *r = x + m * K;
        __m256 a8 = _mm256_setzero_ps();
        long k = 0;
        for (; k + 8 <= K; k += 8) a8 = _mm256_max_ps(a8, _mm256_and_ps(_mm256_loadu_ps(r + k), nosign));
        float t[8], a = 0.f;
        _mm256_storeu_ps(t, a8);
        for (int i = 0; i < 8; i++) a = fmaxf(a, t[i]);
        for (; k < K; k++) a = fmaxf(a, fabsf(r[k]));
        const float sc = a > 0.f && isfinite(a) ? a / 32767.f : 1.f;
        const __m256 inv = _mm256_set1_ps(1.f / sc);
        int16_t *o = x16 + m * Kp;
        for (k = 0; k + 16 <= K; k += 16) { /* round to nearest even, saturate to int16 */
            __m256i lo = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(r + k), inv));
            __m256i hi = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(r + k + 8), inv));
            _mm256_storeu_si256((__m256i *)(o + k), _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xd8));
        }
        for (; k < K; k++) o[k] = (int16_t)lrintf(r[k] * (1.f / sc));
        for (; k < Kp; k++) o[k] = 0;
        xs[m] = sc;
    }
}

/* y [M, N] = (x [M, K] @ (q * s)^T) + b. Returns 0, or -1 where scratch memory could not be had. */
int gptchat_qgemm(const int8_t *q, const float *s, const float *b, const float *x, float *y, long M, long N, long K,
                  long Kp, int threads) {
    int16_t *x16 = aligned_alloc(64, (M * Kp * sizeof(int16_t) + M * sizeof(float) + 63) / 64 * 64);
    if (!x16) return -1;
    float *xs = (float *)(x16 + M * Kp);
    quantize_rows(x, x16, xs, M, K, Kp);
    const long G = (N + 3) / 4;
    /* one row: groups streamed straight from q. More: a span of groups widened to int16 once (~24 KB, kept
       in L1) and multiplied with every row, two at a time */
    const long span = M == 1 ? G : (24576 / (8 * Kp) > 1 ? 24576 / (8 * Kp) : 1);
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
#ifdef _OPENMP
        const long t = omp_get_thread_num(), T = omp_get_num_threads();
#else
        const long t = 0, T = 1;
#endif
        const long per = (G + T - 1) / T, g0 = t * per, g1 = g0 + per < G ? g0 + per : G;
        int16_t *w16 = M > 1 && g0 < g1 ? aligned_alloc(64, span * Kp * 4 * sizeof(int16_t)) : NULL;
        if (M > 1 && g0 < g1 && !w16) failed = 1;
        for (long a = g0; a < g1 && !failed; a += span) {
            const long e = a + span < g1 ? a + span : g1;
            if (M == 1) {
                groups(q, s, b, x16, xs[0], y, a, e, Kp, N);
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

/* Attention of one query a row over n cached keys (a decode step with no padding): for each row b and
   head h, out[b, h*hs .. h*hs+hs) = softmax(scale * q . k_j, j < n) @ v. q [B, nh, hs] and the caches
   [B, nh, >= n, hs] are read through their strides (elements; the last dimension contiguous); hs a
   multiple of 8; scores [B * nh, n] is scratch. PyTorch's CPU flash kernel took ~3x longer here on a 2-core EPYC (2-2.5 ms a token
   of 124M at ~250 cached slots). */
void gptchat_attend1(const float *q, long qb, long qh, const float *k, const float *v, long kb, long kh, long ks,
                     float *out, float *scores, long B, long nh, long n, long hs, float scale, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long bh = 0; bh < B * nh; bh++) {
        const long b = bh / nh, h = bh % nh;
        const float *qq = q + b * qb + h * qh, *kk = k + b * kb + h * kh, *vv = v + b * kb + h * kh;
        float *sc = scores + bh * n, *o = out + (b * nh + h) * hs, m = -INFINITY, sum = 0.f;
        for (long j = 0; j < n; j++) {
            __m256 a = _mm256_setzero_ps();
            for (long d = 0; d < hs; d += 8)
                a = _mm256_fmadd_ps(_mm256_loadu_ps(qq + d), _mm256_loadu_ps(kk + j * ks + d), a);
            __m128 l = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
            l = _mm_add_ps(l, _mm_movehl_ps(l, l));
            l = _mm_add_ss(l, _mm_shuffle_ps(l, l, 1));
            sc[j] = _mm_cvtss_f32(l) * scale;
            m = fmaxf(m, sc[j]);
        }
        for (long j = 0; j < n; j++) {
            sc[j] = expf(sc[j] - m);
            sum += sc[j];
        }
        const __m256 inv = _mm256_set1_ps(1.f / sum);
        for (long d = 0; d < hs; d += 8) {
            __m256 a = _mm256_setzero_ps();
            for (long j = 0; j < n; j++) a = _mm256_fmadd_ps(_mm256_set1_ps(sc[j]), _mm256_loadu_ps(vv + j * ks + d), a);
            _mm256_storeu_ps(o + d, _mm256_mul_ps(a, inv));
        }
    }
}
