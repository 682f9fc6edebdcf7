// Torch-side helpers shared by the CUDA bindings (csrc/cuda/*.cu): the dtype dispatch over the supported float
// types and the mapping from at:: element types to the CUDA types the kernels are instantiated for.
#ifndef RLHF_CUDA_DISPATCH_H_
#define RLHF_CUDA_DISPATCH_H_

#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace rlhf_cuda {

// at:: element type -> CUDA element type used by the kernels (same size and bit layout).
template <typename S>
struct CudaElem {
  using type = S;
};
template <>
struct CudaElem<at::BFloat16> {
  using type = __nv_bfloat16;
};
template <>
struct CudaElem<at::Half> {
  using type = __half;
};

}  // namespace rlhf_cuda

// Dispatch over float32 / bfloat16 / float16; inside, scalar_t is the at:: type. Nests (the inner scalar_t
// shadows the outer one: alias it first).
#define RLHF_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                                  \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)          \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)   \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

#endif  // RLHF_CUDA_DISPATCH_H_
