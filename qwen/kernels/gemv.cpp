// Matrix-vector kernels for CPU decode: y[M, N] = x[M, K] . W[N, K]^T (+ bias), M small (decode: 1-4;
// the server's batched rows and short chunks: up to 31). qwen_dequantize_rows rebuilds W for prefill.
//
// Batch-1 decode reads every weight once per token, so its speed is the speed at which these loops
// stream W from memory. Each thread walks a contiguous band of output rows, four rows at a time
// (four independent sequential streams the hardware prefetcher follows), and keeps x in L1.
// Weights are read in PyTorch's own [out, in] order (fp32) or in a row-major code layout that
// QWen's loaders produce once at load time (int8, int4). Quantized weights are expanded to fp32 in
// registers; activations are rounded to int16 per row for the quantized kernels (see below), so
// the result is the dequantized matmul up to ~1e-5 relative.
//
// Quantized layout (per output row n, K inputs, groups of G inputs; G divides K, G % 64 == 0 for int4):
//   int8: codes uint8, 32 inputs per 32-byte chunk, w = scale[n, g] * (code - zero[n, g])
//   int4: codes uint8, 64 inputs per 32-byte chunk: byte j (0..31) of the chunk for inputs 64b..64b+63
//         holds input 64b+j in its low nibble and input 64b+32+j in its high nibble (so both nibble
//         halves map to contiguous x).
//   Rows are stored in tiles of 4 with their chunks interleaved (chunk c of rows 4t..4t+3, then chunk
//   c+1, ...), so a tile is read as one sequential stream; the last N % 4 rows follow, one after the
//   other. (Four short rows read side by side as separate streams defeat the hardware prefetcher,
//   which follows one stream per 4 KB page: large layers then streamed at half speed.)
//   scale and scale*zero are fp32 [N, K/G]; the zero term is applied once per group via sum(x in group).
//
// The end of the file holds qwen_decode_layers: every transformer block of one decode step (batch 1,
// one token) in a single call, built on the same quantized kernels (see its comment).
//
// Built by qwen/kernels/__init__.py with -O3 -march=native -fopenmp; called through ctypes.

#include <omp.h>
#include <stdint.h>
#include <math.h>
#include <string.h>

#include <vector>

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define QWEN_SIMD 512
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__)
#define QWEN_SIMD 256
#include <immintrin.h>
#else
#define QWEN_SIMD 0
#endif

namespace {

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Split rows [0, N) into `parts` contiguous bands aligned to 4 rows.
inline void band(int64_t N, int parts, int part, int64_t* lo, int64_t* hi) {
    int64_t quads = (N + 3) / 4;
    int64_t per = quads / parts, extra = quads % parts;
    int64_t q0 = part * per + min64(part, extra);
    int64_t q1 = q0 + per + (part < extra ? 1 : 0);
    *lo = min64(q0 * 4, N);
    *hi = min64(q1 * 4, N);
}

// Software prefetch distance: measured on large layers (lm_head), it adds 10-50% to the streaming rate.
#define PREFETCH_BYTES 4096
#define F32_PREFETCH 0

#if QWEN_SIMD == 512

// ------------------------------------------------------------------------------------------- fp32
template <int R, int MB>
inline void f32_tile(const float* x, int64_t ldx, const float* w, int64_t K, float out[R][MB]) {
    __m512 acc[R][MB];
    for (int r = 0; r < R; ++r)
        for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m512 xv[MB];
        for (int m = 0; m < MB; ++m) xv[m] = _mm512_loadu_ps(x + m * ldx + k);
        for (int r = 0; r < R; ++r) {
            if (F32_PREFETCH) _mm_prefetch((const char*)(w + r * K + k) + PREFETCH_BYTES, _MM_HINT_T0);
            __m512 wv = _mm512_loadu_ps(w + r * K + k);
            for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);
        }
    }
    if (k < K) {
        __mmask16 tail = (__mmask16)((1u << (K - k)) - 1);
        __m512 xv[MB];
        for (int m = 0; m < MB; ++m) xv[m] = _mm512_maskz_loadu_ps(tail, x + m * ldx + k);
        for (int r = 0; r < R; ++r) {
            __m512 wv = _mm512_maskz_loadu_ps(tail, w + r * K + k);
            for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int m = 0; m < MB; ++m) out[r][m] = _mm512_reduce_add_ps(acc[r][m]);
}

