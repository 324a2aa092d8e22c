/* int8 activations x int8 / int4 weights, as llama.cpp's Q8_0 x Q8_0 / Q4_0 dot products do.
 *
 * Why this exists: torch's weight-only kernels (_weight_int8pack_mm, _weight_int4pack_mm_for_cpu)
 * are fast only with AVX512-BF16; on AVX2 they read weights slower than float32 is read
 * (bench/quant_kernels.py). The integer dot product below reads 4 or 8 bits a weight at the memory
 * rate on AVX2 and AVX-512 alike. quant/fast.py calls it through ctypes; quant/linear.py keeps the
 * dequantize path beside it as the oracle.
 *
 * Numerics. Activations are quantized per row, per block of 32 columns: d = amax / 127,
 * q = round-to-nearest-even(x / d) (q8_rows). A block's integer sum is exact, and each row's float
 * accumulation runs in a fixed order that does not depend on the other rows: the output for a row
 * is the same whether it is computed alone or among M rows (speculative verify = plain decode).
 *
 * Layouts (quant/pack.py): int8 weights int8 [N, K]; int4 weights uint8 [N, K / 2] with column 2i in
 * the low nibble of byte i and column 2i + 1 in the high one, value - 8; scales float16 [N, K / g]
 * with g a multiple of 32. For int4 the activation blocks are stored deinterleaved (even columns,
 * then odd ones), so that a block's 16 weight bytes split into [low nibbles | high nibbles] line up
 * with them without a shuffle.
 *
 * One build serves every x86-64 CPU: the AVX2 functions carry target attributes and are chosen at
 * run time (ug_isa); elsewhere the plain C loops run (same results up to float summation order).
 * Rows of W are split across OpenMP threads (torch's own libgomp, loaded first).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define UG_X86 1
#endif

#define QK 32
#define PREFETCH 3072

static float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {  /* subnormal: normalize */
            int e = -1;
            do { man <<= 1; e++; } while (!(man & 0x400));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000 | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* ---------------------------------------------------------------- activations, plain C */

static void q8_block(const float *x, int8_t *q, float *d, int32_t *xs8, int deinterleave) {
    float amax = 0.f;
    for (int i = 0; i < QK; i++) amax = fmaxf(amax, fabsf(x[i]));
    float s = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
    int32_t sum = 0;
    *d = s;
    for (int i = 0; i < QK; i++) {
        int j = deinterleave ? (i & 1) * (QK / 2) + i / 2 : i;
        q[j] = (int8_t)nearbyintf(x[i] * inv);
        sum += q[j];
    }
    *xs8 = 8 * sum;
}

/* x float32 [M, K] -> q int8 [M, K], d float32 [M, K / 32], xs8 int32 [M, K / 32] (8 x the sum of
 * a block's q: the int4 kernel's offset). */
static void ug_q8_rows(const float *x, int64_t M, int64_t K, int8_t *q, float *d, int32_t *xs8, int deinterleave) {
    int64_t nb = K / QK;
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < nb; b++)
            q8_block(x + m * K + b * QK, q + m * K + b * QK, d + m * nb + b, xs8 + m * nb + b, deinterleave);
}

/* ---------------------------------------------------------------- dot products, plain C */

static float dot_row_c(const int8_t *xq, const float *dx, const void *w, const uint16_t *s,
                       int64_t K, int64_t g, int bits) {
    int64_t nb = K / QK, per = g / QK;
    float acc = 0.f;
    for (int64_t b = 0; b < nb; b++) {
        int32_t sum = 0;
        const int8_t *xb = xq + b * QK;
        if (bits == 8) {
            const int8_t *wb = (const int8_t *)w + b * QK;
            for (int i = 0; i < QK; i++) sum += (int32_t)xb[i] * wb[i];
        } else {
            const uint8_t *wb = (const uint8_t *)w + b * (QK / 2);
            for (int i = 0; i < QK / 2; i++) {
                sum += (int32_t)xb[i] * ((wb[i] & 15) - 8);
                sum += (int32_t)xb[i + QK / 2] * ((wb[i] >> 4) - 8);
            }
        }
        acc += dx[b] * f16_to_f32(s[b / per]) * (float)sum;  /* the plain path: clarity over speed */
    }
    return acc;
}

/* ---------------------------------------------------------------- AVX2 */
#ifdef UG_X86
#define AVX2 __attribute__((target("avx2,fma,f16c")))

AVX2 static inline float hsum(__m256 v) {
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}

