/* Weight-streaming GEMVs for CPU decode: y (M, N) = x (M, K) @ W^T + b for a few rows x (M <= 16), with W
 * stored int8 (per-channel scale), int4 (groups with scale and offset) or 16-bit (fp16 / bf16), read once
 * from memory and widened in registers: no dequantized copy of W is ever written. x, y, scales, offsets
 * and bias are fp32 (the Python side converts). The 16-bit kernel widens W to fp32 and accumulates in
 * fp32 (FMA): the reference's product up to the order of the sum. The int8 / int4 kernels multiply the
 * codes with x rounded to integers per block, with exact int32 sums per block that are scaled to fp32 once
 * per block, at one of two activation precisions (abits, the bound tests/test_cpu_gemv.py checks):
 *   abits = 8:  x to int8 per block (int8 weights: 32 values, llama.cpp's q8_0 activations; int4: the
 *               weight's group), error <= 1/254 of the block's largest |x| per value; products by
 *               vpmaddubsw (unsigned x signed bytes, 32 per instruction) then vpmaddwd by 1 into int32
 *               (int8 weights: maddubs(|w|, sign(w) x)). The default.
 *   abits = 16: x to int16 per block (quant_x16: error <= 1.5e-5 of the block's largest |x|), products by
 *               vpmaddwd (16 per instruction) on the codes widened to int16: half the products per
 *               instruction.
 *
 * Formats (kernels/reference.py):
 *   int8  q (N, K) int8,            w[n, k] = q[n, k] s[n]
 *   int4  q (N, ceil(K/2)) uint8,   w[n, k] = (q[n, k] - 8) s[n, g] + z[n, g],  g = k / G, even k in the low
 *         nibble. Per group  sum_k w x = s sum_k q x + (z - 8 s) sum_k x,  so the inner loop multiplies the
 *         raw codes 0..15 with x and the group's exact fp32 sum of x is computed once per call (xsum).
 *   f16 / bf16  w (N, K) 16-bit: fp16 widened by F16C, bf16 by a 16-bit shift.
 * The int4 inner loop takes 32 codes (16 bytes) at a time: the low nibbles are the even k, the high ones the
 * odd k, so x is first rearranged per 32-block as [16 even | 16 odd] (xp) to meet them in order.
 * Rows of W are split across OpenMP threads (torch's own libgomp, so torch.set_num_threads applies); every
 * row is read once for all M rows of x (it stays in L1 between them).
 * Built by kernels/cpu_gemv.py with -O3 -mavx2 -mfma -mf16c; without AVX2 the scalar loops run.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
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

/* ------------------------------------------------------------------ activations as int16

 * The integer kernels multiply 16-bit integers (vpmaddwd: 16 products and 8 pair sums per instruction),
 * about twice what widening every weight to fp32 allows. x is quantized per block of XB values:
 * xs = max|x| / 32767, xq = round(x / xs); the error per value is <= xs / 2, 1.5e-5 of the block's
 * largest value (finer than the fp16 rounding of the stored scales). Each block's integer sum is turned
 * into fp32 once (times xs and the weight's scale), so no int32 sum ever holds more than one block. */

#define XB 64  /* int8: x values per activation scale */

/* The symmetric scale of x[k0:k1) for integer codes up to qmax: max|x| / qmax (1 for an all-zero block, whose
 * codes are then 0); with sum, also the block's exact fp32 sum (int4's offset term). */
static inline float block_scale(const float *x, int k0, int k1, float qmax, float *sum) {
    float amax = 0.0f, total = 0.0f;
    for (int k = k0; k < k1; k++) {
        amax = fabsf(x[k]) > amax ? fabsf(x[k]) : amax;
        total += x[k];
    }
    if (sum) *sum = total;
    return amax > 0.0f ? amax / qmax : 1.0f;
}

static void quant_x16(const float *x, int16_t *xq, float *xs, int K, int block) {
    for (int b0 = 0, j = 0; b0 < K; b0 += block, j++) {
        int b1 = b0 + block < K ? b0 + block : K;
        float s = block_scale(x, b0, b1, 32767.0f, NULL), inv = 1.0f / s;
        xs[j] = s;
        for (int k = b0; k < b1; k++) xq[k] = (int16_t)lrintf(x[k] * inv);
    }
}

/* ------------------------------------------------------------------ activations as int8

 * abits = 8: x is quantized per block of QB = 32 values (int4: per weight group, int4_prep8):
 * xs = max|x| / 127, xq = round(x / xs) (|xq| <= 127), so each value moves by at most xs / 2 = max|x| / 254. */

#define QB 32

