// The parts of PyTorch the kernels use, in place of <torch/extension.h>: tensors and their methods, the factory
// functions used, ATen's thread count, and operator registration (TORCH_LIBRARY). <torch/extension.h> brings in
// the whole C++ frontend and pybind11; on a 2-core VM it took 57 s to compile alone, most of each kernel's
// build, against about 10 s for these (docs/benchmarks.md, 2026-12-02, eleventh session).
#pragma once
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

namespace torch {  // the names the kernels use, as <torch/extension.h> spells them
using at::empty;
using at::empty_like;
using at::kFloat;
using at::Tensor;
using at::zeros;
}  // namespace torch
