// The elementwise parts of an RWKV-4 block on CPU, each one pass over memory forward and one backward, where the
// composition of torch ops makes several (rwkv_dist/ops/mixing.py has the formulas and the reference):
//   token shift + mixes:  out_i[t] = prev[t] + mu_i (x[t] - prev[t]),  prev[t] = x[t-1] (the state's `last` at t = 0)
//   squared ReLU:         y = max(x, 0)^2
//   sigmoid gate:         out = sigmoid(r) * y
// Storage dtypes fp32 / bf16 / fp16, converted in registers; all math fp32. Parameter gradients are reduced per thread
// over a fixed split of the rows and then summed in thread order, so results repeat bitwise for a given thread count.
// OpenMP runs a call on one thread when it is too small to be worth waking the others (a decode step).
#include <algorithm>
#include <optional>
#include <utility>
#include <vector>

#include "cpu_parallel.h"
#include "cpu_simd.h"

namespace mixcpu {

using wkv4cpu::kWidth;
using wkv4cpu::vf;
using wkv4cpu::load;
using wkv4cpu::store;

using cpupar::split;
using cpupar::threads_for;

// ---- token shift + mixes ----------------------------------------------------------------------------------------

template <class F>
struct Mix {
    const F* x;           // [B, T, D]
    const float* last;    // [B, D] or nullptr (zeros)
    const float* mu;      // [N, D]
    int n;                // mixes
    int64_t B, T, D;
};

// The previous row's vector at channel c (m lanes): from x's storage type, from the fp32 state, or zeros.
template <class F>
WKV_INLINE vf previous(const F* prev_x, const float* prev_last, int64_t c, int m) {
    if (prev_x) return load<false>(prev_x + c, m);
    return prev_last ? load<false>(prev_last + c, m) : vf{};
}

// (previous row in x, previous row in `last`) for row r = b * T + t: one of them, or neither (zeros). Found once per
// row: the kernels used to divide r by T for every vector of a row.
template <class F>
WKV_INLINE std::pair<const F*, const float*> previous_rows(const Mix<F>& a, int64_t r) {
    if (r % a.T > 0) return {a.x + (r - 1) * a.D, nullptr};
    return {nullptr, a.last ? a.last + (r / a.T) * a.D : nullptr};
}

template <class F>
void mix_forward(const Mix<F>& a, F* const* out) {
    split(a.B * a.T, threads_for(a.B * a.T * a.D), [&](int, int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
            const auto [prev_x, prev_last] = previous_rows(a, r);
            const F* x_row = a.x + r * a.D;
            for (int64_t c = 0; c < a.D; c += kWidth) {
                const int m = static_cast<int>(std::min<int64_t>(kWidth, a.D - c));
                const vf x = load<false>(x_row + c, m), prev = previous(prev_x, prev_last, c, m), d = x - prev;
                for (int i = 0; i < a.n; ++i)
                    store<false>(out[i] + r * a.D + c, prev + load<false>(a.mu + i * a.D + c, m) * d, m);
            }
        }
    });
}

// gx[t] = sum_i g_i[t] mu_i + g_i[t+1] (1 - mu_i);  g_last = sum_i g_i[0] (1 - mu_i);  g_mu_i = sum_t g_i[t] (x - prev)
// One row r. N: the number of mixes as a compile-time constant for the model's 3 and 2 (0: any other count, read from
// a.n); Full: D is a whole number of vectors. With both known the loop over mixes unrolls and every load is one
// vector load: 1.6x faster on [1, 8192, 256] than the general loop (2.0 -> 1.25 ms for 3 mixes, 1.5 -> 0.94 for 2).
// acc: this thread's [n, D] sums for g_mu.
template <int N, bool Full, class F>
WKV_INLINE void mix_backward_row(const Mix<F>& a, const F* const* g, int64_t r, F* __restrict__ gx, float* g_last,
                                 float* __restrict__ acc) {
    const int n = N > 0 ? N : a.n;
    const bool has_next = r % a.T + 1 < a.T, first = r % a.T == 0;
    const auto [prev_x, prev_last] = previous_rows(a, r);
    const F* x_row = a.x + r * a.D;
    for (int64_t c = 0; c < a.D; c += kWidth) {
        const int m = Full ? kWidth : static_cast<int>(std::min<int64_t>(kWidth, a.D - c));
        const vf d = load<Full>(x_row + c, m) - previous(prev_x, prev_last, c, m);
        vf grad = {}, grad_last = {};
        for (int i = 0; i < n; ++i) {
            const vf mu = load<Full>(a.mu + i * a.D + c, m), gi = load<Full>(g[i] + r * a.D + c, m);
            grad += gi * mu;
            if (has_next) grad += load<Full>(g[i] + (r + 1) * a.D + c, m) * (1.f - mu);
            if (first) grad_last += gi * (1.f - mu);
            float* ai = acc + i * a.D + c;
            store<Full>(ai, load<Full>(ai, m) + gi * d, m);
        }
        store<Full>(gx + r * a.D + c, grad, m);
        if (first && g_last) store<Full>(g_last + (r / a.T) * a.D + c, grad_last, m);
    }
}