static void quant_x8(const float *x, int8_t *xq, float *xs, int K) {
    for (int b0 = 0, j = 0; b0 < K; b0 += QB, j++) {
        int b1 = b0 + QB < K ? b0 + QB : K;
        float s = block_scale(x, b0, b1, 127.0f, NULL), inv = 1.0f / s;
        xs[j] = s;
        for (int k = b0; k < b1; k++) xq[k] = (int8_t)lrintf(x[k] * inv);
    }
}

#ifdef __AVX2__
/* 32 signed-byte products summed to 8 int32 lanes: maddubs wants one unsigned operand, so it gets |w| and
 * x takes w's sign (|w| <= 128, |x| <= 127: a pair sum <= 32512 never saturates int16). */
static inline __m256i dot_i8(__m256i w, __m256i x) {
    __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}
#endif

/* ------------------------------------------------------------------ int8 */

/* Software prefetch this many weight bytes ahead of the loads, one per 64-byte line (each loop step below reads one
 * line of codes): on hf-16x1024's 80 int8 weights streamed from DRAM the hardware prefetcher alone left the a16 loop
 * at 14.6 GB/s, 16.2 GB/s with it at 1024-1536 bytes ahead (1.10x; 768: 15.8; benchmarks/NOTES.md, issue 32
 * session 7). Rows are contiguous, so near a row's end it fetches the next row's first lines; past the end of q it
 * is harmless (a prefetch never faults). */
#define INT8_PREFETCH 1024

/* abits = 8: sum over full 32-blocks of xs_j (sum q xq), the last partial block in exact fp32. */
static float int8_dot8(const int8_t *q, const int8_t *xq, const float *xs, const float *x, int K) {
    float s = 0.0f;
    int k = 0;
#ifdef __AVX2__
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int j = 0;
    for (; k + 2 * QB <= K; k += 2 * QB, j += 2) {
        _mm_prefetch((const char *)(q + k + INT8_PREFETCH), _MM_HINT_T0);
        __m256i p0 = dot_i8(_mm256_loadu_si256((const __m256i *)(q + k)), _mm256_loadu_si256((const __m256i *)(xq + k)));
        __m256i p1 = dot_i8(_mm256_loadu_si256((const __m256i *)(q + k + QB)),
                            _mm256_loadu_si256((const __m256i *)(xq + k + QB)));
        a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_broadcast_ss(xs + j), a0);
        a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_broadcast_ss(xs + j + 1), a1);
    }
    for (; k + QB <= K; k += QB, j++) {
        __m256i p0 = dot_i8(_mm256_loadu_si256((const __m256i *)(q + k)), _mm256_loadu_si256((const __m256i *)(xq + k)));
        a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_broadcast_ss(xs + j), a0);
    }
    s = hsum8(_mm256_add_ps(a0, a1));
#else
    for (int j = 0; k + QB <= K; k += QB, j++) {
        int32_t t = 0;
        for (int i = k; i < k + QB; i++) t += (int32_t)q[i] * xq[i];
        s += xs[j] * (float)t;
    }
#endif
    for (; k < K; k++) s += (float)q[k] * x[k];  /* the last partial block: exact fp32 */
    return s;
}

static float int8_dot16(const int8_t *q, const int16_t *xq, const float *xs, const float *x, int K) {
    float s = 0.0f;
    int k = 0;
#ifdef __AVX2__
    __m256 acc = _mm256_setzero_ps();
    for (int b0 = 0, j = 0; b0 + XB <= K; b0 += XB, j++) {
        _mm_prefetch((const char *)(q + b0 + INT8_PREFETCH), _MM_HINT_T0);
        __m256i ia = _mm256_setzero_si256();
        for (int kk = b0; kk < b0 + XB; kk += 16) {
            __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(q + kk)));
            ia = _mm256_add_epi32(ia, _mm256_madd_epi16(w, _mm256_loadu_si256((const __m256i *)(xq + kk))));
        }
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ia), _mm256_set1_ps(xs[j]), acc);
        k = b0 + XB;
    }
    s = hsum8(acc);
#endif
    for (; k < K; k++) s += (float)q[k] * x[k];  /* the last partial block: exact fp32 */
    return s;
}

