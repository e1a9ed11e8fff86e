// RWKV-4 WKV recurrence: the per-channel math shared by the CPU kernel (wkv4_cpu.cpp) and the CUDA kernel (wkv4_cuda.cu).
//
// Definition (per batch row b and channel c, w = -exp(time_decay) < 0, u = time_first):
//   A_t = e^w A_{t-1} + e^{k_t} v_t ,  B_t = e^w B_{t-1} + e^{k_t}          (A_{-1}, B_{-1} from the incoming state)
//   y_t = (A_{t-1} + e^{u+k_t} v_t) / (B_{t-1} + e^{u+k_t})
// A and B overflow, so the state is kept scaled by a running maximum exponent p:  A = a * e^p, B = b * e^p.
// The backward pass runs in reverse over T with its own scaled accumulators (ga, gb, pi): dL/dA_t = ga * e^{-pi}.
// Every exponent taken below is <= 0 by construction (p, m and pi are running max/min exponents), so nothing
// overflows for any T, |k| or decay; see docs in rwkv_dist/ops/wkv.py for the derivation.
//
// This header has no torch or CUDA dependencies. Every function is a template over the lane type V: `float` for one
// (b, c) lane (a CUDA thread), or a SIMD vector of floats for several channels at once (the CPU kernel, GCC vector
// extensions). Comparisons give a bool or a lane mask, and `cond ? x : y` selects per lane in both cases.
#pragma once

#include <cmath>

#ifdef __CUDACC__
#define WKV_HD __host__ __device__ __forceinline__
#else
#define WKV_HD inline
#endif
// The device pass uses the fast exp intrinsic, the host pass the C library's. The CPU kernel specializes Math for its
// vector type with an inlined polynomial exp (wkv4_cpu.cpp).
#ifdef __CUDA_ARCH__
#define WKV_EXP __expf
#else
#define WKV_EXP std::exp
#endif

