// SIMD basics shared by the CPU kernels (wkv4_cpu.cpp, mix_cpu.cpp): fp32 vectors of kWidth lanes through GCC vector
// extensions (AVX2 ymm registers, or whatever -march gives; SSE pairs on a generic x86-64), an inlined exp, and loads
// and stores that convert the storage dtypes (fp32, bf16, fp16) in registers.
#pragma once

#include <cstdint>
#include <cstring>

#ifdef __AVX2__
#include <immintrin.h>
#endif

// Half-precision storage in registers: _Float16 where C++ has it (GCC >= 12 and clang >= 15 on x86), __fp16 on ARM
// (where GCC 12's C++ still lacks _Float16), and otherwise lane-by-lane conversions through c10's own IEEE routines:
// GCC 11, the default compiler of Ubuntu 22.04 and RHEL 9, has neither type on x86.
#if defined(__ARM_FP16_FORMAT_IEEE)
#define WKV4_HALF __fp16
#elif (defined(__clang__) && __clang_major__ >= 15) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 12)
#define WKV4_HALF _Float16
#elif defined(WKV4_NO_TORCH)
#error "fp16 storage needs _Float16 (GCC >= 12, clang >= 15), __fp16 (ARM) or c10's conversions (a torch build)"
#else
#include <c10/util/Half.h>
#endif

namespace wkv4cpu {

constexpr int kWidth = 8;  // floats per vector (32 bytes: one AVX2 register)
typedef float vf __attribute__((vector_size(4 * kWidth)));
typedef int32_t vi __attribute__((vector_size(4 * kWidth)));
typedef uint32_t vu __attribute__((vector_size(4 * kWidth)));
typedef uint16_t vu16 __attribute__((vector_size(2 * kWidth)));
#ifdef WKV4_HALF
typedef WKV4_HALF vh __attribute__((vector_size(2 * kWidth)));
#endif

#define WKV_INLINE inline __attribute__((always_inline))

WKV_INLINE vf splat(float x) { return vf{} + x; }

// e^x on every lane: Cephes' expf (e^x = 2^n e^r, n = round(x / ln 2), r = x - n ln 2 with ln 2 in two parts, e^r by
// a degree-7 polynomial; ~1 ulp). e^0 is exactly 1 (wkv4_core.h's exp_of_pair relies on it). Below ln(FLT_MIN) the
// result is 0 (no subnormals), above 88.376 it is inf, and NaN stays NaN (comparisons with NaN are false).
WKV_INLINE vf exp_lanes(vf x) {
    const vi overflow = x > 88.3762626647949f;
    const vi underflow = x < -87.3365447504019f;
    x = underflow ? -87.3365447504019f : x;
    x = overflow ? 0.f : x;
    const vf n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest (1.5 * 2^23 trick)
    vf r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    vf p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.f;
    const vi scale = (__builtin_convertvector(n, vi) + 127) << 23;  // 2^n as float bits, n in [-126, 127]
    vf out = p * (vf)scale;
    out = underflow ? 0.f : out;
    return overflow ? __builtin_inff() : out;
}

// Storage dtypes, layout-compatible with float, c10::BFloat16 and c10::Half.
struct Bf16 {
    uint16_t bits;
};
struct Fp16 {
#ifdef WKV4_HALF
    WKV4_HALF value;
#else
    uint16_t bits;
#endif
};

template <class F>
struct Io;
template <>
struct Io<float> {
    static WKV_INLINE vf load(const float* p) {
        vf x;
        std::memcpy(&x, p, sizeof x);
        return x;
    }
    static WKV_INLINE void store(float* p, vf x) { std::memcpy(p, &x, sizeof x); }
};
template <>
struct Io<Bf16> {
    static WKV_INLINE vf load(const Bf16* p) {
#ifdef __AVX2__  // GCC widens the generic form in two halves (4 shuffles per 8 lanes, ~2x slower on Intel cores)
        const __m256i bits = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16);
        vf x;
        std::memcpy(&x, &bits, sizeof x);
        return x;
#else
        vu16 h;
        std::memcpy(&h, p, sizeof h);
        const vu bits = __builtin_convertvector(h, vu) << 16;
        return (vf)bits;
#endif
    }
    // Round to nearest even, NaN -> 0x7FC0: c10::BFloat16's conversion, lane by lane.
    static WKV_INLINE void store(Bf16* p, vf x) {
        const vu bits = (vu)x;
        vu r = (bits + (0x7FFFu + ((bits >> 16) & 1u))) >> 16;
        r = x != x ? 0x7FC0u : r;
        const vu16 h = __builtin_convertvector(r, vu16);
        std::memcpy(p, &h, sizeof h);
    }
};
template <>
struct Io<Fp16> {  // IEEE conversions (round to nearest even), like c10::Half; F16C instructions where available
#ifdef WKV4_HALF
    static WKV_INLINE vf load(const Fp16* p) {
        vh h;
        std::memcpy(&h, p, sizeof h);
        return __builtin_convertvector(h, vf);
    }
    static WKV_INLINE void store(Fp16* p, vf x) {
        const vh h = __builtin_convertvector(x, vh);
        std::memcpy(p, &h, sizeof h);
    }
#else
    static WKV_INLINE vf load(const Fp16* p) {
        vf x;
        for (int i = 0; i < kWidth; ++i) x[i] = c10::detail::fp16_ieee_to_fp32_value(p[i].bits);
        return x;
    }
    static WKV_INLINE void store(Fp16* p, vf x) {
        for (int i = 0; i < kWidth; ++i) p[i].bits = c10::detail::fp16_ieee_from_fp32_value(x[i]);
    }
#endif
};

// n < kWidth lanes (the last channels of a row): through a zero-filled buffer; the other lanes compute on zeros and
// are never stored.
template <bool Full, class F>
WKV_INLINE vf load(const F* p, int n) {
    if (Full || n == kWidth) return Io<F>::load(p);
    F buf[kWidth] = {};
    for (int i = 0; i < n && i < kWidth; ++i) buf[i] = p[i];
    return Io<F>::load(buf);
}
template <bool Full, class F>
WKV_INLINE void store(F* p, vf x, int n) {
    if (Full || n == kWidth) return Io<F>::store(p, x);
    F buf[kWidth];
    Io<F>::store(buf, x);
    for (int i = 0; i < n && i < kWidth; ++i) p[i] = buf[i];
}

}  // namespace wkv4cpu

#ifndef WKV4_NO_TORCH
#include "cpu_torch.h"

namespace wkv4cpu {
static_assert(sizeof(Bf16) == sizeof(at::BFloat16) && sizeof(Fp16) == sizeof(at::Half));

// Calls fn(F{}) with F the kernels' storage type for a tensor's dtype.
template <class Fn>
void dispatch(const char* op, at::ScalarType dtype, Fn fn) {
    switch (dtype) {
        case at::kFloat: return fn(float{});
        case at::kBFloat16: return fn(Bf16{});
        case at::kHalf: return fn(Fp16{});
        default: TORCH_CHECK(false, op, ": tensors must be float32, bfloat16 or float16, got ", dtype);
    }
}

template <class F>
F* ptr(const at::Tensor& t) {
    return reinterpret_cast<F*>(t.data_ptr());
}
}  // namespace wkv4cpu
#endif
