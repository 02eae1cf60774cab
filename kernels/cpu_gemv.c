/* Weight-streaming GEMVs for CPU decode: y (M, N) = x (M, K) @ W^T + b for a few rows x (M <= 16), with W
 * stored int8 (per-channel scale), int4 (groups with scale and offset) or 16-bit (fp16 / bf16), read once
 * from memory and widened to fp32 in registers: no dequantized copy of W is ever written. x, y, scales,
 * offsets and bias are fp32 (the Python side converts); accumulation is fp32 (FMA), so the result is the
 * reference's (dequantize, fp32 GEMM) up to the order of the sum.
 *
 * Formats (kernels/reference.py):
 *   int8  q (N, K) int8,            w[n, k] = q[n, k] s[n]
 *   int4  q (N, ceil(K/2)) uint8,   w[n, k] = (q[n, k] - 8) s[n, g] + z[n, g],  g = k / G, even k in the low
 *         nibble. Per group  sum_k w x = s sum_k q x + (z - 8 s) sum_k x,  so the inner loop multiplies the
 *         raw codes 0..15 with x and the group's sum of x is computed once per call (xsum).
 *   f16 / bf16  w (N, K) 16-bit: fp16 widened by F16C, bf16 by a 16-bit shift.
 * The int4 inner loop takes 32 codes (16 bytes) at a time: the low nibbles are the even k, the high ones the
 * odd k, so x is first rearranged per 32-block as [16 even | 16 odd] (xp) to meet them in order.
 * Rows of W are split across OpenMP threads (torch's own libgomp, so torch.set_num_threads applies); every
 * row is read once for all M rows of x (it stays in L1 between them).
 * Built by kernels/cpu_gemv.py with -O3 -mavx2 -mfma -mf16c; without AVX2 the scalar loops run.
 */
#include <stdint.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define MAX_M 16

#ifdef __AVX2__
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float f16_to_f32(uint16_t h) {
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff, u;
    if (e == 0) {
        float f = (float)m * (1.0f / 16777216.0f);  /* subnormal: m * 2^-24 */
        return sign ? -f : f;
    }
    u = e == 31 ? sign | 0x7f800000u | (m << 13) : sign | ((e + 112) << 23) | (m << 13);
    float f;
    memcpy(&f, &u, 4);
    return f;
#endif
}

/* ------------------------------------------------------------------ int8 */

static void int8_row(const int8_t *q, const float *x, int M, int K, float *acc) {
    for (int m = 0; m < M; m++) {
        const float *xm = x + (int64_t)m * K;
        int k = 0;
        float s = 0.0f;
#ifdef __AVX2__
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        for (; k + 16 <= K; k += 16) {
            __m128i b = _mm_loadu_si128((const __m128i *)(q + k));
            __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
            __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
            a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xm + k), a0);
            a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xm + k + 8), a1);
        }
        s = hsum8(_mm256_add_ps(a0, a1));
#endif
        for (; k < K; k++) s += (float)q[k] * xm[k];
        acc[m] = s;
    }
}

void int8_gemv(const float *x, const int8_t *q, const float *scale, const float *bias, float *y,
               int M, int N, int K) {
    #pragma omp parallel for schedule(static) if ((int64_t)N * K > 65536)
    for (int n = 0; n < N; n++) {
        float acc[MAX_M];
        int8_row(q + (int64_t)n * K, x, M, K, acc);
        for (int m = 0; m < M; m++) y[(int64_t)m * N + n] = acc[m] * scale[n] + (bias ? bias[n] : 0.0f);
    }
}

/* ------------------------------------------------------------------ int4 */

/* xp: x rearranged per 32-block as [even k | odd k] (zeros past K); xsum (M, n_groups): sum of x per group. */
static void int4_prep(const float *x, float *xp, float *xsum, int M, int K, int Kp, int G, int n_groups) {
    for (int m = 0; m < M; m++) {
        const float *xm = x + (int64_t)m * K;
        float *pm = xp + (int64_t)m * Kp;
        for (int b = 0; b < Kp; b += 32)
            for (int i = 0; i < 16; i++) {
                int ke = b + 2 * i, ko = ke + 1;
                pm[b + i] = ke < K ? xm[ke] : 0.0f;
                pm[b + 16 + i] = ko < K ? xm[ko] : 0.0f;
            }
        for (int g = 0; g < n_groups; g++) {
            float s = 0.0f;
            int hi = (g + 1) * G < K ? (g + 1) * G : K;
            for (int k = g * G; k < hi; k++) s += xm[k];
            xsum[m * n_groups + g] = s;
        }
    }
}