template <int N, class F>
void mix_backward_rows(const Mix<F>& a, const F* const* g, F* gx, float* g_last, float* acc, int64_t r0, int64_t r1) {
    if (a.D % kWidth == 0) {
        for (int64_t r = r0; r < r1; ++r) mix_backward_row<N, true>(a, g, r, gx, g_last, acc);
    } else {
        for (int64_t r = r0; r < r1; ++r) mix_backward_row<N, false>(a, g, r, gx, g_last, acc);
    }
}

template <class F>
void mix_backward(const Mix<F>& a, const F* const* g, F* gx, float* g_last, float* g_mu) {
    const int threads = threads_for(a.B * a.T * a.D);
    std::vector<float> partial(static_cast<size_t>(threads) * a.n * a.D, 0.f);
    split(a.B * a.T, threads, [&](int id, int64_t r0, int64_t r1) {
        float* acc = partial.data() + static_cast<int64_t>(id) * a.n * a.D;
        if (a.n == 3)
            mix_backward_rows<3>(a, g, gx, g_last, acc, r0, r1);
        else if (a.n == 2)
            mix_backward_rows<2>(a, g, gx, g_last, acc, r0, r1);
        else
            mix_backward_rows<0>(a, g, gx, g_last, acc, r0, r1);
    });
    for (int64_t j = 0; j < a.n * a.D; ++j) {
        float sum = 0.f;
        for (int id = 0; id < threads; ++id) sum += partial[static_cast<size_t>(id) * a.n * a.D + j];
        g_mu[j] = sum;
    }
}

// ---- elementwise ------------------------------------------------------------------------------------------------

// fn(i, m) for every vector of n elements (m lanes at element i), split over threads.
template <class Fn>
void for_each_element_vector(int64_t n, Fn fn) {
    const int64_t vectors = (n + kWidth - 1) / kWidth;
    split(vectors, threads_for(n), [&](int, int64_t v0, int64_t v1) {
        for (int64_t v = v0; v < v1; ++v) fn(v * kWidth, static_cast<int>(std::min<int64_t>(kWidth, n - v * kWidth)));
    });
}

// max(x, 0) that keeps NaN (a comparison with NaN is false), as torch.relu does.
WKV_INLINE vf relu(vf x) { return x < 0.f ? 0.f : x; }

WKV_INLINE vf sigmoid(vf x) { return 1.f / (1.f + wkv4cpu::exp_lanes(-x)); }

template <class F>
void squared_relu_forward(const F* x, F* y, int64_t n) {
    for_each_element_vector(n, [&](int64_t i, int m) {
        const vf h = relu(load<false>(x + i, m));
        store<false>(y + i, h * h, m);
    });
}

template <class F>
void squared_relu_backward(const F* x, const F* g, F* gx, int64_t n) {
    for_each_element_vector(n, [&](int64_t i, int m) {
        store<false>(gx + i, 2.f * relu(load<false>(x + i, m)) * load<false>(g + i, m), m);
    });
}

template <class F>
void sigmoid_gate_forward(const F* r, const F* y, F* out, int64_t n) {
    for_each_element_vector(n, [&](int64_t i, int m) {
        store<false>(out + i, sigmoid(load<false>(r + i, m)) * load<false>(y + i, m), m);
    });
}

template <class F>
void sigmoid_gate_backward(const F* r, const F* y, const F* g, F* gr, F* gy, int64_t n) {
    for_each_element_vector(n, [&](int64_t i, int m) {
        const vf s = sigmoid(load<false>(r + i, m)), gi = load<false>(g + i, m);
        store<false>(gy + i, gi * s, m);
        store<false>(gr + i, gi * load<false>(y + i, m) * s * (1.f - s), m);
    });
}

}  // namespace mixcpu

// ---- Python-facing wrappers (shapes and dtypes are validated in rwkv_dist/ops/mixing.py; these guard memory) -------
#include "cpu_ops.h"