/* sum of w[i] * x[i] over 32 int8 pairs, as 8 int32 lanes: maddubs needs an unsigned side, so
 * |w| and x * sign(w) (|w| <= 128, |x| <= 127: pair sums stay inside int16). */
AVX2 static inline __m256i dot32(__m256i w, __m256i x) {
    __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}

/* a block's 16 bytes → 32 nibbles 0..15, [low nibbles | high nibbles] */
AVX2 static inline __m256i nibbles(const uint8_t *p) {
    __m128i b = _mm_loadu_si128((const __m128i *)p);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(b, 4), b), _mm256_set1_epi8(15));
}

/* int4: sum of (u - 8) * x = sum of u * x - 8 * sum of x. The nibbles u are unsigned and small
 * (15 * 127 * 2 fits int16), so maddubs takes them as they are: no sign trick; the 8 * sum(x) of
 * the activation block (xs8, from the quantizer) comes off lane 0. Still exact integers. */
AVX2 static inline __m256i dot32_u4(__m256i u, __m256i x, int32_t xs8) {
    __m256i d = _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1));
    return _mm256_sub_epi32(d, _mm256_zextsi128_si256(_mm_cvtsi32_si128(xs8)));
}

AVX2 static void q8_rows_avx2(const float *x, int64_t M, int64_t K, int8_t *q, float *d, int32_t *xs8,
                              int deinterleave) {
    int64_t nb = K / QK;
    const __m256 signbit = _mm256_set1_ps(-0.0f);
    for (int64_t m = 0; m < M; m++) {
        for (int64_t b = 0; b < nb; b++) {
            const float *xb = x + m * K + b * QK;
            if (deinterleave) {  /* rare path shape-wise equal to the C one: keep it exact */
                q8_block(xb, q + m * K + b * QK, d + m * nb + b, xs8 + m * nb + b, 1);
                continue;
            }
            __m256 v0 = _mm256_loadu_ps(xb), v1 = _mm256_loadu_ps(xb + 8);
            __m256 v2 = _mm256_loadu_ps(xb + 16), v3 = _mm256_loadu_ps(xb + 24);
            __m256 a = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(signbit, v0), _mm256_andnot_ps(signbit, v1)),
                                     _mm256_max_ps(_mm256_andnot_ps(signbit, v2), _mm256_andnot_ps(signbit, v3)));
            __m128 r = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
            r = _mm_max_ps(r, _mm_movehl_ps(r, r));
            r = _mm_max_ss(r, _mm_movehdup_ps(r));
            float amax = _mm_cvtss_f32(r);
            d[m * nb + b] = amax / 127.f;
            __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
            /* cvtps rounds to nearest even, as nearbyintf does in the C path */
            __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, inv)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, inv));
            __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, inv)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, inv));
            __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
            p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256((__m256i *)(q + m * K + b * QK), p);
            __m256i s16 = _mm256_maddubs_epi16(_mm256_set1_epi8(1), p);  /* 1 * q pairs → int16 */
            __m256i s32 = _mm256_madd_epi16(s16, _mm256_set1_epi16(1));
            __m128i h = _mm_add_epi32(_mm256_castsi256_si128(s32), _mm256_extracti128_si256(s32, 1));
            h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4e));
            h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xb1));
            xs8[m * nb + b] = 8 * _mm_cvtsi128_si32(h);
        }
    }
}

/* rows [0, mt) of x (mt <= 4, a constant where it is inlined) against one weight row: the weight
 * block is unpacked once for all of them, the accumulators stay in registers, two per row (even
 * and odd blocks) so consecutive blocks do not wait on one FMA chain. The scale index advances
 * with a counter: no division per block. */