// ------------------------------------------------------------------------- int8 / int4
// Activations arrive as int16 (x = sx * xi, |xi| <= 32767, one sx per activation row: relative
// error <= 1.5e-5 of the row's largest value, far below bf16's 4e-3). Codes are widened to int16
// and multiplied with AVX512-VNNI's vpdpwssd (32 multiply-adds per instruction, exact int32
// sums). A block of B <= 256 inputs cannot overflow int32 (255 * 32767 * 256 < 2^31); each block's
// sum is converted to float and scaled by its group's scale.

template <int R, int MB, int BITS>
inline void quant_block(const int16_t* x, int64_t ldx, const uint8_t* codes, int64_t B,
                        __m512i acc[R][MB]) {
    for (int r = 0; r < R; ++r)
        for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_si512();
    if (BITS == 8) {
        for (int64_t k = 0; k < B; k += 32) {
            __m512i xv[MB];
            for (int m = 0; m < MB; ++m) xv[m] = _mm512_loadu_si512((const void*)(x + m * ldx + k));
            for (int r = 0; r < R; ++r) {
                const uint8_t* c = codes + (k / 32) * (R * 32) + r * 32;
                _mm_prefetch((const char*)(c + PREFETCH_BYTES), _MM_HINT_T0);
                __m512i wv = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)c));
                for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_dpwssd_epi32(acc[r][m], wv, xv[m]);
            }
        }
    } else {
        const __m256i low4 = _mm256_set1_epi8(0x0F);
        for (int64_t k = 0; k < B; k += 64) {
            __m512i xlo[MB], xhi[MB];
            for (int m = 0; m < MB; ++m) {
                xlo[m] = _mm512_loadu_si512((const void*)(x + m * ldx + k));
                xhi[m] = _mm512_loadu_si512((const void*)(x + m * ldx + k + 32));
            }
            for (int r = 0; r < R; ++r) {
                const uint8_t* c = codes + (k / 64) * (R * 32) + r * 32;
                _mm_prefetch((const char*)(c + PREFETCH_BYTES), _MM_HINT_T0);
                __m256i b = _mm256_loadu_si256((const __m256i*)c);
                __m512i lo = _mm512_cvtepu8_epi16(_mm256_and_si256(b, low4));
                __m512i hi = _mm512_cvtepu8_epi16(_mm256_and_si256(_mm256_srli_epi16(b, 4), low4));
                for (int m = 0; m < MB; ++m) {
                    acc[r][m] = _mm512_dpwssd_epi32(acc[r][m], lo, xlo[m]);
                    acc[r][m] = _mm512_dpwssd_epi32(acc[r][m], hi, xhi[m]);
                }
            }
        }
    }
}

// Register types and the few float ops the shared tile code (below) needs.
using VecF = __m512;
using VecI = __m512i;
inline VecF vzero() { return _mm512_setzero_ps(); }
inline VecF vscaled_add(VecI sums, float scale, VecF total) {
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_set1_ps(scale), total);
}
inline float vsum(VecF v) { return _mm512_reduce_add_ps(v); }

#elif QWEN_SIMD == 256
// AVX2 + FMA (x86-64-v3, e.g. AMD Zen 2/3): the same loops on 256-bit registers. vpmaddwd multiplies
// int16 pairs and adds each pair into int32 (what AVX512-VNNI's vpdpwssd does, without the
// accumulate), so the integer sums are the same exact values as on AVX-512.

inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

template <int R, int MB>
inline void f32_tile(const float* x, int64_t ldx, const float* w, int64_t K, float out[R][MB]) {
    __m256 acc[R][MB];
    for (int r = 0; r < R; ++r)
        for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 xv[MB];
        for (int m = 0; m < MB; ++m) xv[m] = _mm256_loadu_ps(x + m * ldx + k);
        for (int r = 0; r < R; ++r) {
            __m256 wv = _mm256_loadu_ps(w + r * K + k);
            for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_fmadd_ps(wv, xv[m], acc[r][m]);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int m = 0; m < MB; ++m) {
            float s = hsum256(acc[r][m]);
            for (int64_t j = k; j < K; ++j) s += w[r * K + j] * x[m * ldx + j];
            out[r][m] = s;
        }
}

