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
// This header has no torch or CUDA dependencies: both drivers call these inline functions per (b, c) lane.
#pragma once

#include <cmath>

#ifdef __CUDACC__
#define WKV_HD __host__ __device__ __forceinline__
#else
#define WKV_HD inline
#endif
// The device pass uses the fast exp intrinsic; the host pass (CPU kernel, and nvcc's host copy) the C library's, which
// g++ vectorizes across lanes under -ffast-math (see rwkv_dist/ops/_build.py).
#ifdef __CUDA_ARCH__
#define WKV_EXP __expf
#else
#define WKV_EXP std::exp
#endif

namespace wkv4 {


// "Minus infinity" for the running exponent of an empty state; finite so that differences stay finite.
constexpr float kEmptyExponent = -1e38f;

struct State {
    float a, b, p;  // A = a e^p, B = b e^p
};

// Forward-mode bookkeeping of one time step: what the backward needs to know about step t.
struct StepValues {
    float m;   // max(p_{t-1}, u + k_t): the scale of the output's numerator and denominator
    float e1;  // e^{p_{t-1} - m}
    float e2;  // e^{u + k_t - m}
    float y;   // output y_t (fp32)
};

// Output of step t given the state before it.
WKV_HD StepValues output(const State& s, float u, float k, float v) {
    StepValues o;
    const float uk = u + k;
    o.m = s.p > uk ? s.p : uk;
    o.e1 = WKV_EXP(s.p - o.m);
    o.e2 = WKV_EXP(uk - o.m);
    o.y = (o.e1 * s.a + o.e2 * v) / (o.e1 * s.b + o.e2);
    return o;
}

// True when the new running exponent comes from the decayed old one (w + p) rather than from k_t.
// The backward must take the same branch as the forward, so both call this.
WKV_HD bool exponent_from_decay(const State& s, float w, float k) { return s.p + w >= k; }

// Fold token t into the state: A <- e^w A + e^k v, B <- e^w B + e^k.
WKV_HD void advance(State& s, float w, float k, float v) {
    const float wp = w + s.p;
    const float p = exponent_from_decay(s, w, k) ? wp : k;
    const float f1 = WKV_EXP(wp - p);
    const float f2 = WKV_EXP(k - p);
    s.a = f1 * s.a + f2 * v;
    s.b = f1 * s.b + f2;
    s.p = p;
}

WKV_HD float forward_step(State& s, float w, float u, float k, float v) {
    const float y = output(s, u, k, v).y;
    advance(s, w, k, v);
    return y;
}

// Reverse-mode accumulators: dL/dA_t = ga e^{-pi}, dL/dB_t = gb e^{-pi}, plus `excess`, the gradient that reaches the
// running exponent p_t itself beyond what flows through A and B (nonzero only when a caller's loss reads the raw p of
// the returned state; it follows the max() chain back to the k_j or initial p that produced p_T).
struct Grad {
    float ga, gb, pi, excess;
};

// Per-lane sums over T.
struct ParamGrad {
    float gw, gu;
};

// The gradient of the final state (a_T, b_T, p_T) given the caller's (g_a, g_b, g_p).
WKV_HD Grad grad_of_final_state(const State& last, float g_a, float g_b, float g_p) {
    Grad g;
    g.ga = g_a;
    g.gb = g_b;
    g.pi = last.p;
    g.excess = g_p - (g_a * last.a + g_b * last.b);
    return g;
}

// One reverse step. `prev` is the state before step t (recomputed by the caller), gy = dL/dy_t.
// Writes dL/dk_t, dL/dv_t and accumulates dL/dw, dL/du; updates g from step t to step t-1.
WKV_HD void backward_step(const State& prev, float w, float u, float k, float v, float gy, Grad& g, ParamGrad& pg,
                          float& gk, float& gv) {
    const StepValues o = output(prev, u, k, v);
    const float q = gy / (o.e1 * prev.b + o.e2);  // gy / D_t, times e^{m}
    const float direct = q * o.e2;                // dL/dv_t through y_t
    const float ek = WKV_EXP(k - g.pi);           // e^{k_t} dL/dA_t = ek * ga
    gk = direct * (v - o.y) + ek * (g.ga * v + g.gb);
    gv = direct + ek * g.ga;
    pg.gu += direct * (v - o.y);
    pg.gw += WKV_EXP(w + prev.p - g.pi) * (g.ga * prev.a + g.gb * prev.b);
    // p_t = w + p_{t-1} passes the excess on (and dp_t/dw = 1); p_t = k_t hands it to k_t. Selects, not branches, so
    // that the CPU lanes vectorize.
    const bool from_decay = exponent_from_decay(prev, w, k);
    pg.gw += from_decay ? g.excess : 0.f;
    gk += from_decay ? 0.f : g.excess;
    g.excess = from_decay ? g.excess : 0.f;
    // dL/dA_{t-1} = e^w dL/dA_t + gy/D_t ,  dL/dB_{t-1} = e^w dL/dB_t - gy y_t / D_t ; rescale to the larger exponent.
    const float from_future = w - g.pi;
    const float from_output = -o.m;
    const float top = from_future > from_output ? from_future : from_output;
    const float f1 = WKV_EXP(from_future - top);
    const float f2 = WKV_EXP(from_output - top) * q;
    g.ga = f1 * g.ga + f2;
    g.gb = f1 * g.gb - f2 * o.y;
    g.pi = -top;
}

// dL/d(initial state) once the reverse pass reached t = -1.
WKV_HD State grad_of_initial_state(const State& first, const Grad& g) {
    State d;
    const float scale = WKV_EXP(first.p - g.pi);
    d.a = g.ga * scale;
    d.b = g.gb * scale;
    d.p = d.a * first.a + d.b * first.b + g.excess;
    return d;
}

}  // namespace wkv4