#define MT 4
AVX2 static inline __attribute__((always_inline)) void
dot_rows_avx2(const int8_t *xq, const float *dx, const int32_t *xs8, const int mt, const void *w,
              const uint16_t *s, int64_t K, int64_t g, const int bits, float *out) {
    int64_t nb = K / QK, per = g / QK, left = per;
    __m256 acc[MT][2];
    for (int t = 0; t < MT; t++) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
    float ws = _cvtsh_ss(s[0]);
    for (int64_t b = 0; b < nb; b++) {
        if (left == 0) {
            left = per;
            ws = _cvtsh_ss(*++s);
        }
        left--;
        /* the weights stream from memory once: ask for them ~3 KB ahead. The hardware prefetcher
         * alone leaves the loads waiting: 13 → 25 GB/s (int8) on a 168 MB matrix, AVX-512 machine */
        _mm_prefetch((const char *)w + b * (bits == 8 ? QK : QK / 2) + PREFETCH, _MM_HINT_T0);
        __m256i wv = bits == 8 ? _mm256_loadu_si256((const __m256i *)((const int8_t *)w + b * QK))
                               : nibbles((const uint8_t *)w + b * (QK / 2));
        for (int t = 0; t < mt; t++) {
            __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + t * K + b * QK));
            __m256i d = bits == 8 ? dot32(wv, xv) : dot32_u4(wv, xv, xs8[t * nb + b]);
            acc[t][b & 1] = _mm256_fmadd_ps(_mm256_set1_ps(ws * dx[t * nb + b]), _mm256_cvtepi32_ps(d), acc[t][b & 1]);
        }
    }
    for (int t = 0; t < mt; t++) out[t] = hsum(_mm256_add_ps(acc[t][0], acc[t][1]));
}

/* one call per (weight row, tile of rows): constant bits and mt, so each body is specialized */
AVX2 static void dot_tile_avx2(const int8_t *xq, const float *dx, const int32_t *xs8, int64_t mt, const void *w,
                               const uint16_t *s, int64_t K, int64_t g, int bits, float *out) {
#define CASE(B, T) if (bits == B && mt == T) { dot_rows_avx2(xq, dx, xs8, T, w, s, K, g, B, out); return; }
    CASE(8, 1) CASE(8, 2) CASE(8, 3) CASE(8, 4) CASE(4, 1) CASE(4, 2) CASE(4, 3) CASE(4, 4)
#undef CASE
}

/* ---------------------------------------------------------------- AVX-512 VNNI, int4 only
 * Where int4 is compute-bound on AVX2 code (~35 G weights/s on 2 AVX-512 cores, under the memory
 * rate there), vpdpbusd does maddubs + madd for two blocks at once: u (unsigned nibbles) x q
 * (signed activations), minus 8 x q (a second vpdpbusd), exact int32 per block as above. */
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")))

/* two blocks' 32 bytes → [low nibbles b | high b | low b + 1 | high b + 1], 16 bytes each */
AVX512 static inline __m512i nibbles64(const uint8_t *p) {
    __m256i b = _mm256_loadu_si256((const __m256i *)p), m = _mm256_set1_epi8(15);
    __m256i lo = _mm256_and_si256(b, m), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), m);
    __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    return _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 1, 4, 5, 2, 3, 6, 7), v);
}

/* What depends on the activations alone, once per call rather than once per weight row: for
 * row t and block pair p, dxv = [d(2p) x 8 | d(2p + 1) x 8] and e8 = 8 x the 4-byte group sums
 * of q (the second vpdpbusd), 16 lanes each. */
AVX512 static void vnni_prep(const int8_t *xq, const float *dx, int64_t M, int64_t K, float *dxv, int32_t *e8) {
    int64_t nb = K / QK, np = nb / 2;
    const __m512i zero = _mm512_setzero_si512(), eights = _mm512_set1_epi8(8);
    for (int64_t t = 0; t < M; t++)
        for (int64_t p = 0; p < np; p++) {
            __m512i xv = _mm512_loadu_si512((const void *)(xq + t * K + p * 2 * QK));
            _mm512_storeu_si512((void *)(e8 + (t * np + p) * 16), _mm512_dpbusd_epi32(zero, eights, xv));
            __m512 v = _mm512_insertf32x8(_mm512_set1_ps(dx[t * nb + 2 * p]), _mm256_set1_ps(dx[t * nb + 2 * p + 1]), 1);
            _mm512_storeu_ps(dxv + (t * np + p) * 16, v);
        }
}

