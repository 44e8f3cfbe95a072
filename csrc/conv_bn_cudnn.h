// cuDNN graph-API fusion of convolution + BatchNorm (conv backend "cudnn-fused").
// Implemented in csrc/cuda/conv_bn_cudnn.cpp when the extension is built with the cuDNN
// frontend headers (FASTRES_WITH_CUDNN_FUSION); csrc/ops.cpp binds these to Python and
// registers erroring CUDA kernels when it is not.
#pragma once

#include <string>
#include <vector>

namespace fastres::cudnn_fused {

// One layer's graphs, described without tensors: kind is "forward" (prologue? -> conv ->
// genstats?), "dgrad" (conv_dgrad -> drelu of the prologue? -> dBN weight terms?), "wgrad"
// (prologue? -> conv_wgrad) or "inference" (conv -> + bias -> + residual? -> ReLU?).
// x_shape is (N, C, H, W), w_shape (K, C, R, S); dtype "float16", "bfloat16" or "float32".
struct LayerSpec {
  std::string kind;
  std::vector<int64_t> x_shape, w_shape;
  int64_t stride = 1, padding = 0;
  std::string dtype = "float16";
  bool prologue = false;  // forward/dgrad/wgrad: scale+shift(+ReLU) of the input
  bool in_relu = true;    // the prologue's ReLU
  bool stats = false;     // forward: per-channel sum and sum of squares; dgrad: dBN terms
  bool residual = false;  // inference: + residual
  bool relu = false;      // inference: ReLU
};

// Host-side: builds the graph and runs cudnn_frontend's validate() (no GPU needed).
// Returns "" when it validates, else why not.
std::string graph_check(const LayerSpec& spec);

// On the current CUDA device: builds the operation graph, its execution plans and their
// workspace (cached). Returns "" when cuDNN has an engine for it, else why not.
std::string plan_check(const LayerSpec& spec);

// The cudnn-frontend and cuDNN versions (header/runtime) this was built with.
std::string version_string();

}  // namespace fastres::cudnn_fused