void int8_gemv(const float *x, const int8_t *q, const float *scale, const float *bias, float *y,
               int M, int N, int K, int abits) {
    if (abits == 8) {
        int nb = (K + QB - 1) / QB;
        int8_t *xq = malloc((size_t)M * K + 32);
        float *xs = malloc(sizeof(float) * M * nb);
        for (int m = 0; m < M; m++) quant_x8(x + (int64_t)m * K, xq + (int64_t)m * K, xs + m * nb, K);
        #pragma omp parallel for schedule(static) if ((int64_t)N * K > 65536)
        for (int n = 0; n < N; n++) {
            const int8_t *qr = q + (int64_t)n * K;
            for (int m = 0; m < M; m++) {
                float d = int8_dot8(qr, xq + (int64_t)m * K, xs + m * nb, x + (int64_t)m * K, K);
                y[(int64_t)m * N + n] = d * scale[n] + (bias ? bias[n] : 0.0f);
            }
        }
        free(xq);
        free(xs);
        return;
    }
    int nb = (K + XB - 1) / XB;
    int16_t *xq = malloc(sizeof(int16_t) * M * K);
    float *xs = malloc(sizeof(float) * M * nb);
    for (int m = 0; m < M; m++) quant_x16(x + (int64_t)m * K, xq + (int64_t)m * K, xs + m * nb, K, XB);
    #pragma omp parallel for schedule(static) if ((int64_t)N * K > 65536)
    for (int n = 0; n < N; n++) {
        const int8_t *qr = q + (int64_t)n * K;
        for (int m = 0; m < M; m++) {
            float d = int8_dot16(qr, xq + (int64_t)m * K, xs + m * nb, x + (int64_t)m * K, K);
            y[(int64_t)m * N + n] = d * scale[n] + (bias ? bias[n] : 0.0f);
        }
    }
    free(xq);
    free(xs);
}

/* ------------------------------------------------------------------ int4 */

/* The offsets' part of one output, sum_g (z_g - 8 s_g) xsum_g (8 groups per vector under AVX2). */
static float int4_offsets(const float *sn, const float *zn, const float *xsum_m, int n_groups) {
    float zacc = 0.0f;
    int g = 0;
#ifdef __AVX2__
    __m256 v = _mm256_setzero_ps(), eight = _mm256_set1_ps(8.0f);
    for (; g + 8 <= n_groups; g += 8)
        v = _mm256_fmadd_ps(_mm256_fnmadd_ps(eight, _mm256_loadu_ps(sn + g), _mm256_loadu_ps(zn + g)),
                            _mm256_loadu_ps(xsum_m + g), v);
    zacc = hsum8(v);
#endif
    for (; g < n_groups; g++) zacc += (zn[g] - 8.0f * sn[g]) * xsum_m[g];
    return zacc;
}

/* Per group: xq rearranged per 32-block as [16 even k | 16 odd k] (zeros past K), xs its activation scale
 * (one per weight group), xsum the exact fp32 sum of x over the group. */
static void int4_prep(const float *x, int16_t *xq, float *xs, float *xsum, int M, int K, int Kp, int G,
                      int n_groups) {
    for (int m = 0; m < M; m++) {
        const float *xm = x + (int64_t)m * K;
        int16_t *qm = xq + (int64_t)m * Kp;
        for (int g = 0; g < n_groups; g++) {
            int k0 = g * G, k1 = k0 + G < K ? k0 + G : K;
            float s = block_scale(xm, k0, k1, 32767.0f, &xsum[m * n_groups + g]), inv = 1.0f / s;
            xs[m * n_groups + g] = s;
            for (int b = k0; b < k0 + G && b < Kp; b += 32)
                for (int i = 0; i < 16; i++) {
                    int ke = b + 2 * i, ko = ke + 1;
                    qm[b + i] = ke < K ? (int16_t)lrintf(xm[ke] * inv) : 0;
                    qm[b + 16 + i] = ko < K ? (int16_t)lrintf(xm[ko] * inv) : 0;
                }
        }
    }
}

#ifdef __AVX2__
/* 32 codes from 16 bytes times xq: the low nibbles meet the block's first 16 xq (even k), the high the rest. */
static inline __m256i int4_block(__m128i b, const int16_t *xqk, __m256i ia) {
    const __m128i lo_mask = _mm_set1_epi8(0x0f);
    __m256i lo = _mm256_cvtepu8_epi16(_mm_and_si128(b, lo_mask));
    __m256i hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(b, 4), lo_mask));
    ia = _mm256_add_epi32(ia, _mm256_madd_epi16(lo, _mm256_loadu_si256((const __m256i *)xqk)));
    return _mm256_add_epi32(ia, _mm256_madd_epi16(hi, _mm256_loadu_si256((const __m256i *)(xqk + 16))));
}
#endif

/* One output: sum_g  s_g xs_g (sum_k code_k xq_k)  +  (z_g - 8 s_g) xsum_g. The integer sum of a group
 * stays in 8 int32 lanes, goes to fp32 once per group, and is reduced across lanes once per row. A last
 * 32-block that runs past the row's bytes is copied into a zeroed buffer (its codes past K meet xq = 0). */
