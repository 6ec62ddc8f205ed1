// Schemas of every eclip_kernels operator. Each backend file registers only its own dispatch key
// (TORCH_LIBRARY_IMPL); fake kernels and autograd are registered in Python (eclip_kernels/ops/).
#include <torch/library.h>

TORCH_LIBRARY(eclip_kernels, m) {
  // Slot attention with the softmax over queries (ECLIP Eq. 2-4), see SPEC section 2.
  //   q (B,T,D), k (B,N,D), v (B,N,Dv), mask (B,N) bool or None (True = valid token).
  // Returns out (B,T,Dv) in the input dtype; ent (B,T), S (B,T) and lse (B,N) in the accumulation
  // dtype (float64 for float64 inputs, float32 otherwise).
  m.def(
      "slot_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, float eps) "
      "-> (Tensor out, Tensor ent, Tensor S, Tensor lse)");
  // Gradients of q, k, v given the upstream gradients of out (B,T,Dv) and ent (B,T) and the saved
  // forward tensors. Recomputes the softmax from q, k and lse; stores nothing of size B x N x T.
  m.def(
      "slot_attention_bwd(Tensor grad_out, Tensor grad_ent, Tensor q, Tensor k, Tensor v, Tensor? mask, "
      "Tensor out, Tensor ent, Tensor S, Tensor lse, float scale, float eps) "
      "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
}
