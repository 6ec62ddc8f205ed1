// CPU (dispatch key CPU) implementation of eclip_kernels::slot_attention_fwd / slot_attention_bwd.
// Checks the arguments, allocates the outputs and runs the per-sample kernels of
// slot_attention_kernels.cpp in parallel over the batch.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "slot_attention_kernels.h"

namespace eclip_kernels {
namespace {

using at::Tensor;

cpu::ElemType elem_type(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return cpu::ElemType::F32;
    case at::kDouble: return cpu::ElemType::F64;
    case at::kBFloat16: return cpu::ElemType::BF16;
    default:
      TORCH_CHECK(false, "slot_attention (CPU): q, k and v must be float32, float64 or bfloat16, got ",
                  t.scalar_type());
  }
  return cpu::ElemType::F32;
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "slot_attention (CPU): ", name, " must be a CPU tensor, got device ",
              t.device());
}

// Shared checks of q, k, v and mask; returns the contiguous mask (or an undefined tensor).
Tensor check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& mask,
                    double scale, double eps) {
  check_cpu(q, "q");
  check_cpu(k, "k");
  check_cpu(v, "v");
  TORCH_CHECK(q.dim() == 3, "slot_attention: q must have shape (B, T, D), got ", q.sizes());
  TORCH_CHECK(k.dim() == 3, "slot_attention: k must have shape (B, N, D), got ", k.sizes());
  TORCH_CHECK(v.dim() == 3, "slot_attention: v must have shape (B, N, Dv), got ", v.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "slot_attention: q, k and v must have the same dtype, got ", q.scalar_type(), ", ",
              k.scalar_type(), ", ", v.scalar_type());
  elem_type(q);
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0),
              "slot_attention: q, k and v must have the same batch size B, got q ", q.sizes(), ", k ",
              k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(k.size(2) == q.size(2), "slot_attention: k (B, N, D) and q (B, T, D) must have the same D, got q ",
              q.sizes(), " and k ", k.sizes());
  TORCH_CHECK(v.size(1) == k.size(1), "slot_attention: v (B, N, Dv) and k (B, N, D) must have the same N, got k ",
              k.sizes(), " and v ", v.sizes());
  TORCH_CHECK(scale > 0.0 && std::isfinite(scale), "slot_attention: scale must be a finite positive number, got ",
              scale);
  TORCH_CHECK(eps >= 0.0 && std::isfinite(eps), "slot_attention: eps must be finite and >= 0, got ", eps);
  Tensor m;
  if (mask.has_value() && mask->defined()) {
    check_cpu(*mask, "mask");
    TORCH_CHECK(mask->scalar_type() == at::kBool, "slot_attention: mask must be a bool tensor (True = valid token), got ",
                mask->scalar_type());
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == k.size(0) && mask->size(1) == k.size(1),
                "slot_attention: mask must have shape (B, N) = (", k.size(0), ", ", k.size(1), "), got ",
                mask->sizes());
    m = mask->contiguous();
  }
  return m;
}

void check_shape(const Tensor& t, const char* name, at::IntArrayRef expected) {
  check_cpu(t, name);
  TORCH_CHECK(t.sizes() == expected, "slot_attention_bwd: ", name, " must have shape ", expected, ", got ",
              t.sizes());
}