inline __m256i widen16(const uint8_t* p) { return _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)p)); }
inline __m256i widen16(__m128i b) { return _mm256_cvtepu8_epi16(b); }

template <int R, int MB, int BITS>
inline void quant_block(const int16_t* x, int64_t ldx, const uint8_t* codes, int64_t B, __m256i acc[R][MB]) {
    for (int r = 0; r < R; ++r)
        for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_setzero_si256();
    if (BITS == 8) {
        for (int64_t k = 0; k < B; k += 32) {
            __m256i x0[MB], x1[MB];
            for (int m = 0; m < MB; ++m) {
                x0[m] = _mm256_loadu_si256((const __m256i*)(x + m * ldx + k));
                x1[m] = _mm256_loadu_si256((const __m256i*)(x + m * ldx + k + 16));
            }
            for (int r = 0; r < R; ++r) {
                const uint8_t* c = codes + (k / 32) * (R * 32) + r * 32;
                _mm_prefetch((const char*)(c + PREFETCH_BYTES), _MM_HINT_T0);
                __m256i w0 = widen16(c), w1 = widen16(c + 16);
                for (int m = 0; m < MB; ++m) {
                    acc[r][m] = _mm256_add_epi32(acc[r][m], _mm256_madd_epi16(w0, x0[m]));
                    acc[r][m] = _mm256_add_epi32(acc[r][m], _mm256_madd_epi16(w1, x1[m]));
                }
            }
        }
    } else {
        const __m256i low4 = _mm256_set1_epi8(0x0F);
        for (int64_t k = 0; k < B; k += 64) {
            for (int r = 0; r < R; ++r) {
                const uint8_t* c = codes + (k / 64) * (R * 32) + r * 32;
                _mm_prefetch((const char*)(c + PREFETCH_BYTES), _MM_HINT_T0);
                __m256i b = _mm256_loadu_si256((const __m256i*)c);
                __m256i lo = _mm256_and_si256(b, low4);
                __m256i hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low4);
                __m256i w[4] = {widen16(_mm256_castsi256_si128(lo)), widen16(_mm256_extracti128_si256(lo, 1)),
                                widen16(_mm256_castsi256_si128(hi)), widen16(_mm256_extracti128_si256(hi, 1))};
                for (int m = 0; m < MB; ++m)
                    for (int q = 0; q < 4; ++q) {
                        __m256i xv = _mm256_loadu_si256((const __m256i*)(x + m * ldx + k + 16 * q));
                        acc[r][m] = _mm256_add_epi32(acc[r][m], _mm256_madd_epi16(w[q], xv));
                    }
            }
        }
    }
}

using VecF = __m256;
using VecI = __m256i;
inline VecF vzero() { return _mm256_setzero_ps(); }
inline VecF vscaled_add(VecI sums, float scale, VecF total) {
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(scale), total);
}
inline float vsum(VecF v) { return hsum256(v); }

#endif

#if QWEN_SIMD
// ---------------------------------------------------- shared by the AVX-512 and AVX2 paths
template <int MB>
void f32_band(const float* x, const float* w, const float* bias, float* y, int64_t N, int64_t K,
              int64_t lo, int64_t hi) {
    for (int64_t n = lo; n < hi;) {
        if (hi - n >= 4) {
            float out[4][MB];
            f32_tile<4, MB>(x, K, w + n * K, K, out);
            for (int r = 0; r < 4; ++r)
                for (int m = 0; m < MB; ++m) y[m * N + n + r] = out[r][m] + (bias ? bias[n + r] : 0.f);
            n += 4;
        } else {
            float out[1][MB];
            f32_tile<1, MB>(x, K, w + n * K, K, out);
            for (int m = 0; m < MB; ++m) y[m * N + n] = out[0][m] + (bias ? bias[n] : 0.f);
            n += 1;
        }
    }
}