namespace wkv4 {

template <class V>
struct Math {
    static WKV_HD V exp(V x) { return WKV_EXP(x); }
};

// "Minus infinity" for the running exponent of an empty state; finite so that differences stay finite.
constexpr float kEmptyExponent = -1e38f;

template <class V>
struct StateT {
    V a, b, p;  // A = a e^p, B = b e^p
};
using State = StateT<float>;

// Forward-mode bookkeeping of one time step: what the backward needs to know about step t.
template <class V>
struct StepValues {
    V m;   // max(p_{t-1}, u + k_t): the scale of the output's numerator and denominator
    V e1;  // e^{p_{t-1} - m}
    V e2;  // e^{u + k_t - m}
    V y;   // output y_t (fp32)
};

// ex = e^{x - m}, ey = e^{y - m} for m = (x_wins ? x : y), the larger of the two. One of them is e^{m - m}, so only the
// other exponential is computed: 1 + (m - m) equals e^{m - m} exactly for every m (1 when m is finite, NaN when it is
// infinite or NaN), so infinities and NaNs propagate as they would through two exponentials. (This needs IEEE
// semantics for m - m: the CPU kernel is not built with -ffinite-math-only.)
template <class V, class M>
WKV_HD void exp_of_pair(V x, V y, M x_wins, V m, V& ex, V& ey) {
    const V e = Math<V>::exp((x_wins ? y : x) - m);
    const V one = (m - m) + 1.f;
    ex = x_wins ? one : e;
    ey = x_wins ? e : one;
}

// Output of step t given the state before it.
template <class V>
WKV_HD StepValues<V> output(const StateT<V>& s, V u, V k, V v) {
    StepValues<V> o;
    const V uk = u + k;
    const auto p_wins = s.p > uk;
    o.m = p_wins ? s.p : uk;
    exp_of_pair(s.p, uk, p_wins, o.m, o.e1, o.e2);
    o.y = (o.e1 * s.a + o.e2 * v) / (o.e1 * s.b + o.e2);
    return o;
}

// True when the new running exponent comes from the decayed old one (w + p) rather than from k_t.
// The backward must take the same branch as the forward, so both call this.
template <class V>
WKV_HD auto exponent_from_decay(const StateT<V>& s, V w, V k) {
    return s.p + w >= k;
}

// Fold token t into the state: A <- e^w A + e^k v, B <- e^w B + e^k.
template <class V>
WKV_HD void advance(StateT<V>& s, V w, V k, V v) {
    const V wp = w + s.p;
    const auto from_decay = exponent_from_decay(s, w, k);
    const V p = from_decay ? wp : k;
    V f1, f2;  // e^{wp - p}, e^{k - p}
    exp_of_pair(wp, k, from_decay, p, f1, f2);
    s.a = f1 * s.a + f2 * v;
    s.b = f1 * s.b + f2;
    s.p = p;
}

template <class V>
WKV_HD V forward_step(StateT<V>& s, V w, V u, V k, V v) {
    const V y = output(s, u, k, v).y;
    advance(s, w, k, v);
    return y;
}

// Reverse-mode accumulators: dL/dA_t = ga e^{-pi}, dL/dB_t = gb e^{-pi}, plus `excess`, the gradient that reaches the
// running exponent p_t itself beyond what flows through A and B (nonzero only when a caller's loss reads the raw p of
// the returned state; it follows the max() chain back to the k_j or initial p that produced p_T).
template <class V>
struct GradT {
    V ga, gb, pi, excess;
};
using Grad = GradT<float>;

// Per-lane sums over T.
template <class V>
struct ParamGradT {
    V gw, gu;
};
using ParamGrad = ParamGradT<float>;

// The gradient of the final state (a_T, b_T, p_T) given the caller's (g_a, g_b, g_p).
template <class V>
WKV_HD GradT<V> grad_of_final_state(const StateT<V>& last, V g_a, V g_b, V g_p) {
    GradT<V> g;
    g.ga = g_a;
    g.gb = g_b;
    g.pi = last.p;
    g.excess = g_p - (g_a * last.a + g_b * last.b);
    return g;
}

// One reverse step. `prev` is the state before step t (recomputed by the caller), gy = dL/dy_t.
// Writes dL/dk_t, dL/dv_t and accumulates dL/dw, dL/du; updates g from step t to step t-1.
template <class V>
WKV_HD void backward_step(const StateT<V>& prev, V w, V u, V k, V v, V gy, GradT<V>& g, ParamGradT<V>& pg, V& gk,
                          V& gv) {
    const StepValues<V> o = output(prev, u, k, v);
    const V q = gy / (o.e1 * prev.b + o.e2);  // gy / D_t, times e^{m}
    const V direct = q * o.e2;                // dL/dv_t through y_t
    const V ek = Math<V>::exp(k - g.pi);      // e^{k_t} dL/dA_t = ek * ga
    gk = direct * (v - o.y) + ek * (g.ga * v + g.gb);
    gv = direct + ek * g.ga;
    pg.gu += direct * (v - o.y);
    pg.gw += Math<V>::exp(w + prev.p - g.pi) * (g.ga * prev.a + g.gb * prev.b);
    // p_t = w + p_{t-1} passes the excess on (and dp_t/dw = 1); p_t = k_t hands it to k_t. Selects, not branches, so
    // that the CPU lanes vectorize.
    const auto from_decay = exponent_from_decay(prev, w, k);
    pg.gw += from_decay ? g.excess : 0.f;
    gk += from_decay ? 0.f : g.excess;
    g.excess = from_decay ? g.excess : 0.f;
    // dL/dA_{t-1} = e^w dL/dA_t + gy/D_t ,  dL/dB_{t-1} = e^w dL/dB_t - gy y_t / D_t ; rescale to the larger exponent.
    const V from_future = w - g.pi;
    const V from_output = -o.m;
    const auto future_wins = from_future > from_output;
    const V top = future_wins ? from_future : from_output;
    V f1, f2;  // e^{from_future - top}, e^{from_output - top}
    exp_of_pair(from_future, from_output, future_wins, top, f1, f2);
    f2 = f2 * q;
    g.ga = f1 * g.ga + f2;
    g.gb = f1 * g.gb - f2 * o.y;
    g.pi = -top;
}

// dL/d(initial state) once the reverse pass reached t = -1.
template <class V>
WKV_HD StateT<V> grad_of_initial_state(const StateT<V>& first, const GradT<V>& g) {
    StateT<V> d;
    const V scale = Math<V>::exp(first.p - g.pi);
    d.a = g.ga * scale;
    d.b = g.gb * scale;
    d.p = d.a * first.a + d.b * first.b + g.excess;
    return d;
}

}  // namespace wkv4