static float int4_row(const uint8_t *qrow, const float *sn, const float *zn, const int16_t *xqm,
                      const float *xsm, const float *xsum_m, int n_groups, int G, int Kp, int row_bytes) {
    float zacc = int4_offsets(sn, zn, xsum_m, n_groups);
#ifdef __AVX2__
    __m256 facc = _mm256_setzero_ps();
    int k_safe = (row_bytes - 16) * 2;  /* blocks starting at k <= k_safe load 16 bytes inside the row */
    for (int g = 0; g < n_groups; g++) {
        int k0 = g * G, k1 = k0 + G < Kp ? k0 + G : Kp;
        __m256i ia = _mm256_setzero_si256();
        if (k1 - 32 <= k_safe) {
            for (int k = k0; k < k1; k += 32)
                ia = int4_block(_mm_loadu_si128((const __m128i *)(qrow + k / 2)), xqm + k, ia);
        } else {
            for (int k = k0; k < k1; k += 32) {
                uint8_t tmp[16] = {0};
                int nb = row_bytes - k / 2 < 16 ? row_bytes - k / 2 : 16;
                memcpy(tmp, qrow + k / 2, nb);
                ia = int4_block(_mm_loadu_si128((const __m128i *)tmp), xqm + k, ia);
            }
        }
        facc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ia), _mm256_set1_ps(sn[g] * xsm[g]), facc);
    }
    return hsum8(facc) + zacc;
#else
    float acc = zacc;
    for (int g = 0; g < n_groups; g++) {
        int k0 = g * G, k1 = k0 + G < Kp ? k0 + G : Kp;
        int32_t s = 0;
        for (int k = k0; k < k1; k += 32)
            for (int i = 0; i < 16 && k / 2 + i < row_bytes; i++) {
                uint8_t byte = qrow[k / 2 + i];
                s += (int32_t)(byte & 15) * xqm[k + i] + (int32_t)(byte >> 4) * xqm[k + 16 + i];
            }
        acc += sn[g] * xsm[g] * (float)s;
    }
    return acc;
#endif
}

/* abits = 8: xq per block of BW = 32 (G = 32) or 64 (G >= 64) values as [BW/2 even k | BW/2 odd k] int8 (zeros
 * past K), one scale xs per weight group (max|x| over the group / 127), xsum per weight group as above. */
static void int4_prep8(const float *x, int8_t *xq, float *xs, float *xsum, int M, int K, int Kp, int G,
                       int n_groups, int BW) {
    for (int m = 0; m < M; m++) {
        const float *xm = x + (int64_t)m * K;
        int8_t *qm = xq + (int64_t)m * Kp;
        for (int g = 0; g < n_groups; g++) {
            int k0 = g * G, k1 = k0 + G < K ? k0 + G : K;
            float s = block_scale(xm, k0, k1, 127.0f, &xsum[m * n_groups + g]), inv = 1.0f / s;
            xs[m * n_groups + g] = s;
            for (int b = k0; b < k0 + G && b < Kp; b += BW)
                for (int i = 0; i < BW / 2; i++) {
                    int ke = b + 2 * i, ko = ke + 1;
                    qm[b + i] = ke < K ? (int8_t)lrintf(xm[ke] * inv) : 0;
                    qm[b + BW / 2 + i] = ko < K ? (int8_t)lrintf(xm[ko] * inv) : 0;
                }
        }
    }
}

/* The exact integer sum of one group's (or its part's) codes times xq at abits = 8, blocks of BW values laid out
 * as int4_prep8 says; bytes past the row's end are not read (their xq is 0). The scalar loop, and the vector
 * path's last group when its loads would run past the row. */
static int32_t int4_group8_scalar(const uint8_t *qrow, const int8_t *xqm, int k0, int k1, int row_bytes, int BW) {
    int32_t s = 0;
    for (int k = k0; k < k1; k += BW)
        for (int i = 0; i < BW / 2 && k / 2 + i < row_bytes; i++) {
            uint8_t byte = qrow[k / 2 + i];
            s += (int32_t)(byte & 15) * xqm[k + i] + (int32_t)(byte >> 4) * xqm[k + BW / 2 + i];
        }
    return s;
}

#ifdef __AVX2__
/* The int16 pair sums of one group's codes times xq at abits = 8, all loads inside the row. A block of BW = 32
 * codes: 16 bytes -> low nibbles in the low 128-bit lane, high nibbles in the high one (xq's [even | odd]
 * halves), one maddubs; of BW = 64: 32 bytes -> low nibbles, high nibbles, two maddubs. Codes 0..15 are
 * unsigned and xq signed, so a pair sum is <= 3810 and the up to 4 (G = 128) sums per lane add up in int16
 * without saturating. */