/* sum over k in [k0, k1) of code(k) * xp: k0 a multiple of 32, the row's bytes from k0 / 2. */
static inline float int4_dot(const uint8_t *qrow, const float *xpm, int k0, int k1, int K) {
    int k = k0;
    float s = 0.0f;
#ifdef __AVX2__
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    const __m128i lo_mask = _mm_set1_epi8(0x0f);
    for (; k + 32 <= k1; k += 32) {
        __m128i b = _mm_loadu_si128((const __m128i *)(qrow + k / 2));
        __m128i lo = _mm_and_si128(b, lo_mask);                        /* even k: k, k+2, ..., k+30 */
        __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), lo_mask);     /* odd k */
        const float *xe = xpm + k, *xo = xpm + k + 16;
        a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), _mm256_loadu_ps(xe), a0);
        a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))),
                             _mm256_loadu_ps(xe + 8), a1);
        a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), _mm256_loadu_ps(xo), a0);
        a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))),
                             _mm256_loadu_ps(xo + 8), a1);
    }
    s = hsum8(_mm256_add_ps(a0, a1));
#endif
    for (; k < k1; k += 32) {  /* the last, partial 32-block (or every block without AVX2) */
        for (int i = 0; i < 16; i++) {
            int ke = k + 2 * i;
            if (ke >= K) break;
            uint8_t byte = qrow[ke / 2];
            s += (float)(byte & 15) * xpm[k + i];
            if (ke + 1 < K) s += (float)(byte >> 4) * xpm[k + 16 + i];
        }
    }
    return s;
}

/* xp (M, Kp) and xsum (M, n_groups) are scratch from the caller (Kp = K rounded up to 32). */
void int4_gemv(const float *x, const uint8_t *q, const float *scale, const float *zero, const float *bias,
               float *y, float *xp, float *xsum, int M, int N, int K, int G) {
    int Kp = (K + 31) / 32 * 32, n_groups = (K + G - 1) / G, row_bytes = (K + 1) / 2;
    int4_prep(x, xp, xsum, M, K, Kp, G, n_groups);
    #pragma omp parallel for schedule(static) if ((int64_t)N * K > 131072)
    for (int n = 0; n < N; n++) {
        const uint8_t *qrow = q + (int64_t)n * row_bytes;
        const float *sn = scale + (int64_t)n * n_groups, *zn = zero + (int64_t)n * n_groups;
        for (int m = 0; m < M; m++) {
            const float *xpm = xp + (int64_t)m * Kp, *xs = xsum + m * n_groups;
            float acc = 0.0f;
            for (int g = 0; g < n_groups; g++) {
                int k1 = (g + 1) * G < K ? (g + 1) * G : K;
                float d = int4_dot(qrow, xpm, g * G, k1, K);
                acc += sn[g] * d + (zn[g] - 8.0f * sn[g]) * xs[g];
            }
            y[(int64_t)m * N + n] = acc + (bias ? bias[n] : 0.0f);
        }
    }
}

/* ------------------------------------------------------------------ 16-bit weights */

/* kind 0: fp16, 1: bf16. */
void w16_gemv(const float *x, const uint16_t *w, const float *bias, float *y, int M, int N, int K, int kind) {
    #pragma omp parallel for schedule(static) if ((int64_t)N * K > 65536)
    for (int n = 0; n < N; n++) {
        const uint16_t *wr = w + (int64_t)n * K;
        for (int m = 0; m < M; m++) {
            const float *xm = x + (int64_t)m * K;
            int k = 0;
            float s = 0.0f;
#ifdef __AVX2__
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
            for (; k + 16 <= K; k += 16) {
                __m256i h = _mm256_loadu_si256((const __m256i *)(wr + k));
                __m256 w0, w1;
                if (kind == 0) {
                    w0 = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
                    w1 = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
                } else {
                    w0 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(h)), 16));
                    w1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(h, 1)), 16));
                }
                a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xm + k), a0);
                a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xm + k + 8), a1);
            }
            s = hsum8(_mm256_add_ps(a0, a1));
#endif
            for (; k < K; k++) s += (kind == 0 ? f16_to_f32(wr[k]) : bf16_to_f32(wr[k])) * xm[k];
            y[(int64_t)m * N + n] = s + (bias ? bias[n] : 0.0f);
        }
    }
}
