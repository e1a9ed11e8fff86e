// Torch binding of the CUDA WKV kernels (wkv4_cuda.cu): same forward/backward as the CPU binding (wkv4_cpu.cpp), plus a
// trailing `stream` argument. It includes no CUDA or ATen/cuda header, so it compiles and links against a CPU build of
// torch too (CI checks that): CPU torch ships ATen/cuda headers but not c10/cuda's generated cuda_cmake_macros.h nor
// libc10_cuda, so getCurrentCUDAStream() is out of reach. The caller therefore passes the raw cudaStream_t address
// (torch.cuda.current_stream(device).cuda_stream) and runs under torch.cuda.device(k.device), which selects the device
// the launch goes to; outputs are allocated on k's device by torch itself.
#include <torch/extension.h>

#include <cstdint>
#include <string>
#include <vector>

#include "wkv4_layout.h"

// Launchers defined in wkv4_cuda.cu (extern "C": keep these declarations in step with WKV4_DEFINE_LAUNCHERS there).
// Each returns nullptr on success, else a CUDA error message. k, v, y, gy, gk, gv have the storage dtype of the suffix.
#define WKV4_DECLARE_LAUNCHERS(SUFFIX)                                                                               \
    extern "C" const char* wkv4_cuda_forward_##SUFFIX(const float* w, const float* u, const void* k, const void* v,  \
                                                      const float* s0, void* y, float* s_out, float* ckpt, int64_t B, \
                                                      int64_t T, int64_t C, void* stream);                           \
    extern "C" const char* wkv4_cuda_backward_##SUFFIX(                                                              \
        const float* w, const float* u, const void* k, const void* v, const void* gy, const float* ckpt,              \
        const float* s_last, const float* g_last, void* gk, void* gv, float* gw, float* gu, float* g_s0, int64_t B,   \
        int64_t T, int64_t C, void* stream);

WKV4_DECLARE_LAUNCHERS(f32)
WKV4_DECLARE_LAUNCHERS(bf16)
WKV4_DECLARE_LAUNCHERS(f16)