static inline __attribute__((always_inline)) __m256i int4_group8(const uint8_t *qrow, const int8_t *xqm, int k0,
                                                                 const int G, const int BW) {
    const __m256i mask = _mm256_set1_epi8(0x0f);
    __m256i a16 = _mm256_setzero_si256();
    for (int k = k0; k < k0 + G; k += BW) {
        if (BW == 32) {
            __m128i b = _mm_loadu_si128((const __m128i *)(qrow + k / 2));
            __m256i codes = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(b, 4), b), mask);
            a16 = _mm256_add_epi16(a16, _mm256_maddubs_epi16(codes, _mm256_loadu_si256((const __m256i *)(xqm + k))));
        } else {
            __m256i b = _mm256_loadu_si256((const __m256i *)(qrow + k / 2));
            __m256i lo = _mm256_and_si256(b, mask), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), mask);
            a16 = _mm256_add_epi16(a16, _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)(xqm + k))));
            a16 = _mm256_add_epi16(a16, _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(xqm + k + 32))));
        }
    }
    return a16;
}

/* G a compile-time constant (the block loop unrolls). The groups whose loads lie inside the row (all but
 * possibly the last), two per step into two accumulators (the FMA's latency off the critical path); the rest
 * through the scalar sum. */
static inline __attribute__((always_inline)) float int4_row8_g(const uint8_t *qrow, const float *sn,
                                                               const int8_t *xqm, const float *xsm,
                                                               int n_groups, const int G, int Kp, int row_bytes) {
    const int BW = G == 32 ? 32 : 64;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 f0 = _mm256_setzero_ps(), f1 = _mm256_setzero_ps();
    int lim = 2 * row_bytes < Kp ? 2 * row_bytes : Kp, n_fast = lim / G < n_groups ? lim / G : n_groups;
    int g = 0;
    for (; g + 2 <= n_fast; g += 2) {
        __m256i a = int4_group8(qrow, xqm, g * G, G, BW), b = int4_group8(qrow, xqm, g * G + G, G, BW);
        f0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(a, ones)), _mm256_set1_ps(sn[g] * xsm[g]), f0);
        f1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(b, ones)),
                             _mm256_set1_ps(sn[g + 1] * xsm[g + 1]), f1);
    }
    if (g < n_fast) {
        __m256i a = int4_group8(qrow, xqm, g * G, G, BW);
        f0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(a, ones)), _mm256_set1_ps(sn[g] * xsm[g]), f0);
        g++;
    }
    float tail = 0.0f;
    for (; g < n_groups; g++) {
        int k1 = g * G + G < Kp ? g * G + G : Kp;
        tail += sn[g] * xsm[g] * (float)int4_group8_scalar(qrow, xqm, g * G, k1, row_bytes, BW);
    }
    return hsum8(_mm256_add_ps(f0, f1)) + tail;
}
#endif

/* One output at abits = 8: sum_g s_g xs_g (sum_k code_k xq_k)  +  (z_g - 8 s_g) xsum_g, the integer sums exact
 * in int32 per group, one fp32 scaling per group. */
static float int4_row8(const uint8_t *qrow, const float *sn, const float *zn, const int8_t *xqm,
                       const float *xsm, const float *xsum_m, int n_groups, int G, int Kp, int row_bytes) {
    float zacc = int4_offsets(sn, zn, xsum_m, n_groups);
#ifdef __AVX2__
    switch (G) {
        case 32: return zacc + int4_row8_g(qrow, sn, xqm, xsm, n_groups, 32, Kp, row_bytes);
        case 64: return zacc + int4_row8_g(qrow, sn, xqm, xsm, n_groups, 64, Kp, row_bytes);
        default: return zacc + int4_row8_g(qrow, sn, xqm, xsm, n_groups, 128, Kp, row_bytes);
    }
#else
    int BW = G == 32 ? 32 : 64;
    float acc = zacc;
    for (int g = 0; g < n_groups; g++) {
        int k1 = g * G + G < Kp ? g * G + G : Kp;
        acc += sn[g] * xsm[g] * (float)int4_group8_scalar(qrow, xqm, g * G, k1, row_bytes, BW);
    }
    return acc;
#endif
}