AVX512 static inline __attribute__((always_inline)) void
dot_rows_vnni4(const int8_t *xq, const float *dx, const float *dxv, const int32_t *e8, const int mt,
               const uint8_t *w, const uint16_t *s, int64_t K, int64_t g, float *out) {
    int64_t nb = K / QK, np = nb / 2, per = g / QK, gi = 0, left = per, b = 0;
    const __m512i zero = _mm512_setzero_si512();
    __m512 acc[MT];
    float tail[MT] = {0};
    for (int t = 0; t < MT; t++) acc[t] = _mm512_setzero_ps();
    for (int64_t p = 0; p < np; p++, b += 2) {
        if (left == 0) { left = per; gi++; }
        left--;
        const float ws0 = _cvtsh_ss(s[gi]);
        if (left == 0) { left = per; gi++; }
        left--;
        const float ws1 = _cvtsh_ss(s[gi]);
        /* one group for both blocks (g >= 64): one broadcast; else two halves */
        const __m512 wsv = ws0 == ws1 ? _mm512_set1_ps(ws0)
                                      : _mm512_insertf32x8(_mm512_set1_ps(ws0), _mm256_set1_ps(ws1), 1);
        _mm_prefetch((const char *)w + b * (QK / 2) + PREFETCH, _MM_HINT_T0);
        __m512i u = nibbles64(w + b * (QK / 2));
        for (int t = 0; t < mt; t++) {
            __m512i xv = _mm512_loadu_si512((const void *)(xq + t * K + b * QK));
            __m512i d = _mm512_sub_epi32(_mm512_dpbusd_epi32(zero, u, xv),
                                         _mm512_loadu_si512((const void *)(e8 + (t * np + p) * 16)));
            __m512 sc = _mm512_mul_ps(wsv, _mm512_loadu_ps(dxv + (t * np + p) * 16));
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sc, acc[t]);
        }
    }
    if (b < nb) {  /* an odd block count: the last block in plain integers */
        if (left == 0) gi++;
        const float ws = _cvtsh_ss(s[gi]);
        const uint8_t *wb = w + b * (QK / 2);
        for (int t = 0; t < mt; t++) {
            const int8_t *xb = xq + t * K + b * QK;
            int32_t sum = 0;
            for (int i = 0; i < QK / 2; i++) sum += xb[i] * ((wb[i] & 15) - 8) + xb[i + QK / 2] * ((wb[i] >> 4) - 8);
            tail[t] = ws * dx[t * nb + b] * (float)sum;
        }
    }
    for (int t = 0; t < mt; t++) out[t] = _mm512_reduce_add_ps(acc[t]) + tail[t];
}

AVX512 static void dot_tile_vnni4(const int8_t *xq, const float *dx, const float *dxv, const int32_t *e8, int64_t mt,
                                  const uint8_t *w, const uint16_t *s, int64_t K, int64_t g, float *out) {
    switch (mt) {
        case 1: dot_rows_vnni4(xq, dx, dxv, e8, 1, w, s, K, g, out); return;
        case 2: dot_rows_vnni4(xq, dx, dxv, e8, 2, w, s, K, g, out); return;
        case 3: dot_rows_vnni4(xq, dx, dxv, e8, 3, w, s, K, g, out); return;
        default: dot_rows_vnni4(xq, dx, dxv, e8, 4, w, s, K, g, out); return;
    }
}

/* the best code this CPU runs: 2 AVX-512 VNNI (int4; int8 stays on AVX2), 1 AVX2, 0 none */
static int cpu_level(void) {
    static int v = -1;
    if (v < 0) {
        __builtin_cpu_init();
        v = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
        if (v && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
                && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")
                && __builtin_cpu_supports("avx512vnni"))
            v = 2;
    }
    return v;
}
#else
static int cpu_level(void) { return 0; }
#endif

/* ---------------------------------------------------------------- entry points */

/* The level of code that runs: 2 AVX-512 VNNI, 1 AVX2, 0 the plain C loops. `cap` >= 0 sets the
 * highest level allowed (tests, and a process whose torch is capped to a lower ISA); -1 asks. */
static int cap_level = 2;
int ug_isa(int cap) {
    if (cap >= 0) cap_level = cap;
    int v = cpu_level();
    return v < cap_level ? v : cap_level;
}

static void ug_quantize(const float *x, int64_t M, int64_t K, int8_t *q, float *d, int32_t *xs8, int deinterleave) {
#ifdef UG_X86
    if (ug_isa(-1)) { q8_rows_avx2(x, M, K, q, d, xs8, deinterleave); return; }
#endif
    ug_q8_rows(x, M, K, q, d, xs8, deinterleave);
}

static float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static uint16_t f32_to_bf16(float f) {  /* round to nearest even, as torch's .to(bfloat16) */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 0x40);  /* NaN stays NaN */
    u += 0x7fff + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

/* y [M, N] (float32, or bfloat16 with y_bf16) = activations (q, d, xs8 from ug_quantize) x weights
 * [N, K] (bits 8 or 4). One parallel region: weight rows split across the threads. */
