// Next-token cross-entropy over logits [N, V] on CPU, with L2Wrap's extra gradient (rwkv_dist/train/loss.py has the
// formulas; its torch composition is the reference). Per row n with target t and largest logit x[a]:
//   forward:   m = max_j x[j],  lse = m + log sum_j e^(x[j] - m),  loss[n] = lse - x[t]
//   backward:  g[j] = (e^(x[j] - lse) - [j == t]) * scale + [j == a] * x[a] * extra
// with scale = dL/dloss / divisor and extra = dL/dloss * L2Wrap's factor. The forward reads each row once from memory
// (its second pass, the exponentials, finds the row in cache) and keeps 4 numbers per row; the backward reads the
// logits once and writes the gradient once. The torch composition (log_softmax, a zero-filled [N, V] buffer for
// nll_loss's backward, softmax's backward) made ~6 passes over [N, V] and ran its exponentials at a third of this
// speed: at N = 8192, V = 2048 it was ~80 ms of a ~1.3 s RWKV training step (bench/train_throughput.py).
// Storage dtypes fp32 / bf16 / fp16 converted in registers, all math fp32. NaN in a row makes its loss NaN.
#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu_simd.h"

namespace losscpu {

using wkv4cpu::kWidth;
using wkv4cpu::vf;
using wkv4cpu::vi;

constexpr float kInf = std::numeric_limits<float>::infinity();
const vi kLane = {0, 1, 2, 3, 4, 5, 6, 7};
static_assert(kWidth == 8, "kLane lists one index per lane");

// The vector at column j of a row of V, lanes past the row's end set to `fill`.
template <class F>
WKV_INLINE vf row_vector(const F* row, int64_t j, int64_t V, float fill) {
    const int64_t left = V - j;
    if (left >= kWidth) return wkv4cpu::Io<F>::load(row + j);
    const vf x = wkv4cpu::load<false>(row + j, static_cast<int>(left));
    return kLane < static_cast<int>(left) ? x : fill;
}

// Rows [r0, r1): loss, lse, the largest logit and its first index (a NaN counts as largest, as in torch.max).
template <class F>
void forward_rows(const F* logits, const int64_t* targets, int64_t V, int64_t r0, int64_t r1, float* loss, float* lse,
                  float* top, int64_t* argmax) {
    for (int64_t r = r0; r < r1; ++r) {
        const F* row = logits + r * V;
        vf best = row_vector(row, 0, V, -kInf);
        vi best_at = kLane;  // per lane: the column of its largest value so far
        for (int64_t j = kWidth; j < V; j += kWidth) {
            const vf x = row_vector(row, j, V, -kInf);
            const vi take = (x > best) | ((x != x) & (best == best));
            best = take ? x : best;
            best_at = take ? kLane + static_cast<int32_t>(j) : best_at;
        }
        float m = best[0];
        int64_t at = best_at[0];
        for (int i = 1; i < kWidth; ++i) {  // ties go to the first column; once a NaN is taken only NaNs compete
            const float b = best[i];
            const bool earlier = best_at[i] < at;
            if (m != m ? (b != b && earlier) : (b != b || b > m || (b == m && earlier))) m = b, at = best_at[i];
        }
        vf sum = {};
        for (int64_t j = 0; j < V; j += kWidth) sum += wkv4cpu::exp_lanes(row_vector(row, j, V, -kInf) - m);
        float s = 0.f;
        for (int i = 0; i < kWidth; ++i) s += sum[i];
        const float log_z = m + std::log(s);
        lse[r] = log_z;
        loss[r] = log_z - static_cast<float>(wkv4cpu::load<false>(row + targets[r], 1)[0]);
        top[r] = m;
        argmax[r] = std::min<int64_t>(at, V - 1);  // a lane past the row's end ties only on an all -inf row
    }
}

// g[j] for the 8 columns j0 .. j0 + 7 of a row (lanes past its end are computed and never stored).
WKV_INLINE vf gradient_vector(vf x, float log_z, float scale, float bonus, int64_t t, int64_t a, int64_t j0) {
    vf p = wkv4cpu::exp_lanes(x - log_z);
    p = kLane == static_cast<int32_t>(t - j0) ? p - 1.f : p;  // t - j0 outside [0, 8) matches no lane
    vf g = p * scale;
    return bonus != 0.f && kLane == static_cast<int32_t>(a - j0) ? g + bonus : g;
}

template <class F>
void backward_rows(const F* logits, const int64_t* targets, const float* lse, const float* top, const int64_t* argmax,
                   float scale, float extra, int64_t V, int64_t r0, int64_t r1, F* grad) {
    const int64_t whole = V / kWidth * kWidth;  // whole vectors take one load and one store each
    for (int64_t r = r0; r < r1; ++r) {
        const F* row = logits + r * V;
        F* out = grad + r * V;
        const float log_z = lse[r], bonus = extra != 0.f ? top[r] * extra : 0.f;
        const int64_t t = targets[r], a = argmax[r];
        for (int64_t j = 0; j < whole; j += kWidth)
            wkv4cpu::Io<F>::store(out + j, gradient_vector(wkv4cpu::Io<F>::load(row + j), log_z, scale, bonus, t, a, j));
        if (whole < V) {
            const int m = static_cast<int>(V - whole);
            const vf g = gradient_vector(wkv4cpu::load<false>(row + whole, m), log_z, scale, bonus, t, a, whole);
            wkv4cpu::store<false>(out + whole, g, m);
        }
    }
}

}  // namespace losscpu

