// CPU WKV kernel: OpenMP over (batch row, tile of channels), sequential in T. Each tile is NV SIMD vectors of kWidth
// channels (GCC vector extensions: AVX2 ymm registers, or whatever -march gives; plain SSE pairs on a generic x86-64),
// and the math of wkv4_core.h (shared with the CUDA kernel) runs on whole vectors, forward and backward alike: every
// time step reads contiguous memory, the NV vectors of a tile give the out-of-order core independent dependency chains,
// and the exponentials are an inlined polynomial (exp_lanes) instead of calls into libm.
//
// Inputs k, v, gy and outputs y, gk, gv are read and written in their storage dtype (fp32, bf16, fp16) and converted
// in registers; all math is fp32.
//
// Built without -ffast-math (see rwkv_dist/ops/_build.py): NaN and inf inputs must come out as NaN/inf (wkv4_core.h's
// exp_of_pair relies on IEEE m - m), and nothing here needs the compiler to reassociate.
// With -DWKV4_NO_TORCH the file compiles without torch (the kernels only), for standalone timing of the loops.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef WKV4_NO_TORCH
#include <torch/csrc/utils/pybind.h>

#include "cpu_ops.h"
#endif

#include "cpu_simd.h"
#include "wkv4_core.h"
#include "wkv4_layout.h"

namespace wkv4cpu {

using VState = wkv4::StateT<vf>;

// Software prefetch of one row segment (n_lanes channels starting at p) into the cache. Consecutive time steps are
// C channels apart, several KB for real models: beyond what the hardware prefetchers follow within a page, so the
// kernels ask for the rows they will need a few steps ahead.
template <class F>
WKV_INLINE void prefetch(const F* p, int n_lanes) {
    const char* c = reinterpret_cast<const char*>(p);
    for (int64_t off = 0; off < static_cast<int64_t>(n_lanes * sizeof(F)); off += 64) __builtin_prefetch(c + off);
}

template <bool Full>
WKV_INLINE VState load_state(const float* planes, int64_t plane, int64_t at, int n) {
    return VState{load<Full>(planes + at, n), load<Full>(planes + plane + at, n), load<Full>(planes + 2 * plane + at, n)};
}
template <bool Full>
WKV_INLINE void store_state(float* planes, int64_t plane, int64_t at, const VState& s, int n) {
    store<Full>(planes + at, s.a, n);
    store<Full>(planes + plane + at, s.b, n);
    store<Full>(planes + 2 * plane + at, s.p, n);
}

}  // namespace wkv4cpu

namespace wkv4 {
template <>
struct Math<wkv4cpu::vf> {
    static WKV_INLINE wkv4cpu::vf exp(wkv4cpu::vf x) { return wkv4cpu::exp_lanes(x); }
};
}  // namespace wkv4