std::tuple<Tensor, Tensor, Tensor, Tensor> slot_attention_fwd_cpu(const Tensor& q_, const Tensor& k_,
                                                                  const Tensor& v_,
                                                                  const std::optional<Tensor>& mask_,
                                                                  double scale, double eps) {
  const Tensor mask = check_inputs(q_, k_, v_, mask_, scale, eps);
  const Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  const int64_t B = q.size(0), T = q.size(1), D = q.size(2), N = k.size(1), Dv = v.size(2);
  const auto acc = acc_type(q.scalar_type());
  Tensor out = at::empty({B, T, Dv}, q.options());
  Tensor ent = at::empty({B, T}, q.options().dtype(acc));
  Tensor S = at::empty({B, T}, q.options().dtype(acc));
  Tensor lse = at::empty({B, N}, q.options().dtype(acc));
  if (B == 0) return {out, ent, S, lse};

  cpu::SlotAttentionArgs a{};
  a.dtype = elem_type(q);
  a.B = B; a.T = T; a.N = N; a.D = D; a.Dv = Dv;
  a.scale = scale; a.eps = eps;
  a.q = q.data_ptr(); a.k = k.data_ptr(); a.v = v.data_ptr();
  a.mask = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  a.out = out.data_ptr(); a.ent = ent.data_ptr(); a.S = S.data_ptr(); a.lse = lse.data_ptr();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) { cpu::slot_attention_fwd_samples(a, b0, b1); });
  return {out, ent, S, lse};
}

std::tuple<Tensor, Tensor, Tensor> slot_attention_bwd_cpu(const Tensor& grad_out_, const Tensor& grad_ent_,
                                                          const Tensor& q_, const Tensor& k_, const Tensor& v_,
                                                          const std::optional<Tensor>& mask_, const Tensor& out_,
                                                          const Tensor& ent_, const Tensor& S_,
                                                          const Tensor& lse_, double scale, double eps) {
  const Tensor mask = check_inputs(q_, k_, v_, mask_, scale, eps);
  const int64_t B = q_.size(0), T = q_.size(1), D = q_.size(2), N = k_.size(1), Dv = v_.size(2);
  check_shape(grad_out_, "grad_out", {B, T, Dv});
  check_shape(grad_ent_, "grad_ent", {B, T});
  check_shape(out_, "out", {B, T, Dv});
  check_shape(ent_, "ent", {B, T});
  check_shape(S_, "S", {B, T});
  check_shape(lse_, "lse", {B, N});
  const auto dt = q_.scalar_type();
  const auto acc = acc_type(dt);
  for (const Tensor* t : {&grad_out_, &grad_ent_, &out_, &ent_, &S_, &lse_})
    TORCH_CHECK(at::isFloatingType(t->scalar_type()),
                "slot_attention_bwd: grad_out, grad_ent, out, ent, S and lse must be floating point, got ",
                t->scalar_type());
  const Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  const Tensor grad_out = grad_out_.to(dt).contiguous(), out = out_.to(dt).contiguous();
  const Tensor grad_ent = grad_ent_.to(acc).contiguous(), ent = ent_.to(acc).contiguous();
  const Tensor S = S_.to(acc).contiguous(), lse = lse_.to(acc).contiguous();
  Tensor grad_q = at::empty({B, T, D}, q.options());
  Tensor grad_k = at::empty({B, N, D}, q.options());
  Tensor grad_v = at::empty({B, N, Dv}, q.options());
  if (B == 0) return {grad_q, grad_k, grad_v};

  cpu::SlotAttentionArgs a{};
  a.dtype = elem_type(q);
  a.B = B; a.T = T; a.N = N; a.D = D; a.Dv = Dv;
  a.scale = scale; a.eps = eps;
  a.q = q.data_ptr(); a.k = k.data_ptr(); a.v = v.data_ptr();
  a.mask = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  a.out = out.data_ptr(); a.ent = ent.data_ptr(); a.S = S.data_ptr(); a.lse = lse.data_ptr();
  a.grad_out = grad_out.data_ptr(); a.grad_ent = grad_ent.data_ptr();
  a.grad_q = grad_q.data_ptr(); a.grad_k = grad_k.data_ptr(); a.grad_v = grad_v.data_ptr();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) { cpu::slot_attention_bwd_samples(a, b0, b1); });
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(eclip_kernels, CPU, m) {
  m.impl("slot_attention_fwd", &slot_attention_fwd_cpu);
  m.impl("slot_attention_bwd", &slot_attention_bwd_cpu);
}

}  // namespace eclip_kernels
