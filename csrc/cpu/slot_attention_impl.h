// Slot-attention CPU kernels, written once with GCC vector extensions (which clang accepts too) and compiled
// once per instruction set by slot_attention_kernels.cpp, which includes this file several times (no include
// guard on purpose), each time inside its own namespace and target region. The code lives in the parts
// included below, one file per role, none with an include guard either. Everything here has
// internal linkage and calls no inline function or template from a library header, so no code compiled for
// one instruction set can be shared with (and run by) another.
//
// The including file defines, before each inclusion:
//   EK_VB                 vector width in bytes (64 AVX-512, 32 AVX2, 16 SSE2 / NEON)
//   EK_A_IV, EK_A_RT      register block of the "token x query" kernel: EK_A_IV vectors of tokens x
//                         EK_A_RT queries
//   EK_B_RR_Q, EK_B_RR_I  rows per register block of the "row x feature" kernel when rows are queries
//                         (out, dq) or tokens (dk, dv)
//   EK_B_CV, EK_B_REGS    at most EK_B_CV vectors of features per block and at most EK_B_REGS accumulators
//
// Per sample and per tile of TI tokens the kernels keep every (token, query) quantity in a T x TI array
// with the tokens contiguous, so the softmax over the queries of a token and all elementwise backward
// terms are vectorized over tokens. Contractions:
//   ka: C[t][i]  = sum_d XT[d][i] * YT[d][t]          (logits from kT/qT, <g_out, v> from vT/gT)
//   kb: C[r][:] (+)= sum_k W(r,k) * Y[k][:]          (out, dq: r = query; dk, dv: r = token)

namespace {

constexpr int TI = 64;  // tokens per tile

#define EK_INLINE inline __attribute__((always_inline))

// The parts, in dependency order (each file holds one role; none has an include guard).
#include "slot_attention_vec.h"     // vector types, exp/log, element conversion
#include "slot_attention_layout.h"  // loads, in-register transposes, prefetch, scratch
#include "slot_attention_gemm.h"    // ka / kb contractions, tile logits
#include "slot_attention_fwd.h"     // forward per sample
#include "slot_attention_bwd.h"     // backward per sample

// Entry points of this instruction set.
void fwd_entry(const eclip_kernels::cpu::SlotAttentionArgs& a, int64_t b0, int64_t b1) {
  using eclip_kernels::cpu::ElemType;
  switch (a.dtype) {
    case ElemType::F32: fwd_range<float, float>(a, b0, b1); break;
    case ElemType::F64: fwd_range<double, double>(a, b0, b1); break;
    case ElemType::BF16: fwd_range<float, uint16_t>(a, b0, b1); break;
  }
}
void bwd_entry(const eclip_kernels::cpu::SlotAttentionArgs& a, int64_t b0, int64_t b1) {
  using eclip_kernels::cpu::ElemType;
  switch (a.dtype) {
    case ElemType::F32: bwd_range<float, float>(a, b0, b1); break;
    case ElemType::F64: bwd_range<double, double>(a, b0, b1); break;
    case ElemType::BF16: bwd_range<float, uint16_t>(a, b0, b1); break;
  }
}

#undef EK_INLINE

}  // namespace

// The parameters of this copy (defined by the includer) end here, so the next copy can set its own.
#undef EK_VB
#undef EK_A_IV
#undef EK_A_RT
#undef EK_B_RR_Q
#undef EK_B_RR_I
#undef EK_B_CV
#undef EK_B_REGS
