// What int8_step.cpp uses of int8_linear.cpp: the blocked layout's tile and the product.
#pragma once

#include <ATen/core/Tensor.h>

namespace sol_int8 {

constexpr int64_t ROWS = 4, STEP = 16;   // a tile: 4 rows x 16 inputs, one 64-byte line

// y (M, O) = x (M, K) W^T * scales + bias (b may be null) for blocked W (tiles, Kp/16, 4, 16).
void product(const float* x, int64_t M, int64_t K, const int8_t* w, int64_t tiles, int64_t Kp, int64_t O,
             const float* scales, const float* b, float* y);

// Checks a layer's blocked weights, scales and bias against its sizes; the bias's data or null.
const float* check_layer(const at::Tensor& w, const at::Tensor& scales, const c10::optional<at::Tensor>& bias,
                         int64_t K, int64_t O);

}  // namespace sol_int8
