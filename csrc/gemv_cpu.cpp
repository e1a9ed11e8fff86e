// Matrix-vector products for recurrent decoding on CPU, with the weights stored narrower than the math:
//   y[g, b, o] = scale[g, o] * sum_i x[g, b, i] W[g, o, i]       (scale = 1 when none is given)
// W [G, out, in] in fp32, bf16 or int8 (int8 with a per-output-row scale), x [G, B, in] fp32, y [G, B, out] fp32; every
// product and sum is fp32. A batch-1 decode step is bound by the rate the weights stream from memory: torch's CPU
// products streamed fp32 weights at ~25 GB/s on the decode shapes and did not read bf16 / int8 ones any faster
// (bench/results/decode.txt); here each W row is read once, contiguously, widened in registers and used by every
// batch row while it sits in L1 (~40 GB/s measured, at 1/2 or 1/4 of the bytes for bf16 / int8).
// G groups share one call (TimeMix's key / value / receptance, each with its own input), so one OpenMP split covers
// all G * out rows. Each y element is one thread's dot product in a fixed order: results repeat bitwise.
#include <algorithm>

#ifdef _OPENMP
#include <omp.h>
#endif

#ifdef __AVX2__
#include <immintrin.h>
#endif

#include "cpu_simd.h"

namespace gemvcpu {

using wkv4cpu::Bf16;
using wkv4cpu::Io;
using wkv4cpu::kWidth;
using wkv4cpu::vf;

typedef int8_t vi8 __attribute__((vector_size(kWidth)));

template <class W>
struct Widen {  // kWidth weights -> fp32 lanes (Io's conversions); one weight -> float
    static WKV_INLINE vf lanes(const W* p) { return Io<W>::load(p); }
    static WKV_INLINE float one(W w) { return w; }
};
template <>
WKV_INLINE float Widen<Bf16>::one(Bf16 w) {
    const uint32_t bits = uint32_t(w.bits) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}
template <>
struct Widen<int8_t> {
    static WKV_INLINE vf lanes(const int8_t* p) {
#ifdef __AVX2__  // GCC turns the generic conversion below into 8 scalar ones (~7x slower than the weights stream)
        static_assert(kWidth == 8);
        vf out;
        const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
        const __m256 wide = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
        std::memcpy(&out, &wide, sizeof out);
        return out;
#else
        vi8 q;
        std::memcpy(&q, p, sizeof q);
        return __builtin_convertvector(q, vf);
#endif
    }
    static WKV_INLINE float one(int8_t w) { return w; }
};

WKV_INLINE float sum_lanes(vf v) {
    float s = 0.f;
    for (int l = 0; l < kWidth; ++l) s += v[l];
    return s;
}

// How far ahead of each row stream to prefetch: 4 KiB measured best of 1-4 KiB (bench note in decode.txt).
constexpr int kPrefetchBytes = 4096;

// NB batch rows against one weight row: NB * U independent accumulators (U unrolls along `in` so that even one batch
// row keeps several FMAs in flight), the row prefetched ahead (a 38 MB head at batch 4 from DRAM: int8 6.7 -> 3.4 ms,
// bf16 7.4 -> 5.1, fp32 8.9 -> 8.2). Batch 1 takes this path too: a variant reading two weight rows per pass (each x
// vector feeding two FMAs) decoded the 169M shape at 41 tok/s in fp32 on a Zen 4 EPYC against 59.5 for this one
// (bf16 71 vs 104, int8 116 vs 194; bench/results/decode.txt).
template <class W, int NB>
WKV_INLINE void dot_rows(const float* x, int64_t in, const W* row, float scale, float* y, int64_t out) {
    constexpr int U = NB >= 4 ? 1 : 4 / NB;
    vf acc[NB][U] = {};
    int64_t i = 0;
    for (; i + U * kWidth <= in; i += U * kWidth) {
        __builtin_prefetch(reinterpret_cast<const char*>(row + i) + kPrefetchBytes);
        for (int u = 0; u < U; ++u) {
            const vf w = Widen<W>::lanes(row + i + u * kWidth);
            for (int b = 0; b < NB; ++b) acc[b][u] += w * Io<float>::load(x + b * in + i + u * kWidth);
        }
    }
    for (; i + kWidth <= in; i += kWidth) {
        const vf w = Widen<W>::lanes(row + i);
        for (int b = 0; b < NB; ++b) acc[b][0] += w * Io<float>::load(x + b * in + i);
    }
    for (int b = 0; b < NB; ++b) {
        vf total = acc[b][0];
        for (int u = 1; u < U; ++u) total += acc[b][u];
        float s = sum_lanes(total);
        for (int64_t j = i; j < in; ++j) s += Widen<W>::one(row[j]) * x[b * in + j];
        y[b * out] = s * scale;
    }
}

template <class W>
void gemv(const float* x, const W* w, const float* scale, float* y, int64_t G, int64_t B, int64_t in, int64_t out) {
    const int64_t rows = G * out;
    const bool parallel = rows * in >= (1 << 15);  // a small product runs on one thread, not worth waking the others
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t g = r / out, o = r % out;
        const W* row = w + r * in;
        const float s = scale ? scale[r] : 1.f;
        const float* xg = x + g * B * in;
        float* yg = y + g * B * out + o;
        int64_t b = 0;
        for (; b + 8 <= B; b += 8) dot_rows<W, 8>(xg + b * in, in, row, s, yg + b * out, out);
        if (b + 4 <= B) dot_rows<W, 4>(xg + b * in, in, row, s, yg + b * out, out), b += 4;
        if (b + 2 <= B) dot_rows<W, 2>(xg + b * in, in, row, s, yg + b * out, out), b += 2;
        if (b < B) dot_rows<W, 1>(xg + b * in, in, row, s, yg + b * out, out);
    }
}

}  // namespace gemvcpu

#include "cpu_ops.h"

namespace cpuops {

Tensor gemv(Tensor x, Tensor w, std::optional<Tensor> scale) {
    TORCH_CHECK(x.dim() == 3 && w.dim() == 3 && x.size(0) == w.size(0) && x.size(2) == w.size(2),
                "gemv: x [G, B, in] and w [G, out, in], got ", x.sizes(), " and ", w.sizes());
    TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && x.scalar_type() == at::kFloat,
                "gemv: x must be contiguous float32 and w contiguous");
    const int64_t G = w.size(0), out = w.size(1), in = w.size(2), B = x.size(1);
    const float* s = nullptr;
    if (scale) {
        TORCH_CHECK(scale->is_contiguous() && scale->scalar_type() == at::kFloat && scale->numel() == G * out,
                    "gemv: scale must be contiguous float32 [G, out]");
        s = scale->data_ptr<float>();
    }
    auto y = at::empty({G, B, out}, x.options());
    const float* xp = x.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    switch (w.scalar_type()) {
        case at::kFloat: gemvcpu::gemv(xp, w.data_ptr<float>(), s, yp, G, B, in, out); break;
        case at::kBFloat16:
            gemvcpu::gemv(xp, reinterpret_cast<const wkv4cpu::Bf16*>(w.data_ptr()), s, yp, G, B, in, out);
            break;
        case at::kChar: gemvcpu::gemv(xp, w.data_ptr<int8_t>(), s, yp, G, B, in, out); break;
        default: TORCH_CHECK(false, "gemv: weights must be float32, bfloat16 or int8, got ", w.scalar_type());
    }
    return y;
}

}  // namespace cpuops
