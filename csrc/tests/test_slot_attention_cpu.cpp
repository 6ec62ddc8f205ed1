// C++ test of the CPU slot-attention kernels through the dispatcher, without Python:
//  * forward (out, ent) against a float64 ATen composition of SPEC section 2, float32 and float64, masks;
//  * backward against central finite differences of a random scalar loss of (out, ent), float64.
// Exits non-zero on the first failure.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <optional>
#include <tuple>

namespace {

using Fwd = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, double, double);
using Bwd = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    double, double);

int failures = 0;

void expect(bool ok, const char* what, double value) {
  std::printf("%s %-48s %.3g\n", ok ? "ok  " : "FAIL", what, value);
  if (!ok) {
    ++failures;
  }
}

double rel_err(const at::Tensor& a, const at::Tensor& b) {
  const double denom = b.abs().max().item<double>();
  const double err = (a.to(at::kDouble) - b).abs().max().item<double>();
  return denom > 0 ? err / denom : err;
}

// Float64 reference of (out, ent), written from the definitions.
std::tuple<at::Tensor, at::Tensor> reference(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             const at::Tensor& mask, double scale, double eps) {
  auto logits = at::einsum("bnd,btd->bnt", {k, q}) * scale;
  auto m = at::softmax(logits, -1) + eps;
  m = at::where(mask.unsqueeze(-1), m, at::zeros_like(m));
  auto col = m.sum(1, true);
  auto attn = m / at::where(col > 0, col, at::ones_like(col));
  auto out = at::einsum("bnt,bnv->btv", {attn, v});
  auto safe = at::where(attn > 0, attn, at::ones_like(attn));
  auto ent = -(attn * at::log(safe)).sum(1);
  return {out, ent};
}

}  // namespace

int main() {
  at::manual_seed(0);
  auto fwd = c10::Dispatcher::singleton().findSchemaOrThrow("eclip_kernels::slot_attention_fwd", "").typed<Fwd>();
  auto bwd = c10::Dispatcher::singleton().findSchemaOrThrow("eclip_kernels::slot_attention_bwd", "").typed<Bwd>();

  const int64_t B = 3, N = 13, T = 7, D = 9, Dv = 5;
  const double eps = 1e-3;
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  auto opts = at::TensorOptions().dtype(at::kDouble);
  auto q = at::randn({B, T, D}, opts) * 2;
  auto k = at::randn({B, N, D}, opts);
  auto v = at::randn({B, N, Dv}, opts);
  auto mask = at::rand({B, N}, opts) > 0.3;
  mask.select(0, B - 1).fill_(false);  // one sample fully masked
  mask.select(1, 0).select(0, 0).fill_(true);

  auto [want_out, want_ent] = reference(q, k, v, mask, scale, eps);
  for (auto dtype : {at::kDouble, at::kFloat}) {
    auto [out, ent, col, lse] = fwd.call(q.to(dtype), k.to(dtype), v.to(dtype), mask, scale, eps);
    const double tol = dtype == at::kDouble ? 1e-12 : 1e-5;
    expect(rel_err(out, want_out) < tol, dtype == at::kDouble ? "forward out, float64" : "forward out, float32",
           rel_err(out, want_out));
    expect(rel_err(ent, want_ent) < tol, dtype == at::kDouble ? "forward ent, float64" : "forward ent, float32",
           rel_err(ent, want_ent));
    expect(out.select(0, B - 1).abs().max().item<double>() == 0, "all-masked sample: out == 0", 0);
  }

  // Backward: loss = <g_out, out> + <g_ent, ent>; gradients against central differences.
  auto g_out = at::randn({B, T, Dv}, opts);
  auto g_ent = at::randn({B, T}, opts);
  auto loss = [&](const at::Tensor& qq, const at::Tensor& kk, const at::Tensor& vv) {
    auto [o, e] = reference(qq, kk, vv, mask, scale, eps);
    return (o * g_out).sum().item<double>() + (e * g_ent).sum().item<double>();
  };
  auto [out, ent, col, lse] = fwd.call(q, k, v, mask, scale, eps);
  auto [dq, dk, dv] = bwd.call(g_out, g_ent, q, k, v, mask, out, ent, col, lse, scale, eps);
  const at::Tensor inputs[3] = {q, k, v};
  const at::Tensor grads[3] = {dq, dk, dv};
  const char* names[3] = {"backward dq vs finite differences, float64", "backward dk vs finite differences, float64",
                          "backward dv vs finite differences, float64"};
  const double h = 1e-6;
  for (int which = 0; which < 3; ++which) {
    auto numeric = at::zeros_like(inputs[which]);
    auto flat = numeric.view(-1);
    for (int64_t j = 0; j < flat.numel(); ++j) {
      at::Tensor args[3] = {q.clone(), k.clone(), v.clone()};
      args[which].view(-1)[j] += h;
      const double up = loss(args[0], args[1], args[2]);
      args[which].view(-1)[j] -= 2 * h;
      const double down = loss(args[0], args[1], args[2]);
      flat[j] = (up - down) / (2 * h);
    }
    const double err = rel_err(grads[which], numeric);
    expect(err < 1e-6, names[which], err);
  }
  std::printf("%s\n", failures == 0 ? "all passed" : "FAILED");
  return failures == 0 ? 0 : 1;
}
