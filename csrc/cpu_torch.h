// The parts of ATen that the CPU kernels' tensor wrappers use: tensors, empty/empty_like and TORCH_CHECK. Not
// <torch/extension.h>: that header alone costs ~20 s of compiling per file (the whole C++ API) against ~3 s for
// these, and the first build of the kernels is part of a first run's wall time (make demo, CI).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