void int4_gemv(const float *x, const uint8_t *q, const float *scale, const float *zero, const float *bias,
               float *y, int M, int N, int K, int G, int abits) {
    int Kp = (K + 31) / 32 * 32, n_groups = (K + G - 1) / G, row_bytes = (K + 1) / 2;
    if (abits == 8) {
        int BW = G == 32 ? 32 : 64;
        Kp = (K + BW - 1) / BW * BW;
        int8_t *xq = malloc((size_t)M * Kp);
        float *xs = malloc(sizeof(float) * M * n_groups), *xsum = malloc(sizeof(float) * M * n_groups);
        int4_prep8(x, xq, xs, xsum, M, K, Kp, G, n_groups, BW);
        #pragma omp parallel for schedule(static) if ((int64_t)N * K > 131072)
        for (int n = 0; n < N; n++) {
            const uint8_t *qrow = q + (int64_t)n * row_bytes;
            const float *sn = scale + (int64_t)n * n_groups, *zn = zero + (int64_t)n * n_groups;
            for (int m = 0; m < M; m++) {
                float acc = int4_row8(qrow, sn, zn, xq + (int64_t)m * Kp, xs + m * n_groups, xsum + m * n_groups,
                                      n_groups, G, Kp, row_bytes);
                y[(int64_t)m * N + n] = acc + (bias ? bias[n] : 0.0f);
            }
        }
        free(xq);
        free(xs);
        free(xsum);
        return;
    }
    int16_t *xq = malloc(sizeof(int16_t) * M * Kp);  /* x per 32-block as [even | odd], int16 */
    float *xs = malloc(sizeof(float) * M * n_groups), *xsum = malloc(sizeof(float) * M * n_groups);
    int4_prep(x, xq, xs, xsum, M, K, Kp, G, n_groups);
    #pragma omp parallel for schedule(static) if ((int64_t)N * K > 131072)
    for (int n = 0; n < N; n++) {
        const uint8_t *qrow = q + (int64_t)n * row_bytes;
        const float *sn = scale + (int64_t)n * n_groups, *zn = zero + (int64_t)n * n_groups;
        for (int m = 0; m < M; m++) {
            float acc = int4_row(qrow, sn, zn, xq + (int64_t)m * Kp, xs + m * n_groups, xsum + m * n_groups,
                                 n_groups, G, Kp, row_bytes);
            y[(int64_t)m * N + n] = acc + (bias ? bias[n] : 0.0f);
        }
    }
    free(xq);
    free(xs);
    free(xsum);
}

/* ------------------------------------------------------------------ 16-bit weights */

/* Software prefetch this many 16-bit values (4 KB) ahead of the loads: the hardware prefetcher alone left the
 * loop at 10-12 GB/s on 1-6 MB weights; 1.07-1.28x per call at 2048 (1024: 1.05-1.27x, 4096: 1.08-1.27x;
 * benchmarks/NOTES.md, issue 32 session 5). A prefetch past the end of W is harmless (it never faults). */
#define W16_PREFETCH 2048

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
                _mm_prefetch((const char *)(wr + k + W16_PREFETCH), _MM_HINT_T0);
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

/* ------------------------------------------------------------------ fp32 weights stored K-major, a few rows */

/* y (M, N) = x (M, K) @ wt + b for wt (K, N) row-major: an fp32 weight W (N, K) in the K-major layout that
 * Transformer.decode_layout gives it (W.t() contiguous). For 2..MAX_M rows: a speculative verify pass (the
 * last id + K drafts). MKL's sgemm on this AVX2 CPU costs about one GEMV per row at 2-8 rows; here every weight
 * is read once for all M rows (benchmarks/NOTES.md, "Draft-model speculative decoding, session 5"). Each thread
 * owns a range of columns (a multiple of 16) and walks the rows of wt F32_KB at a time (F32_KB sequential
 * streams, the next block's lines prefetched); each 16-column tile of y (up to 6 rows x 16 in registers per
 * pass; 7-16 rows in even passes) takes the block's F32_KB rank-1 updates and goes back to y (L1/L2: M x N
 * fp32). Sums in fp32, in k order per element; columns past the last full tile in scalar loops. */
#define F32_KB 8

#ifdef __AVX2__
static inline __attribute__((always_inline)) void f32_tile(const float *x, const float *wt, float *y, int mm,
                                                          int N, int K, int k0, int k1, int n, int pf) {
    __m256 a[6][2];
    _Pragma("GCC unroll 6") for (int i = 0; i < mm; i++) {
        a[i][0] = _mm256_loadu_ps(y + (int64_t)i * N + n);
        a[i][1] = _mm256_loadu_ps(y + (int64_t)i * N + n + 8);
    }
    for (int k = k0; k < k1; k++) {
        const float *w = wt + (int64_t)k * N + n;
        if (pf) _mm_prefetch((const char *)(w + (int64_t)(k1 - k0) * N), _MM_HINT_T0);  /* the next block's line */
        __m256 w0 = _mm256_loadu_ps(w), w1 = _mm256_loadu_ps(w + 8);
        _Pragma("GCC unroll 6") for (int i = 0; i < mm; i++) {
            __m256 b = _mm256_broadcast_ss(x + (int64_t)i * K + k);
            a[i][0] = _mm256_fmadd_ps(b, w0, a[i][0]);
            a[i][1] = _mm256_fmadd_ps(b, w1, a[i][1]);
        }
    }
    _Pragma("GCC unroll 6") for (int i = 0; i < mm; i++) {
        _mm256_storeu_ps(y + (int64_t)i * N + n, a[i][0]);
        _mm256_storeu_ps(y + (int64_t)i * N + n + 8, a[i][1]);
    }
}