// ---- Python-facing wrappers -----------------------------------------------------------------------------------------
#include "cpu_ops.h"
#include "cpu_parallel.h"

namespace cpuops {

using wkv4cpu::dispatch;
using wkv4cpu::ptr;

namespace {

// fn(begin, end) over the N rows, split over the threads (one thread for small calls).
template <class Fn>
void over_rows(int64_t N, int64_t V, Fn fn) {
    cpupar::split(N, cpupar::threads_for(N * V), [&](int, int64_t r0, int64_t r1) { fn(r0, r1); });
}

void check_rows(const Tensor& logits, const Tensor& targets) {
    TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.size(1) > 0,
                "cross_entropy: logits must be a contiguous [N, V] tensor with V > 0");
    TORCH_CHECK(targets.scalar_type() == at::kLong && targets.is_contiguous() && targets.dim() == 1 &&
                    targets.size(0) == logits.size(0),
                "cross_entropy: targets must be a contiguous int64 [N] tensor");
    const int64_t* t = ptr<int64_t>(targets);
    for (int64_t n = 0; n < targets.size(0); ++n)
        TORCH_CHECK_INDEX(t[n] >= 0 && t[n] < logits.size(1), "cross_entropy: target ", t[n],
                          " is out of bounds for ", logits.size(1), " classes");
}

}  // namespace

std::vector<Tensor> cross_entropy_forward(Tensor logits, Tensor targets) {
    check_rows(logits, targets);
    const int64_t N = logits.size(0), V = logits.size(1);
    const auto f32 = logits.options().dtype(at::kFloat);
    auto loss = at::empty({N}, f32), lse = at::empty({N}, f32), top = at::empty({N}, f32);
    auto argmax = at::empty({N}, targets.options());
    dispatch("cross_entropy", logits.scalar_type(), [&](auto tag) {
        using F = decltype(tag);
        over_rows(N, V, [&](int64_t r0, int64_t r1) {
            losscpu::forward_rows(ptr<F>(logits), ptr<int64_t>(targets), V, r0, r1, ptr<float>(loss), ptr<float>(lse),
                                  ptr<float>(top), ptr<int64_t>(argmax));
        });
    });
    return {loss, lse, top, argmax};
}

Tensor cross_entropy_backward(Tensor logits, Tensor targets, Tensor lse, Tensor top, Tensor argmax, double scale,
                              double extra) {
    check_rows(logits, targets);
    const int64_t N = logits.size(0), V = logits.size(1);
    for (const Tensor* row : {&lse, &top})
        TORCH_CHECK(row->scalar_type() == at::kFloat && row->is_contiguous() && row->numel() == N,
                    "cross_entropy: lse and top must be contiguous float32 [N] tensors");
    TORCH_CHECK(argmax.scalar_type() == at::kLong && argmax.is_contiguous() && argmax.numel() == N,
                "cross_entropy: argmax must be a contiguous int64 [N] tensor");
    auto grad = at::empty_like(logits);
    dispatch("cross_entropy", logits.scalar_type(), [&](auto tag) {
        using F = decltype(tag);
        over_rows(N, V, [&](int64_t r0, int64_t r1) {
            losscpu::backward_rows(ptr<F>(logits), ptr<int64_t>(targets), ptr<float>(lse), ptr<float>(top),
                                   ptr<int64_t>(argmax), static_cast<float>(scale), static_cast<float>(extra), V, r0,
                                   r1, ptr<F>(grad));
        });
    });
    return grad;
}

}  // namespace cpuops
