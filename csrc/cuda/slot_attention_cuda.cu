// CUDA dispatch-key registrations of the eclip_kernels operators.
//
// The slot-attention CUDA kernels are not written yet: on CUDA tensors the op runs through the Triton
// backend, and `backend="cuda"` raises a clear error (eclip_kernels/backends.py). This translation unit
// keeps the CUDA half of the build (nvcc, sm_80/sm_90 code generation, linking against torch's CUDA
// libraries) compiled and linked in every CUDA build, so that it is exercised before the kernels land.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace eclip_kernels {
namespace {

// Fills x[0:n] with value. Not registered as an operator: it exists to exercise device code generation.
__global__ void fill_kernel(float* x, float value, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) {
    x[i] = value;
  }
}

[[maybe_unused]] void fill_cuda(at::Tensor& x, float value) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t n = x.numel();
  if (n == 0) {
    return;
  }
  const int threads = 256;
  const int64_t blocks = (n + threads - 1) / threads;
  fill_kernel<<<static_cast<unsigned int>(blocks), threads, 0, at::cuda::getCurrentCUDAStream()>>>(
      x.data_ptr<float>(), value, n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace eclip_kernels

TORCH_LIBRARY_IMPL(eclip_kernels, CUDA, m) {
  // No CUDA kernel is registered yet (see the comment at the top of this file).
  (void)m;
}