namespace wkv4cpu {

// Work layout. A tile is kVectors vectors (64 channels, 256 bytes of fp32 per row): enough independent dependency
// chains per step for the out-of-order core, and whole cache lines. A job is one batch row's group of consecutive
// tiles (the whole row unless there are too few rows to keep every thread busy), walked chunk by chunk of
// L = kCheckpointEvery steps and, inside a chunk, tile by tile: the rows of a chunk (C channels apart, several KB)
// stay in the cache and the TLB while the group's tiles pass over them, and each (chunk, tile) unit prefetches the
// rows the next unit will read, since strided rows defeat the hardware prefetchers. (Measured: 16-lane tiles walking
// all of T are ~2x slower at B8 T1024 C512 than in cache; tile size itself barely changes the in-cache speed.)
#ifndef WKV4_VECTORS
#define WKV4_VECTORS 8
#endif
constexpr int kVectors = WKV4_VECTORS;
constexpr int kTileLanes = kVectors * kWidth;
constexpr int64_t L = wkv4::kCheckpointEvery;

template <class F>
WKV_INLINE void prefetch_write(const F* p, int n_lanes) {
    const char* c = reinterpret_cast<const char*>(p);
    for (int64_t off = 0; off < static_cast<int64_t>(n_lanes * sizeof(F)); off += 64) __builtin_prefetch(c + off, 1);
}

// Lanes of vector j in a tile of n lanes (Full: n == kTileLanes).
template <bool Full>
WKV_INLINE int lanes(int n, int j) {
    return Full ? kWidth : std::min(kWidth, n - j * kWidth);
}
template <bool Full>
WKV_INLINE int vectors(int n) {
    return Full ? kVectors : (n + kWidth - 1) / kWidth;
}

// A group of channels [c_begin, c_end) is cut into tiles of kTileLanes lanes (the last one may be narrower).
WKV_INLINE int64_t num_tiles(int64_t c_begin, int64_t c_end) {
    return (c_end - c_begin + kTileLanes - 1) / kTileLanes;
}

WKV_INLINE int tile_width(int64_t c_begin, int64_t c_end, int64_t i) {
    return static_cast<int>(std::min<int64_t>(kTileLanes, c_end - c_begin - i * kTileLanes));
}

// fn(i, j, c, m) for vector j of tile i of the group, c its first channel and m <= kWidth its lanes: where a job
// loads its tiles' parameters and states, and stores its results.
template <class Fn>
void for_each_vector(int64_t c_begin, int64_t c_end, Fn fn) {
    for (int64_t i = 0; i < num_tiles(c_begin, c_end); ++i) {
        const int width = tile_width(c_begin, c_end, i);
        for (int j = 0; j * kWidth < width; ++j)
            fn(i, j, c_begin + i * kTileLanes + j * kWidth, std::min(kWidth, width - j * kWidth));
    }
}

// How many groups to cut each row's tiles into: the split whose busiest thread walks the fewest tiles (jobs per
// thread x tiles per job), and among equal ones the fewest jobs: a job that walks several tiles through each chunk
// runs faster per tile than one job per tile. B1 T8192 C256 on 2 threads (4 tiles): 2 jobs of 2 tiles take 0.91-0.93x
// the time forward + backward of 4 jobs of 1 (an earlier "2 jobs per thread" rule), timed side by side in one process.
inline int64_t groups_per_row(int64_t B, int64_t tiles, int64_t threads) {
    int64_t best = 1, least = -1;
    for (int64_t g = 1; g <= tiles; ++g) {
        const int64_t busiest = (B * g + threads - 1) / threads * ((tiles + g - 1) / g);
        if (least < 0 || busiest < least) best = g, least = busiest;
    }
    return best;
}

// The jobs: B rows x `groups` groups of tiles per row. run(b, c_begin, c_end) for each, OpenMP-parallel.
template <class Run>
void for_each_group(int64_t B, int64_t C, Run run) {
    const int64_t tiles = num_tiles(0, C);
#ifdef _OPENMP
    const int64_t threads = omp_get_max_threads();
#else
    const int64_t threads = 1;
#endif
    const int64_t groups = groups_per_row(B, tiles, threads);
#pragma omp parallel for schedule(static)
    for (int64_t job = 0; job < B * groups; ++job) {
        const int64_t b = job / groups, g = job % groups;
        run(b, std::min(C, g * tiles / groups * kTileLanes), std::min(C, (g + 1) * tiles / groups * kTileLanes));
    }
}

template <class F>
struct Forward {
    const float *w, *u;
    const F *k, *v;
    const float* s0;
    F* y;
    float *s_out, *ckpt;  // ckpt == nullptr: inference, no checkpoints
    int64_t B, T, C;
};

struct ForwardTile {  // one tile's lanes between chunks
    vf w[kVectors], u[kVectors];
    VState s[kVectors];
};

// Steps t0 .. t1 of one tile (channels c0 .. c0 + n of row b). `next` is the element offset from this unit's rows
// to the next unit's, prefetched one step at a time.
template <bool Full, class F>
void forward_unit(const Forward<F>& a, ForwardTile& st, int64_t b, int64_t c0, int n, int64_t t0, int64_t t1,
                  int64_t next) {
    const int64_t T = a.T, C = a.C, n_ckpt = wkv4::num_checkpoints(T);
    const int nv = vectors<Full>(n);
    if (a.ckpt)
        for (int j = 0; j < nv; ++j)
            store_state<Full>(a.ckpt, a.B * n_ckpt * C, (b * n_ckpt + t0 / L) * C + c0 + j * kWidth, st.s[j],
                              lanes<Full>(n, j));
    for (int64_t t = t0; t < t1; ++t) {
        const int64_t row = (b * T + t) * C + c0;
        if (next) {
            prefetch(a.k + row + next, n);
            prefetch(a.v + row + next, n);
            prefetch_write(a.y + row + next, n);
        }
        for (int j = 0; j < nv; ++j) {
            const int64_t at = row + j * kWidth;
            const int m = lanes<Full>(n, j);
            const vf y = wkv4::forward_step(st.s[j], st.w[j], st.u[j], load<Full>(a.k + at, m), load<Full>(a.v + at, m));
            store<Full>(a.y + at, y, m);
        }
    }
}

template <class F>
void forward_kernel(const Forward<F>& a) {
    const int64_t T = a.T, C = a.C, BC = a.B * a.C, n_ckpt = wkv4::num_checkpoints(T);
    for_each_group(a.B, C, [&](int64_t b, int64_t c_begin, int64_t c_end) {
        const int64_t tiles = num_tiles(c_begin, c_end);
        std::vector<ForwardTile> st(tiles);
        auto width = [&](int64_t i) { return tile_width(c_begin, c_end, i); };
        for_each_vector(c_begin, c_end, [&](int64_t i, int j, int64_t c, int m) {
            st[i].w[j] = load<false>(a.w + c, m);
            st[i].u[j] = load<false>(a.u + c, m);
            st[i].s[j] = load_state<false>(a.s0, BC, b * C + c, m);
        });
        for (int64_t chunk = 0; chunk < n_ckpt; ++chunk) {
            const int64_t t0 = chunk * L, t1 = std::min(T, t0 + L);
            for (int64_t i = 0; i < tiles; ++i) {
                const int64_t c0 = c_begin + i * kTileLanes;
                // the next unit: the next tile of this chunk, else the first tile of the next chunk (none at the end)
                const int64_t next = i + 1 < tiles ? kTileLanes : (t1 < T ? L * C - i * kTileLanes : 0);
                if (width(i) == kTileLanes)
                    forward_unit<true>(a, st[i], b, c0, kTileLanes, t0, t1, next);
                else
                    forward_unit<false>(a, st[i], b, c0, width(i), t0, t1, next);
            }
        }
        for_each_vector(c_begin, c_end, [&](int64_t i, int j, int64_t c, int m) {
            store_state<false>(a.s_out, BC, b * C + c, st[i].s[j], m);
        });
    });
}

template <class F>
struct Backward {
    const float *w, *u;
    const F *k, *v, *gy;
    const float *ckpt, *s_last, *g_last;
    F *gk, *gv;
    float *gw, *gu, *g_s0;
    int64_t B, T, C;
};

struct BackwardTile {  // one tile's reverse-mode accumulators between chunks
    vf w[kVectors], u[kVectors];
    wkv4::GradT<vf> g[kVectors];
    wkv4::ParamGradT<vf> pg[kVectors];
};

// One chunk (steps t0 .. t1) of one tile: recompute the states before each step from the chunk's checkpoint into
// `before` (L * kVectors states, 24 KB), then backward_step from the chunk's last step to its first. The recompute
// prefetches this unit's gy and output rows (needed by the reverse pass), the reverse pass the next unit's k and v.
template <bool Full, class F>
void backward_unit(const Backward<F>& a, BackwardTile& st, VState (*before)[kVectors], int64_t b, int64_t c0, int n,
                   int64_t t0, int64_t t1, int64_t next) {
    const int64_t T = a.T, C = a.C, n_ckpt = wkv4::num_checkpoints(T);
    const int nv = vectors<Full>(n);
    VState s[kVectors];
    for (int j = 0; j < nv; ++j)
        s[j] = load_state<Full>(a.ckpt, a.B * n_ckpt * C, (b * n_ckpt + t0 / L) * C + c0 + j * kWidth, lanes<Full>(n, j));
    for (int64_t t = t0; t < t1; ++t) {
        const int64_t row = (b * T + t) * C + c0;
        prefetch(a.gy + row, n);
        prefetch_write(a.gk + row, n);
        prefetch_write(a.gv + row, n);
        for (int j = 0; j < nv; ++j) {
            const int m = lanes<Full>(n, j);
            before[t - t0][j] = s[j];
            wkv4::advance(s[j], st.w[j], load<Full>(a.k + row + j * kWidth, m), load<Full>(a.v + row + j * kWidth, m));
        }
    }
    for (int64_t t = t1 - 1; t >= t0; --t) {
        const int64_t row = (b * T + t) * C + c0;
        if (next) {
            prefetch(a.k + row + next, n);
            prefetch(a.v + row + next, n);
        }
        for (int j = 0; j < nv; ++j) {
            const int64_t at = row + j * kWidth;
            const int m = lanes<Full>(n, j);
            vf dk, dv;
            wkv4::backward_step(before[t - t0][j], st.w[j], st.u[j], load<Full>(a.k + at, m), load<Full>(a.v + at, m),
                                load<Full>(a.gy + at, m), st.g[j], st.pg[j], dk, dv);
            store<Full>(a.gk + at, dk, m);
            store<Full>(a.gv + at, dv, m);
        }
    }
}

template <class F>
void backward_kernel(const Backward<F>& a) {
    const int64_t T = a.T, C = a.C, BC = a.B * a.C, n_ckpt = wkv4::num_checkpoints(T);
    const int64_t ckpt_plane = a.B * n_ckpt * C;
    for_each_group(a.B, C, [&](int64_t b, int64_t c_begin, int64_t c_end) {
        const int64_t tiles = num_tiles(c_begin, c_end);
        std::vector<BackwardTile> st(tiles);
        std::vector<VState> before_storage(L * kVectors);
        auto* before = reinterpret_cast<VState(*)[kVectors]>(before_storage.data());
        auto width = [&](int64_t i) { return tile_width(c_begin, c_end, i); };
        for_each_vector(c_begin, c_end, [&](int64_t i, int j, int64_t c, int m) {
            st[i].w[j] = load<false>(a.w + c, m);
            st[i].u[j] = load<false>(a.u + c, m);
            const VState gl = load_state<false>(a.g_last, BC, b * C + c, m);
            st[i].g[j] = wkv4::grad_of_final_state(load_state<false>(a.s_last, BC, b * C + c, m), gl.a, gl.b, gl.p);
            st[i].pg[j] = wkv4::ParamGradT<vf>{vf{}, vf{}};
        });
        for (int64_t chunk = n_ckpt - 1; chunk >= 0; --chunk) {
            const int64_t t0 = chunk * L, t1 = std::min(T, t0 + L);
            for (int64_t i = 0; i < tiles; ++i) {
                const int64_t c0 = c_begin + i * kTileLanes;
                // the next unit: the next tile of this chunk, else the first tile of the chunk before (none at t = 0),
                // whose rows are L rows up
                const int64_t next = i + 1 < tiles ? kTileLanes : (chunk > 0 ? -L * C - i * kTileLanes : 0);
                if (width(i) == kTileLanes)
                    backward_unit<true>(a, st[i], before, b, c0, kTileLanes, t0, t1, next);
                else
                    backward_unit<false>(a, st[i], before, b, c0, width(i), t0, t1, next);
            }
        }
        for_each_vector(c_begin, c_end, [&](int64_t i, int j, int64_t c, int m) {
            const int64_t at = b * C + c;
            const VState first = load_state<false>(a.ckpt, ckpt_plane, b * n_ckpt * C + c, m);  // = s0
            store_state<false>(a.g_s0, BC, at, wkv4::grad_of_initial_state(first, st[i].g[j]), m);
            store<false>(a.gw + at, st[i].pg[j].gw, m);
            store<false>(a.gu + at, st[i].pg[j].gu, m);
        });
    });
}

}  // namespace wkv4cpu

