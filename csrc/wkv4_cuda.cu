// CUDA WKV kernels: one thread per (batch row b, channel c) lane, sequential in T, fp32 math for any input dtype.
// The math lives in wkv4_core.h and the layouts in wkv4_layout.h, shared with the CPU driver (wkv4_cpu.cpp); this file
// only walks tensors. No torch headers here (CPU builds of torch ship no usable CUDA headers, and this keeps `nvcc -c`
// fast): wkv4_cuda_binding.cpp calls the extern "C" launchers at the bottom with raw pointers and a cudaStream_t.
//
// Lanes are numbered lane = b * C + c, so consecutive threads of a warp read consecutive channels of the same row:
// every time step is one contiguous (coalesced) read of k, v, gy and write of y, gk, gv.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "wkv4_core.h"
#include "wkv4_layout.h"

namespace {

using wkv4::State;
constexpr int kChunk = wkv4::kCheckpointEvery;

// Storage dtype <-> fp32. Rounding to nearest, like the CPU driver's static_cast to c10::BFloat16 / c10::Half.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename F>
__device__ __forceinline__ F from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// ckpt == nullptr: inference, no checkpoints. Otherwise the state before steps 0, L, 2L, ... goes to ckpt[:, b, t/L, c].
template <typename F>
__global__ void forward_kernel(const float* __restrict__ w, const float* __restrict__ u, const F* __restrict__ k,
                               const F* __restrict__ v, const float* __restrict__ s0, F* __restrict__ y,
                               float* __restrict__ s_out, float* __restrict__ ckpt, int64_t B, int64_t T, int64_t C) {
    const int64_t lane = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (lane >= B * C) return;  // the last block overhangs when B*C is not a multiple of the block size
    const int64_t b = lane / C, c = lane % C;
    const float wc = w[c], uc = u[c];
    const int64_t n_ckpt = wkv4::num_checkpoints(T);
    const int64_t ckpt_plane = B * n_ckpt * C;
    const int64_t base = b * T * C + c;  // data[(b*T + t)*C + c] = data[base + t*C]
    State s = wkv4::load_state(s0, B * C, lane);
    // Chunks of L steps, as in the backward: the checkpoint test stays out of the inner loop, which the compiler
    // unrolls so that the loads of several steps are in flight while the dependent math of one step runs.
    for (int64_t chunk = 0; chunk < n_ckpt; ++chunk) {
        const int64_t t0 = chunk * kChunk;
        const int n = static_cast<int>(T - t0 < kChunk ? T - t0 : kChunk);  // steps in this chunk, 1..L
        if (ckpt != nullptr) wkv4::store_state(ckpt, ckpt_plane, (b * n_ckpt + chunk) * C + c, s);
        for (int i = 0; i < n; ++i) {
            const int64_t at = base + (t0 + i) * C;
            y[at] = from_float<F>(wkv4::forward_step(s, wc, uc, to_float(k[at]), to_float(v[at])));
        }
    }
    wkv4::store_state(s_out, B * C, lane, s);
}

// Reverse over chunks of L = kCheckpointEvery steps (the last one is shorter when T % L != 0). Each chunk recomputes
// the states before its steps from its checkpoint into `before`, then runs backward_step from its last step to its
// first. `before` (L states, 384 bytes) sits in thread-local memory, which the L1 cache serves: fully unrolling the
// loops to keep it in registers needs more than 255 registers and spills anyway. gw, gu are per lane [B, C]: the
// caller sums over B.
template <typename F>
__global__ void backward_kernel(const float* __restrict__ w, const float* __restrict__ u, const F* __restrict__ k,
                                const F* __restrict__ v, const F* __restrict__ gy, const float* __restrict__ ckpt,
                                const float* __restrict__ s_last, const float* __restrict__ g_last, F* __restrict__ gk,
                                F* __restrict__ gv, float* __restrict__ gw, float* __restrict__ gu,
                                float* __restrict__ g_s0, int64_t B, int64_t T, int64_t C) {
    const int64_t lane = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (lane >= B * C) return;
    const int64_t b = lane / C, c = lane % C;
    const float wc = w[c], uc = u[c];
    const int64_t n_ckpt = wkv4::num_checkpoints(T);
    const int64_t ckpt_plane = B * n_ckpt * C;
    const int64_t base = b * T * C + c;

    const State gl = wkv4::load_state(g_last, B * C, lane);
    wkv4::Grad g = wkv4::grad_of_final_state(wkv4::load_state(s_last, B * C, lane), gl.a, gl.b, gl.p);
    wkv4::ParamGrad pg{0.f, 0.f};
    State before[kChunk];

    for (int64_t chunk = n_ckpt - 1; chunk >= 0; --chunk) {
        const int64_t t0 = chunk * kChunk;
        const int n = static_cast<int>(T - t0 < kChunk ? T - t0 : kChunk);  // steps in this chunk, 1..L
        State s = wkv4::load_state(ckpt, ckpt_plane, (b * n_ckpt + chunk) * C + c);
        for (int i = 0; i < n; ++i) {
            const int64_t at = base + (t0 + i) * C;
            before[i] = s;
            wkv4::advance(s, wc, to_float(k[at]), to_float(v[at]));
        }
        for (int i = n - 1; i >= 0; --i) {
            const int64_t at = base + (t0 + i) * C;
            float dk, dv;
            wkv4::backward_step(before[i], wc, uc, to_float(k[at]), to_float(v[at]), to_float(gy[at]), g, pg, dk, dv);
            gk[at] = from_float<F>(dk);
            gv[at] = from_float<F>(dv);
        }
    }
    // checkpoint 0 is the incoming state s0 (T >= 1 is guaranteed by the caller)
    const State first = wkv4::load_state(ckpt, ckpt_plane, b * n_ckpt * C + c);
    wkv4::store_state(g_s0, B * C, lane, wkv4::grad_of_initial_state(first, g));
    gw[lane] = pg.gw;
    gu[lane] = pg.gu;
}

// The kernels are latency bound (a dependent chain over T per lane), so spreading the lanes over every SM matters more
// than large blocks: shrink the block (down to one warp) until there are at least two blocks per SM.
struct Launch {
    dim3 grid, block;
};

cudaError_t plan(int64_t lanes, Launch& out) {
    int device = 0, sms = 1;
    cudaError_t err = cudaGetDevice(&device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (err != cudaSuccess) return err;
    int64_t threads = 128;
    while (threads > 32 && (lanes + threads - 1) / threads < 2 * sms) threads /= 2;
    out.block = dim3(static_cast<unsigned>(threads));
    out.grid = dim3(static_cast<unsigned>((lanes + threads - 1) / threads));
    return cudaSuccess;
}

// nullptr on success, else a message; launch-configuration errors are caught here, faults inside the kernel surface
// at the next synchronizing CUDA call, as for any asynchronous launch.
const char* status(cudaError_t err) { return err == cudaSuccess ? nullptr : cudaGetErrorString(err); }

template <typename F>
const char* launch_forward(const float* w, const float* u, const void* k, const void* v, const float* s0, void* y,
                           float* s_out, float* ckpt, int64_t B, int64_t T, int64_t C, void* stream) {
    Launch l;
    if (cudaError_t err = plan(B * C, l); err != cudaSuccess) return status(err);
    forward_kernel<F><<<l.grid, l.block, 0, static_cast<cudaStream_t>(stream)>>>(
        w, u, static_cast<const F*>(k), static_cast<const F*>(v), s0, static_cast<F*>(y), s_out, ckpt, B, T, C);
    return status(cudaGetLastError());
}

template <typename F>
const char* launch_backward(const float* w, const float* u, const void* k, const void* v, const void* gy,
                            const float* ckpt, const float* s_last, const float* g_last, void* gk, void* gv, float* gw,
                            float* gu, float* g_s0, int64_t B, int64_t T, int64_t C, void* stream) {
    Launch l;
    if (cudaError_t err = plan(B * C, l); err != cudaSuccess) return status(err);
    backward_kernel<F><<<l.grid, l.block, 0, static_cast<cudaStream_t>(stream)>>>(
        w, u, static_cast<const F*>(k), static_cast<const F*>(v), static_cast<const F*>(gy), ckpt, s_last, g_last,
        static_cast<F*>(gk), static_cast<F*>(gv), gw, gu, g_s0, B, T, C);
    return status(cudaGetLastError());
}

}  // namespace

// C entry points, one per storage dtype of k/v/y/gy/gk/gv (w, u, states and checkpoints are always float32).
// Layouts: see wkv4_layout.h. ckpt may be nullptr in the forward (no backward will follow). `stream` is a cudaStream_t
// of the current device. Return nullptr on success, else a CUDA error message. Declared again in wkv4_cuda_binding.cpp.
#define WKV4_DEFINE_LAUNCHERS(SUFFIX, F)                                                                             \
    extern "C" const char* wkv4_cuda_forward_##SUFFIX(const float* w, const float* u, const void* k, const void* v,  \
                                                      const float* s0, void* y, float* s_out, float* ckpt, int64_t B, \
                                                      int64_t T, int64_t C, void* stream) {                          \
        return launch_forward<F>(w, u, k, v, s0, y, s_out, ckpt, B, T, C, stream);                                   \
    }                                                                                                                \
    extern "C" const char* wkv4_cuda_backward_##SUFFIX(                                                              \
        const float* w, const float* u, const void* k, const void* v, const void* gy, const float* ckpt,              \
        const float* s_last, const float* g_last, void* gk, void* gv, float* gw, float* gu, float* g_s0, int64_t B,   \
        int64_t T, int64_t C, void* stream) {                                                                        \
        return launch_backward<F>(w, u, k, v, gy, ckpt, s_last, g_last, gk, gv, gw, gu, g_s0, B, T, C, stream);      \
    }

WKV4_DEFINE_LAUNCHERS(f32, float)
WKV4_DEFINE_LAUNCHERS(bf16, __nv_bfloat16)
WKV4_DEFINE_LAUNCHERS(f16, __half)