static void f32_tile_m(const float *x, const float *wt, float *y, int mm, int N, int K, int k0, int k1, int n,
                       int pf) {
    switch (mm) {  /* a constant row count per call: the tile's accumulators stay in registers */
    case 1: f32_tile(x, wt, y, 1, N, K, k0, k1, n, pf); break;
    case 2: f32_tile(x, wt, y, 2, N, K, k0, k1, n, pf); break;
    case 3: f32_tile(x, wt, y, 3, N, K, k0, k1, n, pf); break;
    case 4: f32_tile(x, wt, y, 4, N, K, k0, k1, n, pf); break;
    case 5: f32_tile(x, wt, y, 5, N, K, k0, k1, n, pf); break;
    default: f32_tile(x, wt, y, 6, N, K, k0, k1, n, pf); break;
    }
}
#endif

void f32_kmajor_gemm(const float *x, const float *wt, const float *bias, float *y, int M, int N, int K) {
    #pragma omp parallel if ((int64_t)N * K > 65536)
    {
        int nt = omp_get_num_threads(), id = omp_get_thread_num();
        int per = ((N + nt - 1) / nt + 15) / 16 * 16;
        int c0 = id * per < N ? id * per : N, c1 = c0 + per < N ? c0 + per : N;
        int KB = F32_KB, mp = (M + (M + 5) / 6 - 1) / ((M + 5) / 6);  /* rows per pass: <= 6, even split */
        for (int m = 0; m < M; m++)
            for (int n = c0; n < c1; n++) y[(int64_t)m * N + n] = bias ? bias[n] : 0.0f;
        int n = c0;
#ifdef __AVX2__
        int nv = c0 + (c1 - c0) / 16 * 16;
        for (int k0 = 0; k0 < K; k0 += KB) {
            int k1 = k0 + KB < K ? k0 + KB : K;
            for (int t = c0; t < nv; t += 16)
                for (int m0 = 0; m0 < M; m0 += mp)
                    f32_tile_m(x + (int64_t)m0 * K, wt, y + (int64_t)m0 * N, M - m0 < mp ? M - m0 : mp, N, K,
                               k0, k1, t, m0 == 0 && k1 + KB <= K);
        }
        n = nv;
#endif
        for (int k = 0; k < K; k++) {  /* the columns left over (scalar; all of them without AVX2) */
            const float *w = wt + (int64_t)k * N;
            for (int m = 0; m < M; m++) {
                float xv = x[(int64_t)m * K + k];
                for (int j = n; j < c1; j++) y[(int64_t)m * N + j] += xv * w[j];
            }
        }
    }
}

/* y (M, N) = x (M, K) @ W^T + b for W (N, K) row-major (N-major, the layout decode_layout leaves a weight with
 * N < K): every row of W is read once for all M rows of x. NB rows of W per pass (NB = 4 / 3 / 2 / 1 for M =
 * 1-2 / 3 / 4-6 / 7-8: NB x M accumulators + NB weight vectors fit the 16 registers), so each 8 values of x
 * loaded serve NB rows: with one row per pass x (M x K fp32, 34 KB at M = 3, K = 2816: past L1) was re-read from
 * L2 for every output; with the machine's other vCPU busy the 1024x2816 weight then cost 1.35-1.6 GEMVs at 3-4
 * rows, 0.95-1.2 blocked (quiet, both ~1.1; benchmarks/NOTES.md, "Speculative decoding, session 6"). Each weight
 * stream is prefetched F32_NPF values ahead.
 * Per output one accumulator (8 lanes) in k order, the lanes added, then the tail: fp32 sums. The N-major partner
 * of f32_kmajor_gemm. */
#define F32_NPF 256