static void ug_gemm(const int8_t *xq, const float *dx, const int32_t *xs8, int64_t M, int64_t K, const void *w,
             const uint16_t *s, int64_t g, int64_t N, int bits, void *y, int y_bf16) {
    int64_t nb = K / QK, wrow = bits == 8 ? K : K / 2, srow = K / g;
    int simd = ug_isa(-1);
    float *dxv = NULL;
    int32_t *e8 = NULL;
#ifdef UG_X86
    if (simd == 2 && bits == 4) {
        dxv = malloc(sizeof(float) * 16 * M * (nb / 2 + 1));
        e8 = malloc(sizeof(int32_t) * 16 * M * (nb / 2 + 1));
        if (dxv && e8) vnni_prep(xq, dx, M, K, dxv, e8);
        else simd = 1;  /* no memory for the tables: the AVX2 code needs none */
    }
#endif
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const void *wn = (const uint8_t *)w + n * wrow;
        float vals[4];
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            int64_t mt = M - m0 < 4 ? M - m0 : 4;
#ifdef UG_X86
            if (simd == 2 && bits == 4)
                dot_tile_vnni4(xq + m0 * K, dx + m0 * nb, dxv + m0 * 16 * (nb / 2), e8 + m0 * 16 * (nb / 2), mt, wn,
                               s + n * srow, K, g, vals);
            else if (simd)
                dot_tile_avx2(xq + m0 * K, dx + m0 * nb, xs8 + m0 * nb, mt, wn, s + n * srow, K, g, bits, vals);
            else
#endif
                for (int64_t t = 0; t < mt; t++)
                    vals[t] = dot_row_c(xq + (m0 + t) * K, dx + (m0 + t) * nb, wn, s + n * srow, K, g, bits);
            for (int64_t t = 0; t < mt; t++) {
                if (y_bf16) ((uint16_t *)y)[(m0 + t) * N + n] = f32_to_bf16(vals[t]);
                else ((float *)y)[(m0 + t) * N + n] = vals[t];
            }
        }
    }
    free(dxv);
    free(e8);
    (void)simd;
}

/* ---------------------------------------------------------------- one call per layer */

/* y [M, N] = x [M, K] @ weights (bits, g)ᵀ; x and y float32 or bfloat16 (x_bf16, y_bf16): the
 * activations are quantized here and every buffer between lives only in this call, so a layer is
 * one call from Python. Returns 0, or -1 when memory ran out (nothing written). */
int ug_linear(const void *x, int x_bf16, int64_t M, int64_t K, const void *w, const uint16_t *s, int64_t g,
              int64_t N, int bits, void *y, int y_bf16) {
    int64_t nb = K / QK;
    float *xf = x_bf16 ? malloc(sizeof(float) * M * K) : (float *)x;
    int8_t *q = malloc(M * K);
    float *d = malloc(sizeof(float) * M * nb);
    int32_t *xs8 = malloc(sizeof(int32_t) * M * nb);
    int ok = xf && q && d && xs8;
    if (ok) {  /* the activations are small: converted and quantized on this thread */
        if (x_bf16)
            for (int64_t i = 0; i < M * K; i++) xf[i] = bf16_to_f32(((const uint16_t *)x)[i]);
        ug_quantize(xf, M, K, q, d, xs8, bits == 4);
        ug_gemm(q, d, xs8, M, K, w, s, g, N, bits, y, y_bf16);
    }
    if (x_bf16) free(xf);
    free(q);
    free(d);
    free(xs8);
    return ok ? 0 : -1;
}

/* ---------------------------------------------------------------- weights, at load
 * pack.py's quantizers (ggml's reference rounding) bit for bit, ~50x faster than their torch ops:
 * quantizing a 12B checkpoint as it loads must not cost more than reading it. Built with
 * -ffp-contract=off: x * id + 8.5 is two roundings there, as in torch and ggml, never one FMA.
 * w: float32 (wtype 0), bfloat16 (1) or float16 (2) [N, K]; q: int8 [N, K] or packed uint8
 * [N, K / 2]; d: float32 [N, K / g], the scales before their float16 rounding (pack.py rounds). */
static inline __attribute__((always_inline)) float load_w(const void *w, int wtype, int64_t i) {
    if (wtype == 0) return ((const float *)w)[i];
    if (wtype == 1) return bf16_to_f32(((const uint16_t *)w)[i]);
    return f16_to_f32(((const uint16_t *)w)[i]);
}