// y = sx * (sum_g scale_g * dot_g(codes, xi) - sum_g (scale*zero)_g * sum_g(xi)) + bias
template <int R, int MB, int BITS>
inline void quant_tile(const int16_t* x, const float* xscale, const float* xisum, int64_t N, int64_t K, int64_t G,
                       int64_t B, const uint8_t* codes, const float* scale, const float* szero, const float* bias,
                       float* y, int64_t n) {
    const int64_t groups = K / G, row_bytes = BITS == 8 ? K : K / 2;
    VecF total[R][MB];
    for (int r = 0; r < R; ++r)
        for (int m = 0; m < MB; ++m) total[r][m] = vzero();
    for (int64_t k0 = 0; k0 < K; k0 += B) {
        const int64_t g = k0 / G;
        VecI acc[R][MB];
        const uint8_t* c = codes + n * row_bytes + (k0 / (BITS == 8 ? 32 : 64)) * (R * 32);
        quant_block<R, MB, BITS>(x + k0, K, c, B, acc);
        for (int r = 0; r < R; ++r)
            for (int m = 0; m < MB; ++m) total[r][m] = vscaled_add(acc[r][m], scale[(n + r) * groups + g], total[r][m]);
    }
    for (int r = 0; r < R; ++r) {
        const float* sz = szero + (n + r) * groups;
        for (int m = 0; m < MB; ++m) {
            float zero_term = 0.f;
            for (int64_t g = 0; g < groups; ++g) zero_term += sz[g] * xisum[m * groups + g];
            y[m * N + n + r] = xscale[m] * (vsum(total[r][m]) - zero_term) + (bias ? bias[n + r] : 0.f);
        }
    }
}

template <int MB, int BITS>
void quant_band(const int16_t* x, const float* xscale, const float* xisum, int64_t N, int64_t K, int64_t G, int64_t B,
                const uint8_t* codes, const float* scale, const float* szero, const float* bias, float* y, int64_t lo,
                int64_t hi) {
    for (int64_t n = lo; n < hi;) {
        if (hi - n >= 4) {
            quant_tile<4, MB, BITS>(x, xscale, xisum, N, K, G, B, codes, scale, szero, bias, y, n);
            n += 4;
        } else {
            quant_tile<1, MB, BITS>(x, xscale, xisum, N, K, G, B, codes, scale, szero, bias, y, n);
            n += 1;
        }
    }
}

#else  // portable fallback (no AVX2): plain loops the compiler vectorises

template <int MB>
void f32_band(const float* x, const float* w, const float* bias, float* y, int64_t N, int64_t K,
              int64_t lo, int64_t hi) {
    for (int64_t n = lo; n < hi; ++n)
        for (int m = 0; m < MB; ++m) {
            float s = 0.f;
            const float* xr = x + m * K;
            const float* wr = w + n * K;
            for (int64_t k = 0; k < K; ++k) s += wr[k] * xr[k];
            y[m * N + n] = s + (bias ? bias[n] : 0.f);
        }
}

template <int MB, int BITS>
void quant_band(const int16_t* x, const float* xscale, const float* xisum, int64_t N, int64_t K, int64_t G, int64_t B,
                const uint8_t* codes, const float* scale, const float* szero, const float* bias, float* y, int64_t lo,
                int64_t hi) {
    const int64_t groups = K / G, row_bytes = BITS == 8 ? K : K / 2;
    for (int64_t n = lo; n < hi; ++n)
        for (int m = 0; m < MB; ++m) {
            const int16_t* xr = x + m * K;
            const uint8_t* c = codes + n * row_bytes;
            float total = 0.f;
            for (int64_t g = 0; g < groups; ++g) {
                int64_t s = 0;
                for (int64_t k = g * G; k < (g + 1) * G; ++k) {
                    int code;
                    if (BITS == 8) {
                        code = c[k];
                    } else {
                        int64_t block = k / 64, j = k % 64;
                        uint8_t byte = c[block * 32 + (j % 32)];
                        code = j < 32 ? (byte & 0x0F) : (byte >> 4);
                    }
                    s += (int64_t)code * xr[k];
                }
                total += scale[n * groups + g] * (float)s - szero[n * groups + g] * xisum[m * groups + g];
            }
            y[m * N + n] = xscale[m] * total + (bias ? bias[n] : 0.f);
        }
}

