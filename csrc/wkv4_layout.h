// Memory layout shared by the CPU and CUDA drivers (no torch, no CUDA headers).
//   k, v, y, gy, gk, gv : [B, T, C] contiguous, float / bf16 / fp16
//   state, g_state      : float32 [3, B, C]            planes a, b, p
//   checkpoints         : float32 [3, B, ceil(T/L), C] the state before steps 0, L, 2L, ... (L = kCheckpointEvery)
// The backward recomputes the states inside each chunk of L steps from its checkpoint, so memory is O(B T C / L)
// and there is no compile-time limit on T.
#pragma once
#include <cstdint>

#include "wkv4_core.h"

namespace wkv4 {

constexpr int kCheckpointEvery = 32;

WKV_HD int64_t num_checkpoints(int64_t T) { return (T + kCheckpointEvery - 1) / kCheckpointEvery; }

WKV_HD State load_state(const float* planes, int64_t plane, int64_t i) {
    return State{planes[i], planes[plane + i], planes[2 * plane + i]};
}

WKV_HD void store_state(float* planes, int64_t plane, int64_t i, const State& s) {
    planes[i] = s.a;
    planes[plane + i] = s.b;
    planes[2 * plane + i] = s.p;
}

}  // namespace wkv4
