// CPU WKV kernel: OpenMP over (batch row, tile of channels), sequential in T, the tile's channels innermost so that
// every time step reads contiguous memory and the compiler can vectorize across channels.
// The math lives in wkv4_core.h (shared with the CUDA kernel); this file only walks tensors.
#include <torch/extension.h>

#include <algorithm>
#include <vector>

#include "wkv4_core.h"
#include "wkv4_layout.h"

namespace {

// Channels per work item: several SIMD registers wide, so that the independent lanes' dependency chains over t overlap
// (measured here: 16 lanes 9 ns/element, 64 lanes 3.5 ns/element single-threaded).
constexpr int64_t kTile = 64;

using wkv4::State;

// States of one tile's lanes as three arrays (not an array of structs), so the lane loop vectorizes.
struct Tile {
    float a[kTile], b[kTile], p[kTile];
    State get(int64_t i) const { return State{a[i], b[i], p[i]}; }
    void set(int64_t i, const State& s) { a[i] = s.a, b[i] = s.b, p[i] = s.p; }
    void load(const float* planes, int64_t plane, int64_t at, int64_t n) {
        for (int64_t i = 0; i < n; ++i) set(i, wkv4::load_state(planes, plane, at + i));
    }
    void store(float* planes, int64_t plane, int64_t at, int64_t n) const {
        for (int64_t i = 0; i < n; ++i) wkv4::store_state(planes, plane, at + i, get(i));
    }
};

struct Lanes {
    int64_t b, c0, n;  // batch row, first channel, number of channels in this tile
};

template <typename F>
void forward_kernel(const float* __restrict__ w, const float* __restrict__ u, const F* __restrict__ k,
                    const F* __restrict__ v, const float* __restrict__ s0, F* __restrict__ y,
                    float* __restrict__ s_out, float* __restrict__ ckpt, int64_t B, int64_t T, int64_t C) {
    const int64_t tiles = (C + kTile - 1) / kTile;
    const int64_t n_ckpt = wkv4::num_checkpoints(T);
#pragma omp parallel for schedule(static)
    for (int64_t job = 0; job < B * tiles; ++job) {
        const Lanes l{job / tiles, (job % tiles) * kTile, std::min(kTile, C - (job % tiles) * kTile)};
        Tile s;
        s.load(s0, B * C, l.b * C + l.c0, l.n);
        for (int64_t t = 0; t < T; ++t) {
            const int64_t row = (l.b * T + t) * C + l.c0;
            if (ckpt && t % wkv4::kCheckpointEvery == 0)
                s.store(ckpt, B * n_ckpt * C, (l.b * n_ckpt + t / wkv4::kCheckpointEvery) * C + l.c0, l.n);
            for (int64_t i = 0; i < l.n; ++i) {
                const int64_t c = l.c0 + i;
                State st = s.get(i);
                y[row + i] = static_cast<F>(wkv4::forward_step(st, w[c], u[c], static_cast<float>(k[row + i]),
                                                               static_cast<float>(v[row + i])));
                s.set(i, st);
            }
        }
        s.store(s_out, B * C, l.b * C + l.c0, l.n);
    }
}

// Reverse-mode accumulators of one tile's lanes, as arrays (see Tile).
struct GradTile {
    float ga[kTile], gb[kTile], pi[kTile], excess[kTile], gw[kTile], gu[kTile];
    wkv4::Grad get(int64_t i) const { return wkv4::Grad{ga[i], gb[i], pi[i], excess[i]}; }
    void set(int64_t i, const wkv4::Grad& g) { ga[i] = g.ga, gb[i] = g.gb, pi[i] = g.pi, excess[i] = g.excess; }
};

template <typename F>
void backward_kernel(const float* __restrict__ w, const float* __restrict__ u, const F* __restrict__ k,
                     const F* __restrict__ v, const F* __restrict__ gy, const float* __restrict__ ckpt,
                     const float* __restrict__ s_last, const float* __restrict__ g_last, F* __restrict__ gk,
                     F* __restrict__ gv, float* __restrict__ gw, float* __restrict__ gu, float* __restrict__ g_s0,
                     int64_t B, int64_t T, int64_t C) {
    constexpr int64_t L = wkv4::kCheckpointEvery;
    const int64_t tiles = (C + kTile - 1) / kTile;
    const int64_t n_ckpt = wkv4::num_checkpoints(T);
    const int64_t ckpt_plane = B * n_ckpt * C;
#pragma omp parallel for schedule(static)
    for (int64_t job = 0; job < B * tiles; ++job) {
        const Lanes l{job / tiles, (job % tiles) * kTile, std::min(kTile, C - (job % tiles) * kTile)};
        GradTile g;
        Tile before[L];  // the states before each step of the current chunk, recomputed from its checkpoint
        for (int64_t i = 0; i < l.n; ++i) {
            const int64_t at = l.b * C + l.c0 + i;
            const State gl = wkv4::load_state(g_last, B * C, at);
            g.set(i, wkv4::grad_of_final_state(wkv4::load_state(s_last, B * C, at), gl.a, gl.b, gl.p));
            g.gw[i] = g.gu[i] = 0.f;
        }
        for (int64_t chunk = n_ckpt - 1; chunk >= 0; --chunk) {
            const int64_t t0 = chunk * L, t1 = std::min(T, t0 + L);
            Tile s;
            s.load(ckpt, ckpt_plane, (l.b * n_ckpt + chunk) * C + l.c0, l.n);
            for (int64_t t = t0; t < t1; ++t) {
                const int64_t row = (l.b * T + t) * C + l.c0;
                before[t - t0] = s;
                for (int64_t i = 0; i < l.n; ++i) {
                    State st = s.get(i);
                    wkv4::advance(st, w[l.c0 + i], static_cast<float>(k[row + i]), static_cast<float>(v[row + i]));
                    s.set(i, st);
                }
            }
            for (int64_t t = t1 - 1; t >= t0; --t) {
                const int64_t row = (l.b * T + t) * C + l.c0;
                for (int64_t i = 0; i < l.n; ++i) {
                    const int64_t c = l.c0 + i;
                    wkv4::Grad gi = g.get(i);
                    wkv4::ParamGrad pg{g.gw[i], g.gu[i]};
                    float dk, dv;
                    wkv4::backward_step(before[t - t0].get(i), w[c], u[c], static_cast<float>(k[row + i]),
                                        static_cast<float>(v[row + i]), static_cast<float>(gy[row + i]), gi, pg, dk,
                                        dv);
                    g.set(i, gi);
                    g.gw[i] = pg.gw, g.gu[i] = pg.gu;
                    gk[row + i] = static_cast<F>(dk);
                    gv[row + i] = static_cast<F>(dv);
                }
            }
        }
        for (int64_t i = 0; i < l.n; ++i) {
            const int64_t at = l.b * C + l.c0 + i;
            const State first = wkv4::load_state(ckpt, ckpt_plane, l.b * n_ckpt * C + l.c0 + i);
            wkv4::store_state(g_s0, B * C, at, wkv4::grad_of_initial_state(first, g.get(i)));
            gw[at] = g.gw[i];
            gu[at] = g.gu[i];
        }
    }
}

// Python-facing wrappers. Shapes and dtypes are validated in rwkv_dist/ops/wkv.py before the call; the checks here only
// guard memory safety. States travel as one float32 tensor [3, B, C] (a, b, p).
void check_inputs(const torch::Tensor& w, const torch::Tensor& u, const torch::Tensor& k, const torch::Tensor& v) {
    TORCH_CHECK(k.dim() == 3 && k.sizes() == v.sizes() && k.scalar_type() == v.scalar_type(), "wkv4: bad k/v");
    TORCH_CHECK(k.is_contiguous() && v.is_contiguous() && w.is_contiguous() && u.is_contiguous(), "wkv4: not contiguous");
    TORCH_CHECK(w.scalar_type() == torch::kFloat && u.scalar_type() == torch::kFloat, "wkv4: w/u must be float32");
    TORCH_CHECK(w.numel() == k.size(2) && u.numel() == k.size(2), "wkv4: w/u must have C elements");
}

std::vector<torch::Tensor> forward(torch::Tensor w, torch::Tensor u, torch::Tensor k, torch::Tensor v, torch::Tensor s0,
                                   bool save_for_backward) {
    check_inputs(w, u, k, v);
    const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
    TORCH_CHECK(s0.scalar_type() == torch::kFloat && s0.is_contiguous() && s0.numel() == 3 * B * C, "wkv4: bad state");
    auto y = torch::empty_like(v);
    auto s_out = torch::empty({3, B, C}, s0.options());
    auto ckpt = torch::empty({3, B, save_for_backward ? wkv4::num_checkpoints(T) : 0, C}, s0.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(torch::kBFloat16, torch::kHalf, k.scalar_type(), "wkv4_forward_cpu", [&] {
        forward_kernel<scalar_t>(w.data_ptr<float>(), u.data_ptr<float>(), k.data_ptr<scalar_t>(),
                                 v.data_ptr<scalar_t>(), s0.data_ptr<float>(), y.data_ptr<scalar_t>(),
                                 s_out.data_ptr<float>(), save_for_backward ? ckpt.data_ptr<float>() : nullptr, B, T, C);
    });
    return {y, s_out, ckpt};
}

std::vector<torch::Tensor> backward(torch::Tensor w, torch::Tensor u, torch::Tensor k, torch::Tensor v, torch::Tensor gy,
                                    torch::Tensor ckpt, torch::Tensor s_last, torch::Tensor g_last) {
    check_inputs(w, u, k, v);
    const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
    TORCH_CHECK(gy.sizes() == k.sizes() && gy.scalar_type() == k.scalar_type() && gy.is_contiguous(), "wkv4: bad gy");
    TORCH_CHECK(ckpt.numel() == 3 * B * wkv4::num_checkpoints(T) * C && ckpt.is_contiguous(), "wkv4: bad checkpoints");
    TORCH_CHECK(s_last.numel() == 3 * B * C && g_last.numel() == 3 * B * C && g_last.is_contiguous(), "wkv4: bad state");
    auto gk = torch::empty_like(k), gv = torch::empty_like(v);
    auto gw = torch::empty({B, C}, w.options()), gu = torch::empty({B, C}, w.options());
    auto g_s0 = torch::empty({3, B, C}, w.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(torch::kBFloat16, torch::kHalf, k.scalar_type(), "wkv4_backward_cpu", [&] {
        backward_kernel<scalar_t>(w.data_ptr<float>(), u.data_ptr<float>(), k.data_ptr<scalar_t>(),
                                  v.data_ptr<scalar_t>(), gy.data_ptr<scalar_t>(), ckpt.data_ptr<float>(),
                                  s_last.data_ptr<float>(), g_last.data_ptr<float>(), gk.data_ptr<scalar_t>(),
                                  gv.data_ptr<scalar_t>(), gw.data_ptr<float>(), gu.data_ptr<float>(),
                                  g_s0.data_ptr<float>(), B, T, C);
    });
    return {gw, gu, gk, gv, g_s0};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "RWKV-4 WKV forward/backward on CPU (OpenMP, fp32 math)";
    m.def("forward", &forward, "WKV forward: (w, u, k, v, state[3,B,C], save_for_backward) -> (y, state, checkpoints)");
    m.def("backward", &backward, "WKV backward: (w, u, k, v, gy, checkpoints, state_T, g_state_T) -> (gw, gu, gk, gv, g_state0)");
    m.attr("checkpoint_every") = wkv4::kCheckpointEvery;
}