#endif

template <int BITS>
void quant_dispatch(const int16_t* x, const float* xscale, const float* xisum, int64_t M, int64_t N, int64_t K,
                    int64_t G, int64_t B, const uint8_t* codes, const float* scale, const float* szero,
                    const float* bias, float* y, int threads) {
#pragma omp parallel num_threads(threads)
    {
        int64_t lo, hi;
        band(N, omp_get_num_threads(), omp_get_thread_num(), &lo, &hi);
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int16_t* xm = x + m0 * K;
            const float* sm = xisum + m0 * (K / G);
            const float* xs = xscale + m0;
            float* ym = y + m0 * N;
            switch (min64(4, M - m0)) {
                case 1: quant_band<1, BITS>(xm, xs, sm, N, K, G, B, codes, scale, szero, bias, ym, lo, hi); break;
                case 2: quant_band<2, BITS>(xm, xs, sm, N, K, G, B, codes, scale, szero, bias, ym, lo, hi); break;
                case 3: quant_band<3, BITS>(xm, xs, sm, N, K, G, B, codes, scale, szero, bias, ym, lo, hi); break;
                default: quant_band<4, BITS>(xm, xs, sm, N, K, G, B, codes, scale, szero, bias, ym, lo, hi); break;
            }
        }
    }
}

}  // namespace

extern "C" {

// Register width of the vector code this build runs: 512 (AVX-512 + VNNI), 256 (AVX2 + FMA) or 0 (portable).
int qwen_kernels_simd(void) { return QWEN_SIMD; }

// y[M, N] = x[M, K] . w[N, K]^T + bias (bias may be NULL). x, w, y contiguous fp32.
void qwen_gemv_f32(const float* x, const float* w, const float* bias, float* y, int64_t M, int64_t N, int64_t K,
                   int threads) {
#pragma omp parallel num_threads(threads)
    {
        int64_t lo, hi;
        band(N, omp_get_num_threads(), omp_get_thread_num(), &lo, &hi);
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const float* xm = x + m0 * K;
            float* ym = y + m0 * N;
            switch (min64(4, M - m0)) {
                case 1: f32_band<1>(xm, w, bias, ym, N, K, lo, hi); break;
                case 2: f32_band<2>(xm, w, bias, ym, N, K, lo, hi); break;
                case 3: f32_band<3>(xm, w, bias, ym, N, K, lo, hi); break;
                default: f32_band<4>(xm, w, bias, ym, N, K, lo, hi); break;
            }
        }
    }
}

// Activations for the quantized kernels: per row m, xscale[m] = max|x| / 32767, xi = round(x / xscale)
// (ties to even, as torch.round), xisum[m, g] = sum of xi over group g. One pass instead of six tensor ops.
void qwen_quantize_activations(const float* x, int64_t M, int64_t K, int64_t G, int16_t* xi, float* xscale,
                               float* xisum) {
    const float tiny = 1.17549435e-38f;
    for (int64_t m = 0; m < M; ++m) {
        const float* xr = x + m * K;
        float amax = 0.f;
        for (int64_t k = 0; k < K; ++k) amax = fmaxf(amax, fabsf(xr[k]));
        float scale = amax / 32767.f;
        if (scale < tiny) scale = tiny;
        xscale[m] = scale;
        for (int64_t g = 0; g < K / G; ++g) {
            int32_t sum = 0;
            for (int64_t k = g * G; k < (g + 1) * G; ++k) {
                int32_t q = (int32_t)nearbyintf(xr[k] / scale);
                xi[m * K + k] = (int16_t)q;
                sum += q;
            }
            xisum[m * (K / G) + g] = (float)sum;
        }
    }
}

// Quantized: codes as described at the top; scale, szero fp32 [N, K/G]; x int16 [M, K] with xscale fp32 [M]
// (x_real = xscale * x); xisum fp32 [M, K/G] = sum of the int16 x over each group; B = block size.
void qwen_gemv_q8(const int16_t* x, const float* xscale, const float* xisum, const uint8_t* codes, const float* scale,
                  const float* szero, const float* bias, float* y, int64_t M, int64_t N, int64_t K, int64_t G,
                  int64_t B, int threads) {
    quant_dispatch<8>(x, xscale, xisum, M, N, K, G, B, codes, scale, szero, bias, y, threads);
}

