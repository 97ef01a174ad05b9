// Shared by ops.cpp and decode.cpp: the one rounding of a + b * c that matches ATen's.
#pragma once

#include <cmath>

namespace spikegpt_cpu {

#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
constexpr bool kFusedMulAdd = true;
#else
constexpr bool kFusedMulAdd = false;
#endif

// a + b * c rounded as ATen's addcmul rounds it.
template <typename T>
inline T mul_add(T b, T c, T a) {
  if constexpr (kFusedMulAdd) {
    return std::fma(b, c, a);
  } else {
    return a + b * c;
  }
}

}  // namespace spikegpt_cpu
