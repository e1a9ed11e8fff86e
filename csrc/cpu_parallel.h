// How the elementwise CPU kernels (mix_cpu.cpp, loss_cpu.cpp) share out their rows: a static split of [0, n) into one
// contiguous part per thread, and one thread for a call too small to be worth waking the others (a decode step).
// A fixed split is also what makes per-thread partial sums, added in thread order, repeat bitwise.
#pragma once

#include <algorithm>
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace cpupar {

constexpr int64_t kParallelElements = 1 << 15;  // below this a call runs on one thread

inline int max_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

inline int threads_for(int64_t elements) {
    return elements < kParallelElements ? 1 : std::max(1, max_threads());
}

// fn(thread, begin, end) over a static split of [0, n) into `threads` contiguous parts.
template <class Fn>
void split(int64_t n, int threads, Fn fn) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int id = 0; id < threads; ++id) fn(id, n * id / threads, n * (id + 1) / threads);
}

}  // namespace cpupar