void qwen_gemv_q4(const int16_t* x, const float* xscale, const float* xisum, const uint8_t* codes, const float* scale,
                  const float* szero, const float* bias, float* y, int64_t M, int64_t N, int64_t K, int64_t G,
                  int64_t B, int threads) {
    quant_dispatch<4>(x, xscale, xisum, M, N, K, G, B, codes, scale, szero, bias, y, threads);
}


// Rows [lo, hi) of the weight the codes stand for, w[n, k] = scale[n, g] * code - szero[n, g], written
// row-major [hi - lo, K] in fp32 (out_bf16 == 0) or bfloat16 (round to nearest even), for prefill: the
// GEMM libraries then multiply many activation rows by it (see QuantizedRows.matmul). lo % 4 == 0.
void qwen_dequantize_rows(const uint8_t* codes, const float* scale, const float* szero, int64_t N, int64_t K,
                          int64_t G, int64_t bits, int64_t lo, int64_t hi, void* out, int out_bf16, int threads) {
    const int64_t row_bytes = bits == 8 ? K : K / 2, per_chunk = bits == 8 ? 32 : 64, groups = K / G;
    const int64_t n4 = N / 4 * 4, chunks = K / per_chunk;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = lo; n < hi; ++n) {
        // Tile t = rows 4t..4t+3 with their 32-byte chunks interleaved; the last N % 4 rows are plain.
        const uint8_t* row = n < n4 ? codes + (n / 4) * 4 * row_bytes + (n % 4) * 32 : codes + n * row_bytes;
        const int64_t stride = n < n4 ? 4 * 32 : 32;
        const float* sc = scale + n * groups;
        const float* sz = szero + n * groups;
        float w[64];
        for (int64_t c = 0; c < chunks; ++c) {
            const uint8_t* b = row + c * stride;
            const int64_t k0 = c * per_chunk, g = k0 / G;
            const float s = sc[g], z = sz[g];
            if (bits == 8) {
#pragma omp simd
                for (int j = 0; j < 32; ++j) w[j] = s * (float)b[j] - z;
            } else {
#pragma omp simd
                for (int j = 0; j < 32; ++j) {
                    w[j] = s * (float)(b[j] & 0x0F) - z;
                    w[j + 32] = s * (float)(b[j] >> 4) - z;
                }
            }
            const int64_t dst = (n - lo) * K + k0;
            if (out_bf16) {
                uint16_t* o = (uint16_t*)out + dst;
#pragma omp simd
                for (int j = 0; j < per_chunk; ++j) {
                    uint32_t u;
                    memcpy(&u, &w[j], 4);
                    o[j] = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
                }
            } else {
                memcpy((float*)out + dst, w, per_chunk * sizeof(float));
            }
        }
    }
}

}  // extern "C"

// ------------------------------------------------------------------------ fused decode (batch 1)
// One decode step through every transformer block in a single call, for a model whose five block
// linears all run on the kernels above (quantized, or fp32 row-major weights). Per block, exactly the math of qwen/model.py:
//   h = x + c_proj(attention(rope(c_attn(rmsnorm(x, ln_1)))));  x = h + mlp(rmsnorm(h, ln_2))
// with mlp(u) = c_proj(w1(u) * silu(w2(u))), RoPE rotate-half in fp32 on the first rot_dim features,
// the LogN factor on the queries, K/V written to slot `slot` of the layer's [heads, cap, head_dim]
// cache, softmax attention over slots 0..slot with scale 1/sqrt(head_dim). A layer with window
// attention (windows[l] > 0) keeps a ring of caps[l] entries (slot j at index j % caps[l]) and attends
// to slots slot-windows[l]+1..slot only; for a full-attention layer caps[l] > slot, so j % caps[l] == j.
// The activations of each linear are rounded to int16 as QuantizedRows does (w1 and w2 share one rounding of the same input:
// the separate calls would produce identical values). Why: at batch 1 the PyTorch path spends ~0.6 ms
// per block between the matrix-vector products (Python, dispatch, allocation, small-op kernels that
// find caches full of weight streams), ~20% of a Qwen-1.8B int8 step.

