// The tensor-level CPU ops of mix_cpu.cpp, loss_cpu.cpp and gemv_cpu.cpp, registered with Python by wkv4_cpu.cpp:
// only that file includes pybind11 and torch's Python glue (several seconds of compiling each), the others only ATen's
// tensors.
#pragma once

#include <optional>
#include <vector>

#include "cpu_torch.h"

namespace cpuops {

using at::Tensor;

// token shift + mixes: (x [B, T, D], last [B, D] or None, mu [N, D]) -> N outputs; backward -> (gx, g_last, g_mu)
std::vector<Tensor> mix_forward(Tensor x, std::optional<Tensor> last, Tensor mu);
std::vector<Tensor> mix_backward(Tensor x, std::optional<Tensor> last, Tensor mu, std::vector<Tensor> grads);
Tensor squared_relu_forward(Tensor x);                                   // max(x, 0)^2
Tensor squared_relu_backward(Tensor x, Tensor g);                        // -> gx
Tensor sigmoid_gate_forward(Tensor r, Tensor y);                         // sigmoid(r) * y
std::vector<Tensor> sigmoid_gate_backward(Tensor r, Tensor y, Tensor g);  // -> (gr, gy)
// cross-entropy rows of logits [N, V] with targets [N] -> (loss, lse, top, argmax) [N]; backward -> grad [N, V]
std::vector<Tensor> cross_entropy_forward(Tensor logits, Tensor targets);
Tensor cross_entropy_backward(Tensor logits, Tensor targets, Tensor lse, Tensor top, Tensor argmax, double scale,
                              double extra);
// y [G, B, out] = scale [G, out] * (x [G, B, in] fp32 . w [G, out, in] fp32/bf16/int8), fp32 math
Tensor gemv(Tensor x, Tensor w, std::optional<Tensor> scale);

}  // namespace cpuops