namespace cpuops {

using wkv4cpu::dispatch;
using wkv4cpu::ptr;

template <class F>
mixcpu::Mix<F> mix_args(const Tensor& x, const std::optional<Tensor>& last, const Tensor& mu) {
    TORCH_CHECK(x.dim() == 3 && x.is_contiguous(), "mix: x must be a contiguous [B, T, D] tensor");
    const int64_t B = x.size(0), T = x.size(1), D = x.size(2);
    TORCH_CHECK(mu.scalar_type() == at::kFloat && mu.is_contiguous() && mu.dim() == 2 && mu.size(1) == D,
                "mix: mu must be a contiguous float32 [N, D] tensor");
    if (last) {
        TORCH_CHECK(last->scalar_type() == at::kFloat && last->is_contiguous() && last->numel() == B * D,
                    "mix: last must be a contiguous float32 [B, D] tensor");
    }
    return {ptr<F>(x), last ? ptr<float>(*last) : nullptr, ptr<float>(mu), static_cast<int>(mu.size(0)), B, T, D};
}

std::vector<Tensor> mix_forward(Tensor x, std::optional<Tensor> last, Tensor mu) {
    std::vector<Tensor> out;
    for (int64_t i = 0; i < mu.size(0); ++i) out.push_back(at::empty_like(x));
    dispatch("mix", x.scalar_type(), [&](auto tag) {
        using F = decltype(tag);
        std::vector<F*> out_ptrs;
        for (auto& o : out) out_ptrs.push_back(ptr<F>(o));
        mixcpu::mix_forward(mix_args<F>(x, last, mu), out_ptrs.data());
    });
    return out;
}

// -> (gx, g_last (empty when last is None), g_mu)
std::vector<Tensor> mix_backward(Tensor x, std::optional<Tensor> last, Tensor mu, std::vector<Tensor> grads) {
    TORCH_CHECK(static_cast<int64_t>(grads.size()) == mu.size(0), "mix: one gradient per mix");
    for (auto& g : grads)
        TORCH_CHECK(g.sizes() == x.sizes() && g.scalar_type() == x.scalar_type() && g.is_contiguous(), "mix: bad grad");
    auto gx = at::empty_like(x);
    auto g_last = last ? at::empty_like(*last) : at::empty({0}, mu.options());
    auto g_mu = at::empty_like(mu);
    dispatch("mix", x.scalar_type(), [&](auto tag) {
        using F = decltype(tag);
        std::vector<const F*> g_ptrs;
        for (auto& g : grads) g_ptrs.push_back(ptr<F>(g));
        mixcpu::mix_backward(mix_args<F>(x, last, mu), g_ptrs.data(), ptr<F>(gx), last ? ptr<float>(g_last) : nullptr,
                             ptr<float>(g_mu));
    });
    return {gx, g_last, g_mu};
}

// Runs fn(F{}, outputs) on the storage type F of inputs (contiguous, of one shape and dtype), with n_outputs fresh
// tensors shaped like them.
template <class Fn>
std::vector<Tensor> elementwise(const char* op, const std::vector<Tensor>& inputs, int n_outputs, Fn fn) {
    for (const auto& t : inputs)
        TORCH_CHECK(t.is_contiguous() && t.sizes() == inputs[0].sizes() && t.scalar_type() == inputs[0].scalar_type(),
                    op, ": tensors must be contiguous, of one shape and dtype");
    std::vector<Tensor> out;
    for (int i = 0; i < n_outputs; ++i) out.push_back(at::empty_like(inputs[0]));
    dispatch(op, inputs[0].scalar_type(), [&](auto tag) { fn(tag, out); });
    return out;
}

Tensor squared_relu_forward(Tensor x) {
    return elementwise("squared_relu", {x}, 1, [&](auto tag, auto& out) {
        using F = decltype(tag);
        mixcpu::squared_relu_forward(ptr<F>(x), ptr<F>(out[0]), x.numel());
    })[0];
}

Tensor squared_relu_backward(Tensor x, Tensor g) {
    return elementwise("squared_relu", {x, g}, 1, [&](auto tag, auto& out) {
        using F = decltype(tag);
        mixcpu::squared_relu_backward(ptr<F>(x), ptr<F>(g), ptr<F>(out[0]), x.numel());
    })[0];
}

Tensor sigmoid_gate_forward(Tensor r, Tensor y) {
    return elementwise("sigmoid_gate", {r, y}, 1, [&](auto tag, auto& out) {
        using F = decltype(tag);
        mixcpu::sigmoid_gate_forward(ptr<F>(r), ptr<F>(y), ptr<F>(out[0]), r.numel());
    })[0];
}

std::vector<Tensor> sigmoid_gate_backward(Tensor r, Tensor y, Tensor g) {  // -> (gr, gy)
    return elementwise("sigmoid_gate", {r, y, g}, 2, [&](auto tag, auto& out) {
        using F = decltype(tag);
        mixcpu::sigmoid_gate_backward(ptr<F>(r), ptr<F>(y), ptr<F>(g), ptr<F>(out[0]), ptr<F>(out[1]), r.numel());
    });
}

}  // namespace cpuops