#ifndef WKV4_NO_TORCH
namespace {

using wkv4cpu::Backward;
using wkv4cpu::Forward;
using wkv4cpu::dispatch;
using wkv4cpu::ptr;

// Python-facing wrappers. Shapes and dtypes are validated in rwkv_dist/ops/wkv.py before the call; the checks here only
// guard memory safety. States travel as one float32 tensor [3, B, C] (a, b, p).
void check_inputs(const at::Tensor& w, const at::Tensor& u, const at::Tensor& k, const at::Tensor& v) {
    TORCH_CHECK(k.dim() == 3 && k.sizes() == v.sizes() && k.scalar_type() == v.scalar_type(), "wkv4: bad k/v");
    TORCH_CHECK(k.is_contiguous() && v.is_contiguous() && w.is_contiguous() && u.is_contiguous(), "wkv4: not contiguous");
    TORCH_CHECK(w.scalar_type() == at::kFloat && u.scalar_type() == at::kFloat, "wkv4: w/u must be float32");
    TORCH_CHECK(w.numel() == k.size(2) && u.numel() == k.size(2), "wkv4: w/u must have C elements");
}

std::vector<at::Tensor> forward(at::Tensor w, at::Tensor u, at::Tensor k, at::Tensor v, at::Tensor s0,
                                bool save_for_backward) {
    check_inputs(w, u, k, v);
    const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
    TORCH_CHECK(s0.scalar_type() == at::kFloat && s0.is_contiguous() && s0.numel() == 3 * B * C, "wkv4: bad state");
    auto y = at::empty_like(v);
    auto s_out = at::empty({3, B, C}, s0.options());
    auto ckpt = at::empty({3, B, save_for_backward ? wkv4::num_checkpoints(T) : 0, C}, s0.options());
    dispatch("wkv4", k.scalar_type(), [&](auto tag) {
        using F = decltype(tag);
        wkv4cpu::forward_kernel(Forward<F>{ptr<float>(w), ptr<float>(u), ptr<F>(k), ptr<F>(v), ptr<float>(s0), ptr<F>(y),
                                           ptr<float>(s_out), save_for_backward ? ptr<float>(ckpt) : nullptr, B, T, C});
    });
    return {y, s_out, ckpt};
}

std::vector<at::Tensor> backward(at::Tensor w, at::Tensor u, at::Tensor k, at::Tensor v, at::Tensor gy,
                                 at::Tensor ckpt, at::Tensor s_last, at::Tensor g_last) {
    check_inputs(w, u, k, v);
    const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
    TORCH_CHECK(gy.sizes() == k.sizes() && gy.scalar_type() == k.scalar_type() && gy.is_contiguous(), "wkv4: bad gy");
    TORCH_CHECK(ckpt.numel() == 3 * B * wkv4::num_checkpoints(T) * C && ckpt.is_contiguous(), "wkv4: bad checkpoints");
    TORCH_CHECK(ckpt.scalar_type() == at::kFloat, "wkv4: bad checkpoints");
    TORCH_CHECK(s_last.numel() == 3 * B * C && g_last.numel() == 3 * B * C && g_last.is_contiguous() &&
                    s_last.is_contiguous() && s_last.scalar_type() == at::kFloat &&
                    g_last.scalar_type() == at::kFloat,
                "wkv4: bad state");
    auto gk = at::empty_like(k), gv = at::empty_like(v);
    auto gw = at::empty({B, C}, w.options()), gu = at::empty({B, C}, w.options());
    auto g_s0 = at::empty({3, B, C}, w.options());
    dispatch("wkv4", k.scalar_type(), [&](auto tag) {
        using F = decltype(tag);
        wkv4cpu::backward_kernel(Backward<F>{ptr<float>(w), ptr<float>(u), ptr<F>(k), ptr<F>(v), ptr<F>(gy),
                                             ptr<float>(ckpt), ptr<float>(s_last), ptr<float>(g_last), ptr<F>(gk),
                                             ptr<F>(gv), ptr<float>(gw), ptr<float>(gu), ptr<float>(g_s0), B, T, C});
    });
    return {gw, gu, gk, gv, g_s0};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "RWKV-4 WKV forward/backward on CPU (OpenMP, SIMD over channels, fp32 math)";
    m.def("forward", &forward, "WKV forward: (w, u, k, v, state[3,B,C], save_for_backward) -> (y, state, checkpoints)");
    m.def("backward", &backward, "WKV backward: (w, u, k, v, gy, checkpoints, state_T, g_state_T) -> (gw, gu, gk, gv, g_state0)");
    m.attr("checkpoint_every") = wkv4::kCheckpointEvery;
    m.def("mix_forward", &cpuops::mix_forward, "token shift + mixes: (x[B,T,D], last[B,D] or None, mu[N,D]) -> N outputs");
    m.def("mix_backward", &cpuops::mix_backward, "(x, last, mu, grads) -> (gx, g_last, g_mu)");
    m.def("squared_relu_forward", &cpuops::squared_relu_forward, "max(x, 0)^2");
    m.def("squared_relu_backward", &cpuops::squared_relu_backward, "(x, g) -> gx");
    m.def("sigmoid_gate_forward", &cpuops::sigmoid_gate_forward, "sigmoid(r) * y");
    m.def("sigmoid_gate_backward", &cpuops::sigmoid_gate_backward, "(r, y, g) -> (gr, gy)");
    m.def("cross_entropy_forward", &cpuops::cross_entropy_forward,
          "(logits[N,V], targets[N]) -> (loss, lse, top, argmax) per row, fp32 math");
    m.def("cross_entropy_backward", &cpuops::cross_entropy_backward,
          "(logits, targets, lse, top, argmax, scale, extra) -> grad[N,V]");
    m.def("gemv", &cpuops::gemv, "y[g,b,o] = scale[g,o] * sum_i x[g,b,i] w[g,o,i]: x fp32, w fp32/bf16/int8, fp32 math",
          pybind11::arg("x"), pybind11::arg("w"), pybind11::arg("scale") = pybind11::none());
}
#endif