namespace {

using ForwardFn = decltype(&wkv4_cuda_forward_f32);
using BackwardFn = decltype(&wkv4_cuda_backward_f32);

struct Launchers {
    ForwardFn forward;
    BackwardFn backward;
};

Launchers launchers_for(torch::ScalarType dtype) {
    switch (dtype) {
        case torch::kFloat: return {wkv4_cuda_forward_f32, wkv4_cuda_backward_f32};
        case torch::kBFloat16: return {wkv4_cuda_forward_bf16, wkv4_cuda_backward_bf16};
        case torch::kHalf: return {wkv4_cuda_forward_f16, wkv4_cuda_backward_f16};
        default: TORCH_CHECK(false, "wkv4 (cuda): k/v must be float32, bfloat16 or float16, got ", dtype);
    }
}

void check_launch(const char* error, const char* what) {
    TORCH_CHECK(error == nullptr, "wkv4 (cuda): launching the ", what, " kernel failed: ", error ? error : "");
}

// Shapes and dtypes are validated in rwkv_dist/ops/wkv.py before the call; the checks here only guard memory safety.
void check_inputs(const torch::Tensor& w, const torch::Tensor& u, const torch::Tensor& k, const torch::Tensor& v) {
    TORCH_CHECK(k.is_cuda(), "wkv4 (cuda): k must be a CUDA tensor, got ", k.device());
    TORCH_CHECK(k.dim() == 3 && k.sizes() == v.sizes() && k.scalar_type() == v.scalar_type(), "wkv4 (cuda): bad k/v");
    TORCH_CHECK(k.is_contiguous() && v.is_contiguous() && w.is_contiguous() && u.is_contiguous(),
                "wkv4 (cuda): not contiguous");
    TORCH_CHECK(w.scalar_type() == torch::kFloat && u.scalar_type() == torch::kFloat, "wkv4 (cuda): w/u must be float32");
    TORCH_CHECK(w.numel() == k.size(2) && u.numel() == k.size(2), "wkv4 (cuda): w/u must have C elements");
    TORCH_CHECK(k.size(0) >= 1 && k.size(1) >= 1 && k.size(2) >= 1, "wkv4 (cuda): empty k");
}

void check_state(const torch::Tensor& s, const torch::Tensor& k, const char* name) {
    TORCH_CHECK(s.device() == k.device(), "wkv4 (cuda): ", name, " is on ", s.device(), ", k on ", k.device());
    TORCH_CHECK(s.scalar_type() == torch::kFloat && s.is_contiguous() && s.numel() == 3 * k.size(0) * k.size(2),
                "wkv4 (cuda): ", name, " must be a contiguous float32 [3, B, C] tensor");
}

void check_same_device(const torch::Tensor& x, const torch::Tensor& k, const char* name) {
    TORCH_CHECK(x.device() == k.device(), "wkv4 (cuda): ", name, " is on ", x.device(), ", k on ", k.device());
}

void* as_stream(int64_t stream) { return reinterpret_cast<void*>(static_cast<intptr_t>(stream)); }

std::vector<torch::Tensor> forward(torch::Tensor w, torch::Tensor u, torch::Tensor k, torch::Tensor v, torch::Tensor s0,
                                   bool save_for_backward, int64_t stream) {
    check_inputs(w, u, k, v);
    check_same_device(w, k, "w");
    check_same_device(u, k, "u");
    check_same_device(v, k, "v");
    check_state(s0, k, "state");
    const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
    auto y = torch::empty_like(v);
    auto s_out = torch::empty({3, B, C}, s0.options());
    auto ckpt = torch::empty({3, B, save_for_backward ? wkv4::num_checkpoints(T) : 0, C}, s0.options());
    check_launch(launchers_for(k.scalar_type())
                     .forward(w.data_ptr<float>(), u.data_ptr<float>(), k.data_ptr(), v.data_ptr(),
                              s0.data_ptr<float>(), y.data_ptr(), s_out.data_ptr<float>(),
                              save_for_backward ? ckpt.data_ptr<float>() : nullptr, B, T, C, as_stream(stream)),
                 "forward");
    return {y, s_out, ckpt};
}

std::vector<torch::Tensor> backward(torch::Tensor w, torch::Tensor u, torch::Tensor k, torch::Tensor v, torch::Tensor gy,
                                    torch::Tensor ckpt, torch::Tensor s_last, torch::Tensor g_last, int64_t stream) {
    check_inputs(w, u, k, v);
    check_same_device(w, k, "w");
    check_same_device(u, k, "u");
    check_same_device(v, k, "v");
    check_same_device(gy, k, "gy");
    check_same_device(ckpt, k, "checkpoints");
    const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
    TORCH_CHECK(gy.sizes() == k.sizes() && gy.scalar_type() == k.scalar_type() && gy.is_contiguous(), "wkv4 (cuda): bad gy");
    TORCH_CHECK(ckpt.scalar_type() == torch::kFloat && ckpt.is_contiguous() &&
                    ckpt.numel() == 3 * B * wkv4::num_checkpoints(T) * C,
                "wkv4 (cuda): bad checkpoints (was the forward run with save_for_backward?)");
    check_state(s_last, k, "state");
    check_state(g_last, k, "state gradient");
    auto gk = torch::empty_like(k), gv = torch::empty_like(v);
    auto gw = torch::empty({B, C}, w.options()), gu = torch::empty({B, C}, w.options());
    auto g_s0 = torch::empty({3, B, C}, w.options());
    check_launch(launchers_for(k.scalar_type())
                     .backward(w.data_ptr<float>(), u.data_ptr<float>(), k.data_ptr(), v.data_ptr(), gy.data_ptr(),
                               ckpt.data_ptr<float>(), s_last.data_ptr<float>(), g_last.data_ptr<float>(),
                               gk.data_ptr(), gv.data_ptr(), gw.data_ptr<float>(), gu.data_ptr<float>(),
                               g_s0.data_ptr<float>(), B, T, C, as_stream(stream)),
                 "backward");
    return {gw, gu, gk, gv, g_s0};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "RWKV-4 WKV forward/backward on CUDA (one thread per (b, c) lane, fp32 math)";
    m.def("forward", &forward,
          "WKV forward: (w, u, k, v, state[3,B,C], save_for_backward, stream) -> (y, state, checkpoints); "
          "stream = torch.cuda.current_stream(device).cuda_stream, call under torch.cuda.device(k.device)",
          py::arg("w"), py::arg("u"), py::arg("k"), py::arg("v"), py::arg("state"), py::arg("save_for_backward"),
          py::arg("stream"));
    m.def("backward", &backward,
          "WKV backward: (w, u, k, v, gy, checkpoints, state_T, g_state_T, stream) -> (gw, gu, gk, gv, g_state0)",
          py::arg("w"), py::arg("u"), py::arg("k"), py::arg("v"), py::arg("gy"), py::arg("checkpoints"),
          py::arg("state"), py::arg("g_state"), py::arg("stream"));
    m.attr("checkpoint_every") = wkv4::kCheckpointEvery;
}