static inline __attribute__((always_inline)) void
quantize_weight_row(const void *w, int wtype, int64_t n, int64_t K, int bits, int64_t g, void *q, float *d) {
    int64_t G = K / g;
    {
        for (int64_t gi = 0; gi < G; gi++) {
            int64_t base = n * K + gi * g;
            if (bits == 8) {
                float amax = 0.f;
                for (int64_t j = 0; j < g; j++) amax = fmaxf(amax, fabsf(load_w(w, wtype, base + j)));
                float dd = amax / 127.f, id = dd == 0.f ? 0.f : 1.f / dd;
                d[n * G + gi] = dd;
                for (int64_t j = 0; j < g; j++) {
                    float v = load_w(w, wtype, base + j) * id, a = fabsf(v), fl = floorf(a);
                    float r = fl + floorf(2.f * (a - fl));  /* half away from zero, as ggml's roundf */
                    ((int8_t *)q)[base + j] = (int8_t)(v < 0.f ? -r : r);
                }
            } else {
                float best = 0.f, amax = 0.f;
                for (int64_t j = 0; j < g; j++) {  /* the first value of largest magnitude, signed */
                    float v = load_w(w, wtype, base + j);
                    if (fabsf(v) > amax) { amax = fabsf(v); best = v; }
                }
                float dd = best / -8.f, id = dd == 0.f ? 0.f : 1.f / dd;
                d[n * G + gi] = dd;
                uint8_t *qb = (uint8_t *)q + base / 2;
                for (int64_t j = 0; j < g; j += 2) {
                    float v0 = load_w(w, wtype, base + j) * id, v1 = load_w(w, wtype, base + j + 1) * id;
                    float u0 = truncf(v0 + 8.5f), u1 = truncf(v1 + 8.5f);
                    uint8_t a0 = (uint8_t)(u0 < 0.f ? 0.f : u0 > 15.f ? 15.f : u0);
                    uint8_t a1 = (uint8_t)(u1 < 0.f ? 0.f : u1 > 15.f ? 15.f : u1);
                    qb[j / 2] = a0 | (uint8_t)(a1 << 4);
                }
            }
        }
    }
}

/* The same code twice: compiled for AVX2 (floorf / truncf become one instruction, the loops
 * vectorize) and for any x86-64 (libm calls); -ffp-contract=off keeps both bit-equal. */
#ifdef UG_X86
__attribute__((target("avx2,f16c"))) static void
quantize_weights_avx2(const void *w, int wtype, int64_t N, int64_t K, int bits, int64_t g, void *q, float *d) {
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) quantize_weight_row(w, wtype, n, K, bits, g, q, d);
}
#endif

void ug_quantize_weights(const void *w, int wtype, int64_t N, int64_t K, int bits, int64_t g, void *q, float *d) {
#ifdef UG_X86
    if (cpu_level() >= 1) { quantize_weights_avx2(w, wtype, N, K, bits, g, q, d); return; }
#endif
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) quantize_weight_row(w, wtype, n, K, bits, g, q, d);
}

/* ---------------------------------------------------------------- an int8 KV cache, read directly
 * Decode attention over cache/quant.py's int8 K / V (codes [slots, D] per KV head, float16 scales
 * [slots, D / g]): the two halves of softmax(q kᵀ) v without a float copy of the cache.
 *
 * Scores: the keys are laid out exactly as int8 weights are (a row per slot, scales per g
 * columns), so q kᵀ is ug_gemm with the queries as activations (quantized per 32 columns, as
 * llama.cpp's q8_0 cache does: KL on real weights in bench/kv_quality.py).
 *
 * Values: out[r] = sum over slots k of p[r, k] x (codes[k] x scale[k]). The contraction runs
 * over slots, along which there is no shared scale, so the codes are converted to float, PV_KB
 * slots x PV_CW columns at a time (a block that stays in L1/L2), and every query row of the KV
 * head accumulates from that block: the cache is read once per step, whatever the number of
 * query heads sharing it. Each output element sums its slots in order with one fused
 * multiply-add each (fmaf in the C loops, the same instruction in the SIMD ones): every code
 * level gives the same bits, and a row's result does not depend on the rows beside it. */
#define PV_CW 64   /* output columns per task: one 64-byte line of codes per slot */
#define PV_KB 256  /* slots converted to float at a time: 64 KB of floats */

/* slots [k0, k0 + kn) of the codes at columns [c0, c0 + PV_CW) → float vf [kn][PV_CW]
 * (columns past D are zero) */
