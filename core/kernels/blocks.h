// What int8_step.cpp uses of blocks.cpp: a layer whose weights are GGUF blocks (llama.cpp's Q4_0 ... Q6_K,
// Q8_0, F16, BF16 rows, as the file stores them), and its product.
#pragma once

#include <vector>

#include <ATen/core/Tensor.h>

namespace sol_blocks {

// GGML's type numbers (gguf's GGMLQuantizationType), the ones these kernels read.
// GROUPED + one of Q4_0 ... Q8_0: Sol's layout of the same rows in groups of 8 blocks (blocks.cpp's group()).
enum Type : int64_t {
  F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14, BF16 = 30,
  GROUPED = 1000
};

// One group of output rows, all of one type: rows x (in / block) blocks, `stride` bytes a row.
struct Part {
  const uint8_t* w;
  int64_t type, rows, stride;
};

// Checks parts (uint8 (rows, bytes) tensors) against the layer's sizes and types; they describe O rows of K.
std::vector<Part> check_parts(const std::vector<at::Tensor>& parts, const std::vector<int64_t>& types, int64_t K,
                              int64_t O);

// y (M, O) = x (M, K) W^T + bias (b may be null), W the parts' rows one after another.
void product(const float* x, int64_t M, int64_t K, const std::vector<Part>& parts, int64_t O, const float* b,
             float* y);

}  // namespace sol_blocks