#ifdef __AVX2__
static inline __attribute__((always_inline)) void f32_rows_nb(const float *x, const float *w, const float *bias,
                                                             float *y, int nb, int mm, int N, int K, int n) {
    __m256 a[4][8];
    _Pragma("GCC unroll 4") for (int j = 0; j < nb; j++)
        _Pragma("GCC unroll 8") for (int i = 0; i < mm; i++) a[j][i] = _mm256_setzero_ps();
    int k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 wv[4];
        _Pragma("GCC unroll 4") for (int j = 0; j < nb; j++) {
            const float *wr = w + (int64_t)(n + j) * K + k;
            _mm_prefetch((const char *)(wr + F32_NPF), _MM_HINT_T0);
            wv[j] = _mm256_loadu_ps(wr);
        }
        _Pragma("GCC unroll 8") for (int i = 0; i < mm; i++) {
            __m256 xv = _mm256_loadu_ps(x + (int64_t)i * K + k);
            _Pragma("GCC unroll 4") for (int j = 0; j < nb; j++) a[j][i] = _mm256_fmadd_ps(wv[j], xv, a[j][i]);
        }
    }
    _Pragma("GCC unroll 4") for (int j = 0; j < nb; j++) {
        const float *wr = w + (int64_t)(n + j) * K;
        _Pragma("GCC unroll 8") for (int i = 0; i < mm; i++) {
            float s = hsum8(a[j][i]);
            for (int kk = k; kk < K; kk++) s += wr[kk] * x[(int64_t)i * K + kk];
            y[(int64_t)i * N + n + j] = s + (bias ? bias[n + j] : 0.0f);
        }
    }
}

/* Rows n .. n + nb - 1 of W against all M rows of x (nb = f32_nb(M), or 1 for the rows left over). */
static void f32_rows_at(const float *x, const float *w, const float *bias, float *y, int nb, int M, int N, int K,
                        int n) {
    if (nb == 1) {  /* constant (nb, M) per call: the accumulators stay in registers */
        switch (M) {
        case 1: f32_rows_nb(x, w, bias, y, 1, 1, N, K, n); break;
        case 2: f32_rows_nb(x, w, bias, y, 1, 2, N, K, n); break;
        case 3: f32_rows_nb(x, w, bias, y, 1, 3, N, K, n); break;
        case 4: f32_rows_nb(x, w, bias, y, 1, 4, N, K, n); break;
        case 5: f32_rows_nb(x, w, bias, y, 1, 5, N, K, n); break;
        case 6: f32_rows_nb(x, w, bias, y, 1, 6, N, K, n); break;
        case 7: f32_rows_nb(x, w, bias, y, 1, 7, N, K, n); break;
        default: f32_rows_nb(x, w, bias, y, 1, 8, N, K, n); break;
        }
        return;
    }
    switch (M) {
    case 1: f32_rows_nb(x, w, bias, y, 4, 1, N, K, n); break;
    case 2: f32_rows_nb(x, w, bias, y, 4, 2, N, K, n); break;
    case 3: f32_rows_nb(x, w, bias, y, 3, 3, N, K, n); break;
    case 4: f32_rows_nb(x, w, bias, y, 2, 4, N, K, n); break;
    case 5: f32_rows_nb(x, w, bias, y, 2, 5, N, K, n); break;
    default: f32_rows_nb(x, w, bias, y, 2, 6, N, K, n); break;
    }
}

static inline int f32_nb(int M) { return M <= 2 ? 4 : M == 3 ? 3 : M <= 6 ? 2 : 1; }
#endif

void f32_nmajor_gemm(const float *x, const float *w, const float *bias, float *y, int M, int N, int K) {
#ifdef __AVX2__
    for (int m0 = 0; m0 < M; m0 += 8) {  /* at most 8 rows of x per pass over W */
        int mm = M - m0 < 8 ? M - m0 : 8, nb = f32_nb(mm), nblk = N / nb;
        const float *xm = x + (int64_t)m0 * K;
        float *ym = y + (int64_t)m0 * N;
        #pragma omp parallel for schedule(static) if ((int64_t)N * K > 65536)
        for (int b = 0; b < nblk; b++) f32_rows_at(xm, w, bias, ym, nb, mm, N, K, b * nb);
        for (int n = nblk * nb; n < N; n++) f32_rows_at(xm, w, bias, ym, 1, mm, N, K, n);
    }
#else
    #pragma omp parallel for schedule(static) if ((int64_t)N * K > 65536)
    for (int n = 0; n < N; n++) {
        const float *wr = w + (int64_t)n * K;
        for (int m = 0; m < M; m++) {
            float s = 0.0f;
            for (int k = 0; k < K; k++) s += wr[k] * x[(int64_t)m * K + k];
            y[(int64_t)m * N + n] = s + (bias ? bias[n] : 0.0f);
        }
    }
#endif
}