static inline __attribute__((always_inline)) void
pv_convert(const int8_t *vc, const uint16_t *vs, int64_t D, int64_t g, int64_t c0, int64_t k0, int64_t kn, float *vf) {
    int64_t cw = D - c0 < PV_CW ? D - c0 : PV_CW, ns = D / g;
    for (int64_t k = 0; k < kn; k++) {
        const int8_t *row = vc + (k0 + k) * D + c0;
        const uint16_t *srow = vs + (k0 + k) * ns;
        float *dst = vf + k * PV_CW;
        for (int64_t c = 0; c < cw; c += g < PV_CW ? g : PV_CW) {  /* one scale per group of g columns */
            float sc = f16_to_f32(srow[(c0 + c) / g]);
            int64_t end = c + g < cw ? c + g : cw;
            for (int64_t j = c; j < end; j++) dst[j] = (float)row[j] * sc;
        }
        for (int64_t j = cw; j < PV_CW; j++) dst[j] = 0.f;
    }
}

static void pv_rows_c(const float *p, int64_t K, int64_t k0, int64_t kn, int64_t mt, const float *vf, float *acc) {
    for (int64_t t = 0; t < mt; t++)
        for (int64_t k = 0; k < kn; k++) {
            float pk = p[t * K + k0 + k];
            for (int c = 0; c < PV_CW; c++) acc[t * PV_CW + c] = fmaf(pk, vf[k * PV_CW + c], acc[t * PV_CW + c]);
        }
}

#ifdef UG_X86
/* 2 rows x 64 columns: 16 accumulators in 16 ymm registers would spill, so two passes of 32 */
AVX2 static void pv_rows_avx2(const float *p, int64_t K, int64_t k0, int64_t kn, int64_t mt, const float *vf, float *acc) {
    for (int64_t t0 = 0; t0 < mt; t0 += 2) {
        int two = mt - t0 >= 2;
        for (int h = 0; h < PV_CW; h += 32) {
            __m256 a[2][4];
            for (int t = 0; t < 2; t++)
                for (int j = 0; j < 4; j++)
                    a[t][j] = t < 1 + two ? _mm256_loadu_ps(acc + (t0 + t) * PV_CW + h + 8 * j) : _mm256_setzero_ps();
            for (int64_t k = 0; k < kn; k++) {
                const float *v = vf + k * PV_CW + h;
                __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8);
                __m256 v2 = _mm256_loadu_ps(v + 16), v3 = _mm256_loadu_ps(v + 24);
                __m256 p0 = _mm256_set1_ps(p[t0 * K + k0 + k]);
                a[0][0] = _mm256_fmadd_ps(p0, v0, a[0][0]); a[0][1] = _mm256_fmadd_ps(p0, v1, a[0][1]);
                a[0][2] = _mm256_fmadd_ps(p0, v2, a[0][2]); a[0][3] = _mm256_fmadd_ps(p0, v3, a[0][3]);
                if (two) {
                    __m256 p1 = _mm256_set1_ps(p[(t0 + 1) * K + k0 + k]);
                    a[1][0] = _mm256_fmadd_ps(p1, v0, a[1][0]); a[1][1] = _mm256_fmadd_ps(p1, v1, a[1][1]);
                    a[1][2] = _mm256_fmadd_ps(p1, v2, a[1][2]); a[1][3] = _mm256_fmadd_ps(p1, v3, a[1][3]);
                }
            }
            for (int t = 0; t < 1 + two; t++)
                for (int j = 0; j < 4; j++) _mm256_storeu_ps(acc + (t0 + t) * PV_CW + h + 8 * j, a[t][j]);
        }
    }
}

/* 4 rows x 64 columns: 16 accumulators in zmm registers, 4 loads and 16 FMAs per slot */
AVX512 static void pv_rows_avx512(const float *p, int64_t K, int64_t k0, int64_t kn, int64_t mt, const float *vf,
                                  float *acc) {
    for (int64_t t0 = 0; t0 < mt; t0 += 4) {
        int n = mt - t0 < 4 ? (int)(mt - t0) : 4;
        __m512 a[4][4];
        for (int t = 0; t < 4; t++)
            for (int j = 0; j < 4; j++)
                a[t][j] = t < n ? _mm512_loadu_ps(acc + (t0 + t) * PV_CW + 16 * j) : _mm512_setzero_ps();
        for (int64_t k = 0; k < kn; k++) {
            const float *v = vf + k * PV_CW;
            __m512 v0 = _mm512_loadu_ps(v), v1 = _mm512_loadu_ps(v + 16);
            __m512 v2 = _mm512_loadu_ps(v + 32), v3 = _mm512_loadu_ps(v + 48);
            for (int t = 0; t < 4; t++) {  /* unrolled by the compiler; rows past n are never stored */
                __m512 pt = _mm512_set1_ps(t < n ? p[(t0 + t) * K + k0 + k] : 0.f);
                a[t][0] = _mm512_fmadd_ps(pt, v0, a[t][0]); a[t][1] = _mm512_fmadd_ps(pt, v1, a[t][1]);
                a[t][2] = _mm512_fmadd_ps(pt, v2, a[t][2]); a[t][3] = _mm512_fmadd_ps(pt, v3, a[t][3]);
            }
        }
        for (int t = 0; t < n; t++)
            for (int j = 0; j < 4; j++) _mm512_storeu_ps(acc + (t0 + t) * PV_CW + 16 * j, a[t][j]);
    }
}
#endif

