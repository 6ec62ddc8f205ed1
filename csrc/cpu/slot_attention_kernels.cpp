// Slot-attention CPU kernels compiled for several instruction sets and selected at run time.
//
// slot_attention_impl.h is included once per instruction set, each time in its own namespace and, on
// x86-64, inside a `#pragma GCC target` region (GCC; with clang, `#pragma clang attribute` giving every function
// the same target attribute) opened after every library header has been included: only code of this project
// is compiled with the wider instruction set, and all of it has internal linkage.
// The generic copy is built with the baseline flags (SSE2 on x86-64, NEON on aarch64).
#include "slot_attention_kernels.h"

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>

// ---- generic (any CPU) ----
namespace eclip_kernels {
namespace cpu {
namespace isa_generic {
#define EK_VB 16
#define EK_A_IV 2
#define EK_A_RT 5
#define EK_B_RR_Q 4
#define EK_B_RR_I 4
#define EK_B_CV 3
#define EK_B_REGS 12
#include "slot_attention_impl.h"  // undefines the EK_ parameters
}  // namespace isa_generic
}  // namespace cpu
}  // namespace eclip_kernels

#if defined(__x86_64__) && defined(__GNUC__) && !defined(EK_GENERIC_ONLY)  // EK_GENERIC_ONLY: compile test of other targets
#define EK_HAVE_X86_VARIANTS 1

#if defined(__clang__)  // clang has no `#pragma GCC target`: the same target as a function attribute
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace eclip_kernels {
namespace cpu {
namespace isa_avx2 {
#define EK_VB 32
#define EK_A_IV 2
#define EK_A_RT 5
#define EK_B_RR_Q 4
#define EK_B_RR_I 4
#define EK_B_CV 3
#define EK_B_REGS 12
#include "slot_attention_impl.h"  // undefines the EK_ parameters
}  // namespace isa_avx2
}  // namespace cpu
}  // namespace eclip_kernels
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#if defined(__clang__)  // clang has no `#pragma GCC target`: the same target as a function attribute
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
#endif
namespace eclip_kernels {
namespace cpu {
namespace isa_avx512 {
#define EK_VB 64
#define EK_A_IV 4
#define EK_A_RT 5
#define EK_B_RR_Q 5
#define EK_B_RR_I 4
#define EK_B_CV 4
#define EK_B_REGS 24
#include "slot_attention_impl.h"  // undefines the EK_ parameters
}  // namespace isa_avx512
}  // namespace cpu
}  // namespace eclip_kernels
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

namespace eclip_kernels {
namespace cpu {
namespace {

enum class Isa { Generic, Avx2, Avx512 };

// The best instruction set of this CPU, or a lower one named by the environment variable
// ECLIP_KERNELS_CPU_ISA ("generic", "avx2"), used to test the other code paths on a machine with AVX-512.
Isa detect_isa() {
  const char* env = std::getenv("ECLIP_KERNELS_CPU_ISA");
  const bool want_generic = env && std::strcmp(env, "generic") == 0;
  const bool want_avx2 = env && std::strcmp(env, "avx2") == 0;
  (void)want_avx2;
  if (want_generic) return Isa::Generic;
#ifdef EK_HAVE_X86_VARIANTS
  __builtin_cpu_init();
  if (!want_avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return Isa::Avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::Avx2;
#endif
  return Isa::Generic;
}

Isa isa() {
  static const Isa value = detect_isa();
  return value;
}

}  // namespace

void slot_attention_fwd_samples(const SlotAttentionArgs& a, int64_t b_begin, int64_t b_end) {
  switch (isa()) {
#ifdef EK_HAVE_X86_VARIANTS
    case Isa::Avx512: isa_avx512::fwd_entry(a, b_begin, b_end); return;
    case Isa::Avx2: isa_avx2::fwd_entry(a, b_begin, b_end); return;
#endif
    default: isa_generic::fwd_entry(a, b_begin, b_end); return;
  }
}

void slot_attention_bwd_samples(const SlotAttentionArgs& a, int64_t b_begin, int64_t b_end) {
  switch (isa()) {
#ifdef EK_HAVE_X86_VARIANTS
    case Isa::Avx512: isa_avx512::bwd_entry(a, b_begin, b_end); return;
    case Isa::Avx2: isa_avx2::bwd_entry(a, b_begin, b_end); return;
#endif
    default: isa_generic::bwd_entry(a, b_begin, b_end); return;
  }
}

const char* slot_attention_isa() {
  switch (isa()) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "generic";
  }
}

}  // namespace cpu
}  // namespace eclip_kernels
