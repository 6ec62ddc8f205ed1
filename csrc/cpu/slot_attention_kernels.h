// Interface between the PyTorch-facing file (slot_attention_cpu.cpp) and the ISA-dispatched kernels
// (slot_attention_kernels.cpp). Plain C++ only: the kernel file includes no PyTorch header.
#pragma once

#include <cstdint>

namespace eclip_kernels {
namespace cpu {

// Element type of q, k, v, out and of the q/k/v gradients. ent, S and lse are float32 (float64 for F64).
enum class ElemType : int { F32 = 0, F64 = 1, BF16 = 2 };

struct SlotAttentionArgs {
  ElemType dtype;
  int64_t B, T, N, D, Dv;
  double scale, eps;
  // Contiguous inputs (input dtype), mask (B,N) of bytes 0/1 or nullptr.
  const void* q;  // (B,T,D)
  const void* k;  // (B,N,D)
  const void* v;  // (B,N,Dv)
  const bool* mask;
  // Forward outputs, or saved forward tensors in backward (out in the input dtype; ent, S, lse in the
  // accumulation dtype).
  void* out;  // (B,T,Dv)
  void* ent;  // (B,T)
  void* S;    // (B,T)
  void* lse;  // (B,N)
  // Backward only: upstream gradients (grad_out in the input dtype, grad_ent in the accumulation dtype)
  // and the gradients written by the kernel (input dtype).
  const void* grad_out;  // (B,T,Dv)
  const void* grad_ent;  // (B,T)
  void* grad_q;          // (B,T,D)
  void* grad_k;          // (B,N,D)
  void* grad_v;          // (B,N,Dv)
};

// Process samples [b_begin, b_end). Thread safe for disjoint sample ranges (each call allocates its own
// scratch of O(token tile x (T + D + Dv) + T x (D + Dv)) elements).
void slot_attention_fwd_samples(const SlotAttentionArgs& a, int64_t b_begin, int64_t b_end);
void slot_attention_bwd_samples(const SlotAttentionArgs& a, int64_t b_begin, int64_t b_end);

// Name of the instruction set the kernels dispatch to on this machine ("avx512", "avx2", "generic").
const char* slot_attention_isa();

}  // namespace cpu
}  // namespace eclip_kernels