/* scores [B, H, R, K] (float32) = q [B, H, R, D] (float32) x the codes kc (b, h at kc + b * ks0 +
 * h * ks1, each [K, D] with rows of D) with scales ksc (likewise, rows of D / g) transposed. */
int ug_kv_scores(const float *q, int64_t B, int64_t H, int64_t R, int64_t D, const int8_t *kc, int64_t kc0,
                 int64_t kc1, const uint16_t *ksc, int64_t ks0, int64_t ks1, int64_t K, int64_t g, float *scores) {
    int64_t M = B * H * R, nb = D / QK;
    int8_t *xq = malloc(M * D);
    float *dx = malloc(sizeof(float) * M * nb);
    int32_t *xs8 = malloc(sizeof(int32_t) * M * nb);
    int ok = xq && dx && xs8;
    if (ok) {
        ug_quantize(q, M, D, xq, dx, xs8, 0);
        for (int64_t b = 0; b < B; b++)
            for (int64_t h = 0; h < H; h++) {
                int64_t i = (b * H + h) * R;
                ug_gemm(xq + i * D, dx + i * nb, xs8 + i * nb, R, D, kc + b * kc0 + h * kc1, ksc + b * ks0 + h * ks1,
                        g, K, 8, scores + i * K, 0);
            }
    }
    free(xq);
    free(dx);
    free(xs8);
    return ok ? 0 : -1;
}

/* out [B, H, R, D] (float32) = p [B, H, R, K] (float32) x the dequantized codes vc (b, h at vc +
 * b * vc0 + h * vc1, each [K, D]) with scales vsc (rows of D / g). Tasks: (b, h, 64 columns). */
int ug_kv_values(const float *p, int64_t B, int64_t H, int64_t R, int64_t K, const int8_t *vc, int64_t vc0,
                 int64_t vc1, const uint16_t *vsc, int64_t vs0, int64_t vs1, int64_t D, int64_t g, float *out) {
    int64_t chunks = (D + PV_CW - 1) / PV_CW, tasks = B * H * chunks;
    int simd = ug_isa(-1), failed = 0;
#pragma omp parallel
    {
        float *vf = malloc(sizeof(float) * PV_KB * PV_CW), *acc = malloc(sizeof(float) * R * PV_CW);
        if (!vf || !acc) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t task = 0; task < tasks; task++) {
            if (!vf || !acc) continue;
            int64_t bh = task / chunks, b = bh / H, h = bh % H, c0 = task % chunks * PV_CW;
            const int8_t *codes = vc + b * vc0 + h * vc1;
            const uint16_t *sc = vsc + b * vs0 + h * vs1;
            const float *pb = p + bh * R * K;
            memset(acc, 0, sizeof(float) * R * PV_CW);
            for (int64_t k0 = 0; k0 < K; k0 += PV_KB) {
                int64_t kn = K - k0 < PV_KB ? K - k0 : PV_KB;
                pv_convert(codes, sc, D, g, c0, k0, kn, vf);
#ifdef UG_X86
                if (simd == 2) pv_rows_avx512(pb, K, k0, kn, R, vf, acc);
                else if (simd) pv_rows_avx2(pb, K, k0, kn, R, vf, acc);
                else
#endif
                    pv_rows_c(pb, K, k0, kn, R, vf, acc);
            }
            int64_t cw = D - c0 < PV_CW ? D - c0 : PV_CW;
            for (int64_t r = 0; r < R; r++) memcpy(out + (bh * R + r) * D + c0, acc + r * PV_CW, sizeof(float) * cw);
        }
        free(vf);
        free(acc);
    }
    (void)simd;
    return failed ? -1 : 0;
}