struct QwenQLinear {
    const uint8_t* codes;  // bits == 32: the fp32 weight [N, K] (a plain nn.Linear), run by qwen_gemv_f32
    const float* scale;
    const float* szero;
    const float* bias;   // may be NULL
    const int64_t* perm; // may be NULL: input feature order of the codes (act-order checkpoints)
    int64_t N, K, G, B, bits;
};

struct QwenDecodeLayer {
    const float* ln_1;
    const float* ln_2;
    QwenQLinear c_attn, attn_proj, w1, w2, mlp_proj;
};

namespace {

struct DecodeScratch {
    std::vector<float> normed, gathered, qkv, attn, proj, up, gate;
    std::vector<int16_t> xi;
    std::vector<float> xisum;
    float xscale = 0.f;
    const float* fx = nullptr;  // the float input, for fp32 layers
};

void rmsnorm(const float* x, const float* w, float eps, int64_t n, float* out) {
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
    const float r = 1.f / sqrtf(ss / (float)n + eps);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = (x[i] * r) * w[i];
}

// Round x (in the layer's input order) to int16 for `lin`.
void quantize_input(const QwenQLinear& lin, const float* x, DecodeScratch& s) {
    const float* src = x;
    if (lin.perm) {
        s.gathered.resize(lin.K);
        for (int64_t k = 0; k < lin.K; ++k) s.gathered[k] = x[lin.perm[k]];
        src = s.gathered.data();
    }
    if (lin.bits == 32) {
        s.fx = src;
        return;
    }
    s.xi.resize(lin.K);
    s.xisum.resize(lin.K / lin.G);
    qwen_quantize_activations(src, 1, lin.K, lin.G, s.xi.data(), &s.xscale, s.xisum.data());
}

// y = lin(x) for the activations last rounded by quantize_input.
void run_linear(const QwenQLinear& lin, const DecodeScratch& s, float* y, int threads) {
    if (lin.bits == 32)
        qwen_gemv_f32(s.fx, (const float*)lin.codes, lin.bias, y, 1, lin.N, lin.K, threads);
    else if (lin.bits == 8)
        quant_dispatch<8>(s.xi.data(), &s.xscale, s.xisum.data(), 1, lin.N, lin.K, lin.G, lin.B, lin.codes, lin.scale,
                          lin.szero, lin.bias, y, threads);
    else
        quant_dispatch<4>(s.xi.data(), &s.xscale, s.xisum.data(), 1, lin.N, lin.K, lin.G, lin.B, lin.codes, lin.scale,
                          lin.szero, lin.bias, y, threads);
}

// Rotate-half RoPE on the first rot_dim features of one head vector, in place (model.apply_rope).
inline void rope_head(float* v, const float* cos, const float* sin, int64_t rot_dim) {
    const int64_t half = rot_dim / 2;
    for (int64_t i = 0; i < half; ++i) {
        const float a = v[i], b = v[i + half];
        v[i] = a * cos[i] + (-b) * sin[i];
        v[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

}  // namespace

extern "C" {

// x [hidden] (in/out): the embedding of the new token in, the last block's output out.
// cos/sin [rot_dim]: RoPE for the token's position (NTK alpha applied by the caller); logn: the
// query factor (1 when LogN is off or not yet active). keys[l], values[l]: layer l's cache, each
// [heads, caps[l], head_dim] fp32; the new K/V go to slot `slot` (index slot % caps[l]); windows[l]:
// layer l's attention window in tokens, 0 for full attention.
void qwen_decode_layers(const QwenDecodeLayer* layers, float* const* keys, float* const* values, int64_t n_layers,
                        float* x, int64_t hidden, int64_t heads,
                        int64_t head_dim, int64_t rot_dim, const int64_t* caps, const int64_t* windows, int64_t slot,
                        const float* cos, const float* sin, float logn, float eps, int threads) {
    DecodeScratch s;
    const int64_t proj = heads * head_dim;
    int64_t ff = 0;
    for (int64_t l = 0; l < n_layers; ++l) ff = layers[l].w1.N > ff ? layers[l].w1.N : ff;
    s.normed.resize(hidden > ff ? hidden : ff);
    s.qkv.resize(3 * proj);
    s.attn.resize(proj);
    s.proj.resize(hidden);
    s.up.resize(ff);
    s.gate.resize(ff);
    const float scale = 1.f / sqrtf((float)head_dim);
    const int64_t span = slot + 1;
    std::vector<float> scores((size_t)(heads * span));

    for (int64_t l = 0; l < n_layers; ++l) {
        const QwenDecodeLayer& L = layers[l];
        const int64_t cap = caps[l];
        const int64_t first = windows[l] > 0 && slot + 1 > windows[l] ? slot + 1 - windows[l] : 0;
        const int64_t seen = span - first;  // keys this layer's query sees
        // They lie in the ring as at most two runs: indices i0.. (n1 of them), then 0.. (no division per key).
        const int64_t i0 = first % cap;
        const int64_t n1 = seen < cap - i0 ? seen : cap - i0;
        // ---- attention
        rmsnorm(x, L.ln_1, eps, hidden, s.normed.data());
        quantize_input(L.c_attn, s.normed.data(), s);
        run_linear(L.c_attn, s, s.qkv.data(), threads);
        float* q = s.qkv.data();
        float* k = q + proj;
        float* v = k + proj;
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t h = 0; h < heads; ++h) {
            float* qh = q + h * head_dim;
            float* kh = k + h * head_dim;
            rope_head(qh, cos, sin, rot_dim);
            rope_head(kh, cos, sin, rot_dim);
            if (logn != 1.f)
                for (int64_t i = 0; i < head_dim; ++i) qh[i] *= logn;
            float* kc = keys[l] + (h * cap) * head_dim;
            float* vc = values[l] + (h * cap) * head_dim;
            memcpy(kc + (slot % cap) * head_dim, kh, head_dim * sizeof(float));
            memcpy(vc + (slot % cap) * head_dim, v + h * head_dim, head_dim * sizeof(float));
            float* sc = scores.data() + h * span;
            float mx = -INFINITY;
            for (int64_t j = 0; j < seen; ++j) {
                const float* kj = kc + (j < n1 ? i0 + j : j - n1) * head_dim;
                float d = 0.f;
#pragma omp simd reduction(+ : d)
                for (int64_t i = 0; i < head_dim; ++i) d += qh[i] * kj[i];
                sc[j] = d * scale;
                mx = sc[j] > mx ? sc[j] : mx;
            }
            float total = 0.f;
            for (int64_t j = 0; j < seen; ++j) {
                sc[j] = expf(sc[j] - mx);
                total += sc[j];
            }
            float* out = s.attn.data() + h * head_dim;
            for (int64_t i = 0; i < head_dim; ++i) out[i] = 0.f;
            for (int64_t j = 0; j < seen; ++j) {
                const float p = sc[j] / total;
                const float* vj = vc + (j < n1 ? i0 + j : j - n1) * head_dim;
#pragma omp simd
                for (int64_t i = 0; i < head_dim; ++i) out[i] += p * vj[i];
            }
        }
        quantize_input(L.attn_proj, s.attn.data(), s);
        run_linear(L.attn_proj, s, s.proj.data(), threads);
        for (int64_t i = 0; i < hidden; ++i) x[i] += s.proj[i];
        // ---- MLP
        rmsnorm(x, L.ln_2, eps, hidden, s.normed.data());
        quantize_input(L.w1, s.normed.data(), s);
        run_linear(L.w1, s, s.up.data(), threads);
        if (L.w2.perm != L.w1.perm || L.w2.G != L.w1.G || L.w2.bits != L.w1.bits)
            quantize_input(L.w2, s.normed.data(), s);
        run_linear(L.w2, s, s.gate.data(), threads);
        const int64_t f = L.w1.N;
        for (int64_t i = 0; i < f; ++i) {
            const float g = s.gate[i];
            s.normed[i] = s.up[i] * (g / (1.f + expf(-g)));
        }
        quantize_input(L.mlp_proj, s.normed.data(), s);
        run_linear(L.mlp_proj, s, s.proj.data(), threads);
        for (int64_t i = 0; i < hidden; ++i) x[i] += s.proj[i];
    }
}

}  // extern "C"
