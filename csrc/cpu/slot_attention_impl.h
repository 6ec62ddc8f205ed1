// Slot-attention CPU kernels, written once with GCC vector extensions and compiled once per instruction
// set by slot_attention_kernels.cpp, which includes this file several times (no include guard on
// purpose), each time inside its own namespace and `#pragma GCC target` region. Everything here has
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

template <class S>
struct VT;
template <>
struct VT<float> {
  typedef float V __attribute__((vector_size(EK_VB)));
  typedef float VU __attribute__((vector_size(EK_VB), aligned(4), may_alias));
  typedef int32_t I __attribute__((vector_size(EK_VB)));
  typedef int32_t MaskInt;
  static constexpr int L = EK_VB / 4;
};
template <>
struct VT<double> {
  typedef double V __attribute__((vector_size(EK_VB)));
  typedef double VU __attribute__((vector_size(EK_VB), aligned(8), may_alias));
  typedef int64_t I __attribute__((vector_size(EK_VB)));
  typedef int64_t MaskInt;
  static constexpr int L = EK_VB / 8;
};

template <class S>
EK_INLINE typename VT<S>::V loadu(const S* p) {
  return *reinterpret_cast<const typename VT<S>::VU*>(p);
}
template <class S>
EK_INLINE void storeu(S* p, typename VT<S>::V x) {
  *reinterpret_cast<typename VT<S>::VU*>(p) = x;
}
template <class S>
EK_INLINE typename VT<S>::V bcast(S s) {
  return s - typename VT<S>::V{};  // s - (+0) == s exactly, so the compiler drops the subtraction
}

template <class X, class Y>
struct SameType {
  static constexpr bool value = false;
};
template <class X>
struct SameType<X, X> {
  static constexpr bool value = true;
};

EK_INLINE int64_t ek_min(int64_t a, int64_t b) { return a < b ? a : b; }
EK_INLINE int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ---------------------------------------------------------------------------------------------------
// exp and log. float32: Cephes-style polynomials, vectorized (exp(x) flushed to 0 below x = -87, where
// it would leave the normal range; log expects positive normal inputs). float64: the libm functions
// lane by lane.

EK_INLINE VT<float>::V vexp(VT<float>::V x) {
  typedef VT<float>::V V;
  typedef VT<float>::I I;
  const V magic = bcast(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  V xc = x < bcast(-87.0f) ? bcast(-87.0f) : x;
  xc = xc > bcast(88.3f) ? bcast(88.3f) : xc;
  const V tn = xc * bcast(1.44269504088896341f) + magic;
  const V n = tn - magic;
  const I ni = (I)tn - (I)magic;
  V r = xc - n * bcast(0.693359375f);
  r = r - n * bcast(-2.12194440e-4f);
  V p = bcast(1.9875691500e-4f);
  p = p * r + bcast(1.3981999507e-3f);
  p = p * r + bcast(8.3334519073e-3f);
  p = p * r + bcast(4.1665795894e-2f);
  p = p * r + bcast(1.6666665459e-1f);
  p = p * r + bcast(5.0000001201e-1f);
  p = p * (r * r) + r + bcast(1.0f);
  const V pow2n = (V)((ni + 127) << 23);
  const V y = p * pow2n;
  return x < bcast(-87.0f) ? V{} : y;
}

EK_INLINE VT<float>::V vlog(VT<float>::V x) {
  typedef VT<float>::V V;
  typedef VT<float>::I I;
  const I xi = (I)x;
  I e = ((xi >> 23) & 0xff) - 126;
  V m = (V)((xi & 0x007fffff) | 0x3f000000);  // in [0.5, 1)
  const I small = m < bcast(0.707106781186547524f);
  e = e + small;  // small is -1 where true
  m = small ? m + m - bcast(1.0f) : m - bcast(1.0f);
  const V ef = (V)(e + 0x4B400000) - bcast(12582912.0f);  // small int -> float via 1.5 * 2^23
  const V z = m * m;
  V y = bcast(7.0376836292e-2f);
  y = y * m + bcast(-1.1514610310e-1f);
  y = y * m + bcast(1.1676998740e-1f);
  y = y * m + bcast(-1.2420140846e-1f);
  y = y * m + bcast(1.4249322787e-1f);
  y = y * m + bcast(-1.6668057665e-1f);
  y = y * m + bcast(2.0000714765e-1f);
  y = y * m + bcast(-2.4999993993e-1f);
  y = y * m + bcast(3.3333331174e-1f);
  y = y * m * z;
  y = y + ef * bcast(-2.12194440e-4f);
  y = y - bcast(0.5f) * z;
  V res = m + y;
  res = res + ef * bcast(0.693359375f);
  return res;
}

EK_INLINE VT<double>::V vexp(VT<double>::V x) {
  VT<double>::V r;
  for (int j = 0; j < VT<double>::L; ++j) r[j] = __builtin_exp(x[j]);
  return r;
}
EK_INLINE VT<double>::V vlog(VT<double>::V x) {
  VT<double>::V r;
  for (int j = 0; j < VT<double>::L; ++j) r[j] = __builtin_log(x[j]);
  return r;
}
EK_INLINE float slog(float x) { return __builtin_logf(x); }
EK_INLINE double slog(double x) { return __builtin_log(x); }

// ---------------------------------------------------------------------------------------------------
// Element conversion. bfloat16 travels as its uint16_t bit pattern.

EK_INLINE float to_acc(float x) { return x; }
EK_INLINE double to_acc(double x) { return x; }
EK_INLINE float to_acc(uint16_t x) {
  const uint32_t u = static_cast<uint32_t>(x) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}
template <class In>
struct FromAcc;
template <>
struct FromAcc<float> {
  static EK_INLINE float cvt(float x) { return x; }
};
template <>
struct FromAcc<double> {
  static EK_INLINE double cvt(double x) { return x; }
};
template <>
struct FromAcc<uint16_t> {
  static EK_INLINE uint16_t cvt(float x) {  // round to nearest even, NaN stays NaN
    uint32_t u;
    __builtin_memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
  }
};

// dst[r*ldd + c] = mul * src[r*lds + c] for r < nr, c < nc; columns [nc, ldd) zeroed.
template <class S, class In>
void load_rows(const In* src, int64_t lds, int64_t nr, int64_t nc, S* dst, int64_t ldd, S mul) {
  for (int64_t r = 0; r < nr; ++r) {
    const In* s = src + r * lds;
    S* d = dst + r * ldd;
    for (int64_t c = 0; c < nc; ++c) d[c] = mul * to_acc(s[c]);
    for (int64_t c = nc; c < ldd; ++c) d[c] = S(0);
  }
}

// In-register transpose of an L x L block (rows r[0..L)), log2(L) stages: the stage of bit h exchanges,
// within every 2h x 2h block, the two off-diagonal h x h blocks.
template <int... J>
struct Lanes {};
template <int N, int... J>
struct MakeLanes : MakeLanes<N - 1, N - 1, J...> {};
template <int... J>
struct MakeLanes<0, J...> {
  typedef Lanes<J...> type;
};

template <class S, int H, int... J>
EK_INLINE void transpose_stage(typename VT<S>::V* r, Lanes<J...>) {
  typedef typename VT<S>::V V;
  typedef typename VT<S>::I I;
  constexpr int L = VT<S>::L;
  const I lo = I{((J & H) ? (L + J - H) : J)...};
  const I hi = I{((J & H) ? (L + J) : (J + H))...};
  for (int a = 0; a < L; ++a) {
    if (a & H) continue;
    const V x = r[a], y = r[a + H];
    r[a] = __builtin_shuffle(x, y, lo);
    r[a + H] = __builtin_shuffle(x, y, hi);
  }
}

template <class S, int H>
struct TransposeStages {
  static EK_INLINE void run(typename VT<S>::V* r) {
    transpose_stage<S, H>(r, typename MakeLanes<VT<S>::L>::type());
    TransposeStages<S, H / 2>::run(r);
  }
};
template <class S>
struct TransposeStages<S, 0> {
  static EK_INLINE void run(typename VT<S>::V*) {}
};

// Prefetch nr rows of nc elements (row stride = nc) into the cache.
template <class In>
void prefetch_rows(const In* p, int64_t nc, int64_t nr) {
  if (nr <= 0) return;
  const char* c = reinterpret_cast<const char*>(p);
  const int64_t bytes = nr * nc * static_cast<int64_t>(sizeof(In));
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 2);
}

// One row of L consecutive elements converted to the accumulation type.
template <class S>
EK_INLINE typename VT<S>::V load_cvt(const S* p) {
  return loadu(p);
}
EK_INLINE VT<float>::V load_cvt(const uint16_t* p) {
  VT<float>::I x;
  for (int j = 0; j < VT<float>::L; ++j) x[j] = static_cast<int32_t>(static_cast<uint32_t>(p[j]) << 16);
  return (VT<float>::V)x;
}

// dst[c*ldd + r] = mul * src[r*lds + c] for r < nr, c < nc; rows [nr, nr_pad) of the result zeroed
// (nr_pad <= round_up(nr, L)).
// pf (may be null): the next tile, pf_nr rows of the same layout, prefetched into the cache on the way.
template <class S, class In>
void load_transposed(const In* src, int64_t lds, int64_t nr, int64_t nc, S* dst, int64_t ldd, int64_t nr_pad,
                     S mul, const In* pf = nullptr, int64_t pf_nr = 0) {
  typedef typename VT<S>::V V;
  constexpr int L = VT<S>::L;
  const int64_t ncf = nc / L * L;
  for (int64_t r0 = 0; r0 < nr; r0 += L) {
    const int64_t nrb = ek_min(L, nr - r0);
    for (int64_t c0 = 0; c0 < ncf; c0 += L) {
      V blk[L];
      if (pf) {
        const int64_t np = ek_min(L, pf_nr - r0);
        for (int64_t j = 0; j < np; ++j) __builtin_prefetch(pf + (r0 + j) * lds + c0, 0, 2);
      }
      if (nrb == L) {
        for (int j = 0; j < L; ++j) blk[j] = load_cvt(src + (r0 + j) * lds + c0) * mul;
      } else {
        for (int j = 0; j < L; ++j) blk[j] = V{};
        for (int j = 0; j < nrb; ++j) blk[j] = load_cvt(src + (r0 + j) * lds + c0) * mul;
      }
      TransposeStages<S, L / 2>::run(blk);
      if (r0 + L <= nr_pad) {
        for (int j = 0; j < L; ++j) storeu(dst + (c0 + j) * ldd + r0, blk[j]);
      } else {
        for (int j = 0; j < L; ++j)
          for (int64_t i = 0; i < nr_pad - r0; ++i) dst[(c0 + j) * ldd + r0 + i] = blk[j][i];
      }
    }
  }
  for (int64_t c = ncf; c < nc; ++c) {
    for (int64_t r = 0; r < nr; ++r) dst[c * ldd + r] = mul * to_acc(src[r * lds + c]);
    for (int64_t r = nr; r < nr_pad; ++r) dst[c * ldd + r] = S(0);
  }
}

// ---------------------------------------------------------------------------------------------------
// ka: C[t*TI + i] = sc * sum_{d < Dn} XT[d*TI + i] * YT[d*ldy + t]; IV vectors of tokens x RT queries.
// The factor sc (the logit scale) multiplies the finished dot product, as PyTorch's scale * (k q^T) does.
// It must not be folded into an operand: rounding sc * q to the working precision adds one rounding per
// term, and with logits of magnitude ~100 the larger absolute logit error becomes a relative error of
// the softmax (and, through near ties between queries, of dq and dk).

template <class S, int IV, int RT>
void ka_block(const S* XT, const S* YT, int64_t ldy, int64_t Dn, S* C, S sc) {
  typedef typename VT<S>::V V;
  constexpr int L = VT<S>::L;
  V acc[RT][IV];
  for (int t = 0; t < RT; ++t)
    for (int v = 0; v < IV; ++v) acc[t][v] = V{};
  for (int64_t d = 0; d < Dn; ++d) {
    V x[IV];
    for (int v = 0; v < IV; ++v) x[v] = loadu(XT + d * TI + v * L);
    const S* y = YT + d * ldy;
    for (int t = 0; t < RT; ++t) {
      const V yt = bcast(y[t]);
      for (int v = 0; v < IV; ++v) acc[t][v] += x[v] * yt;
    }
  }
  const V scv = bcast(sc);
  for (int t = 0; t < RT; ++t)
    for (int v = 0; v < IV; ++v) storeu(C + t * TI + v * L, acc[t][v] * scv);
}

template <class S, int IV, int RT>
struct KaRowTail {
  static EK_INLINE void run(int64_t rem, const S* XT, const S* YT, int64_t ldy, int64_t Dn, S* C, S sc) {
    if (rem == RT)
      ka_block<S, IV, RT>(XT, YT, ldy, Dn, C, sc);
    else
      KaRowTail<S, IV, RT - 1>::run(rem, XT, YT, ldy, Dn, C, sc);
  }
};
template <class S, int IV>
struct KaRowTail<S, IV, 0> {
  static EK_INLINE void run(int64_t, const S*, const S*, int64_t, int64_t, S*, S) {}
};

template <class S, int IV>
void ka_queries(const S* XT, const S* YT, int64_t ldy, int64_t Dn, S* C, int64_t nt, S sc) {
  int64_t t0 = 0;
  for (; t0 + EK_A_RT <= nt; t0 += EK_A_RT) ka_block<S, IV, EK_A_RT>(XT, YT + t0, ldy, Dn, C + t0 * TI, sc);
  KaRowTail<S, IV, EK_A_RT - 1>::run(nt - t0, XT, YT + t0, ldy, Dn, C + t0 * TI, sc);
}

template <class S, int IV>
struct KaVecTail {
  static EK_INLINE void run(int64_t rem, const S* XT, const S* YT, int64_t ldy, int64_t Dn, S* C, int64_t nt,
                            S sc) {
    if (rem == IV)
      ka_queries<S, IV>(XT, YT, ldy, Dn, C, nt, sc);
    else
      KaVecTail<S, IV - 1>::run(rem, XT, YT, ldy, Dn, C, nt, sc);
  }
};
template <class S>
struct KaVecTail<S, 0> {
  static EK_INLINE void run(int64_t, const S*, const S*, int64_t, int64_t, S*, int64_t, S) {}
};

// nvec token vectors (nvec * L <= TI), nt queries.
template <class S>
void ka(const S* XT, const S* YT, int64_t ldy, int64_t Dn, S* C, int64_t nvec, int64_t nt, S sc) {
  constexpr int L = VT<S>::L;
  int64_t v0 = 0;
  for (; v0 + EK_A_IV <= nvec; v0 += EK_A_IV)
    ka_queries<S, EK_A_IV>(XT + v0 * L, YT, ldy, Dn, C + v0 * L, nt, sc);
  KaVecTail<S, EK_A_IV - 1>::run(nvec - v0, XT + v0 * L, YT, ldy, Dn, C + v0 * L, nt, sc);
}

// ka with float64 accumulation (float32 data): C[t*TI + i] = (float)(sc * sum_d (double)XT * (double)YT),
// the logit rounded once (error <= 1/2 ulp instead of the ~|logit| * D * 2^-24 of float32 accumulation).
template <class S>
void ka_f64acc(const S* XT, const S* YT, int64_t ldy, int64_t Dn, S* C, int64_t nvec, int64_t nt, S sc) {
  typedef typename VT<double>::V DV;
  constexpr int LD = VT<double>::L;
  typedef float HF __attribute__((vector_size(EK_VB / 2), aligned(4), may_alias));
  constexpr int NV = 4;
  const int64_t ntok = nvec * VT<S>::L;
  for (int64_t t = 0; t < nt; ++t) {
    for (int64_t i0 = 0; i0 < ntok; i0 += NV * LD) {
      const int nb = (int)ek_min(NV, (ntok - i0) / LD);
      DV acc[NV];
      for (int v = 0; v < NV; ++v) acc[v] = DV{};
      for (int64_t d = 0; d < Dn; ++d) {
        const DV y = bcast<double>((double)YT[d * ldy + t]);
        const S* x = XT + d * TI + i0;
        for (int v = 0; v < NV; ++v)
          if (v < nb) acc[v] += __builtin_convertvector(*reinterpret_cast<const HF*>(x + v * LD), DV) * y;
      }
      for (int v = 0; v < NV; ++v)
        if (v < nb)
          for (int j = 0; j < LD; ++j) C[t * TI + i0 + v * LD + j] = (S)(acc[v][j] * (double)sc);
    }
  }
}

// Logits scale * <k_i, q_t> of one tile, computed identically by the forward and the backward (the backward
// recomputes the softmax from them). float32: when some |logit| of the tile exceeds kPreciseLogit, the
// absolute rounding error of a float32 dot product (~|logit| * 2^-24 per term) becomes a relative error of
// the softmax weights that, near ties between queries, dq and dk amplify; such tiles are recomputed with
// float64 accumulation. The decision depends only on the float32 logits, so both passes take the same path.
template <class S>
void tile_logits(const S* kT, const S* qT, int64_t T, int64_t D, S* C, int64_t nvec, S sc) {
  typedef typename VT<S>::V V;
  constexpr int L = VT<S>::L;
  constexpr S kPreciseLogit = S(32);
  ka<S>(kT, qT, T, D, C, nvec, T, sc);
  if (!SameType<S, float>::value) return;
  V amax = V{};
  for (int64_t t = 0; t < T; ++t)
    for (int64_t iv = 0; iv < nvec; ++iv) {
      const V x = loadu(C + t * TI + iv * L);
      const V ax = x < V{} ? -x : x;
      amax = ax > amax ? ax : amax;
    }
  S m = S(0);
  for (int j = 0; j < L; ++j) m = amax[j] > m ? amax[j] : m;
  if (m > kPreciseLogit) ka_f64acc<S>(kT, qT, T, D, C, nvec, T, sc);
}

// ---------------------------------------------------------------------------------------------------
// kb: C[r*ldc + c] (+)= sum_{k < K} W[r*WSR + k*WSK] * Y[k*ldy + c]; RR rows x CV vectors of columns.

template <class S, int RR, int CV, int WSR, int WSK, bool ACC>
void kb_block(const S* W, const S* Y, int64_t ldy, int64_t K, S* C, int64_t ldc) {
  typedef typename VT<S>::V V;
  constexpr int L = VT<S>::L;
  V acc[RR][CV];
  for (int r = 0; r < RR; ++r)
    for (int c = 0; c < CV; ++c) acc[r][c] = ACC ? loadu(C + r * ldc + c * L) : V{};
  for (int64_t k = 0; k < K; ++k) {
    V y[CV];
    for (int c = 0; c < CV; ++c) y[c] = loadu(Y + k * ldy + c * L);
    const S* w = W + k * WSK;
    for (int r = 0; r < RR; ++r) {
      const V wr = bcast(w[r * WSR]);
      for (int c = 0; c < CV; ++c) acc[r][c] += y[c] * wr;
    }
  }
  for (int r = 0; r < RR; ++r)
    for (int c = 0; c < CV; ++c) storeu(C + r * ldc + c * L, acc[r][c]);
}

template <class S, int RR, int CV, int WSR, int WSK, bool ACC>
struct KbColTail {
  static EK_INLINE void run(int64_t rem, const S* W, const S* Y, int64_t ldy, int64_t K, S* C, int64_t ldc) {
    if (rem == CV)
      kb_block<S, RR, CV, WSR, WSK, ACC>(W, Y, ldy, K, C, ldc);
    else
      KbColTail<S, RR, CV - 1, WSR, WSK, ACC>::run(rem, W, Y, ldy, K, C, ldc);
  }
};
template <class S, int RR, int WSR, int WSK, bool ACC>
struct KbColTail<S, RR, 0, WSR, WSK, ACC> {
  static EK_INLINE void run(int64_t, const S*, const S*, int64_t, int64_t, S*, int64_t) {}
};

template <class S, int RR, int WSR, int WSK, bool ACC>
void kb_cols(const S* W, const S* Y, int64_t ldy, int64_t K, S* C, int64_t ldc, int64_t ncv) {
  constexpr int L = VT<S>::L;
  constexpr int CV = EK_B_REGS / RR < EK_B_CV ? EK_B_REGS / RR : EK_B_CV;
  int64_t c0 = 0;
  for (; c0 + CV <= ncv; c0 += CV)
    kb_block<S, RR, CV, WSR, WSK, ACC>(W, Y + c0 * L, ldy, K, C + c0 * L, ldc);
  KbColTail<S, RR, CV - 1, WSR, WSK, ACC>::run(ncv - c0, W, Y + c0 * L, ldy, K, C + c0 * L, ldc);
}

template <class S, int RR, int WSR, int WSK, bool ACC>
struct KbRowTail {
  static EK_INLINE void run(int64_t rem, const S* W, const S* Y, int64_t ldy, int64_t K, S* C, int64_t ldc,
                            int64_t ncv) {
    if (rem == RR)
      kb_cols<S, RR, WSR, WSK, ACC>(W, Y, ldy, K, C, ldc, ncv);
    else
      KbRowTail<S, RR - 1, WSR, WSK, ACC>::run(rem, W, Y, ldy, K, C, ldc, ncv);
  }
};
template <class S, int WSR, int WSK, bool ACC>
struct KbRowTail<S, 0, WSR, WSK, ACC> {
  static EK_INLINE void run(int64_t, const S*, const S*, int64_t, int64_t, S*, int64_t, int64_t) {}
};

// RR rows per register block (the columns per block follow from the register budget EK_B_REGS).
template <class S, int RR, int WSR, int WSK, bool ACC>
void kb(const S* W, const S* Y, int64_t ldy, int64_t K, S* C, int64_t ldc, int64_t nrows, int64_t ncv) {
  int64_t r0 = 0;
  for (; r0 + RR <= nrows; r0 += RR) kb_cols<S, RR, WSR, WSK, ACC>(W + r0 * WSR, Y, ldy, K, C + r0 * ldc, ldc, ncv);
  KbRowTail<S, RR - 1, WSR, WSK, ACC>::run(nrows - r0, W + r0 * WSR, Y, ldy, K, C + r0 * ldc, ldc, ncv);
}

// ---------------------------------------------------------------------------------------------------
// Scratch: one block per thread, carved into 64-byte aligned arrays.

struct Carver {
  char* p;
  template <class X>
  X* take(int64_t n) {
    X* r = reinterpret_cast<X*>(p);
    p += round_up(n * static_cast<int64_t>(sizeof(X)), 64);
    return r;
  }
};

struct ScratchBlock {
  void* base = nullptr;
  explicit ScratchBlock(int64_t bytes) {
    base = __builtin_malloc(static_cast<size_t>(bytes + 64));
  }
  ~ScratchBlock() { __builtin_free(base); }
  char* aligned() const {
    const uintptr_t u = reinterpret_cast<uintptr_t>(base);
    return reinterpret_cast<char*>((u + 63) & ~static_cast<uintptr_t>(63));
  }
};

// ---------------------------------------------------------------------------------------------------
// Forward.

template <class S, class In>
void fwd_range(const eclip_kernels::cpu::SlotAttentionArgs& a, int64_t b0, int64_t b1) {
  typedef typename VT<S>::V V;
  typedef typename VT<S>::I I;
  typedef typename VT<S>::MaskInt MI;
  constexpr int L = VT<S>::L;
  const int64_t T = a.T, N = a.N, D = a.D, Dv = a.Dv;
  const int64_t Dvp = round_up(Dv, L);
  const S scale = static_cast<S>(a.scale), eps = static_cast<S>(a.eps);

  int64_t bytes = 0;
  auto sz = [&](int64_t n) { bytes += round_up(n * static_cast<int64_t>(sizeof(S)), 64); };
  sz(D * T); sz(D * TI); sz(TI * Dvp); sz(T * TI); sz(T * L); sz(T * L); sz(T * Dvp); sz(TI); sz(TI);
  ScratchBlock block(bytes);
  Carver cv{block.aligned()};
  S* qT = cv.take<S>(D * T);
  S* kT = cv.take<S>(D * TI);
  S* vrows = cv.take<S>(TI * Dvp);
  S* Lb = cv.take<S>(T * TI);
  S* Sacc = cv.take<S>(T * L);
  S* Hacc = cv.take<S>(T * L);
  S* oacc = cv.take<S>(T * Dvp);
  MI* mtile = cv.take<MI>(TI);
  S* lset = cv.take<S>(TI);

  const In* q = static_cast<const In*>(a.q);
  const In* k = static_cast<const In*>(a.k);
  const In* v = static_cast<const In*>(a.v);
  In* out = static_cast<In*>(a.out);
  S* ent = static_cast<S*>(a.ent);
  S* Sout = static_cast<S*>(a.S);
  S* lse = static_cast<S*>(a.lse);

  for (int64_t b = b0; b < b1; ++b) {
    load_transposed(q + b * T * D, D, T, D, qT, T, T, S(1));  // unscaled: ka applies the scale
    for (int64_t j = 0; j < T * L; ++j) Sacc[j] = Hacc[j] = S(0);
    for (int64_t j = 0; j < T * Dvp; ++j) oacc[j] = S(0);

    for (int64_t i0 = 0; i0 < N; i0 += TI) {
      const int64_t ni = ek_min(TI, N - i0);
      const int64_t nv = (ni + L - 1) / L;
      const int64_t nip = nv * L;
      const int64_t row = b * N + i0;                        // first token row of this tile
      const int64_t pf_nr = ek_min(TI, b1 * N - (row + ni));  // rows of the next tile in this range
      load_transposed(k + row * D, D, ni, D, kT, TI, nip, S(1), pf_nr > 0 ? k + (row + ni) * D : nullptr, pf_nr);
      prefetch_rows(v + (row + ni) * Dv, Dv, pf_nr);
      const S* vy = vrows;
      int64_t ldv = Dvp;
      if (SameType<S, In>::value && Dv % L == 0) {  // rows used in place
        vy = reinterpret_cast<const S*>(v + (b * N + i0) * Dv);
        ldv = Dv;
      } else {
        load_rows(v + (b * N + i0) * Dv, Dv, ni, Dv, vrows, Dvp, S(1));
      }
      const bool* mk = a.mask ? a.mask + b * N + i0 : nullptr;
      for (int64_t i = 0; i < nip; ++i) mtile[i] = (i < ni && (!mk || mk[i])) ? MI(1) : MI(0);

      tile_logits<S>(kT, qT, T, D, Lb, nv, scale);  // logits = scale * <k, q>

      // Softmax over the queries of each token, m = M + eps, column sums and sum m log m.
      for (int64_t iv = 0; iv < nv; ++iv) {
        S* lp = Lb + iv * L;
        V mx = loadu(lp);
        for (int64_t t = 1; t < T; ++t) {
          const V x = loadu(lp + t * TI);
          mx = x > mx ? x : mx;
        }
        V sum = V{};
        for (int64_t t = 0; t < T; ++t) {
          const V e = vexp(loadu(lp + t * TI) - mx);
          storeu(lp + t * TI, e);
          sum += e;
        }
        const V inv = bcast(S(1)) / sum;
        const I valid = *reinterpret_cast<const I*>(mtile + iv * L) != 0;
        const V lsev = mx + vlog(sum);
        storeu(lset + iv * L, valid ? lsev : V{});
        for (int64_t t = 0; t < T; ++t) {
          V m = loadu(lp + t * TI) * inv + eps;
          m = valid ? m : V{};
          storeu(lp + t * TI, m);
          storeu(Sacc + t * L, loadu(Sacc + t * L) + m);
          const V mlogm = m > V{} ? m * vlog(m) : V{};
          storeu(Hacc + t * L, loadu(Hacc + t * L) + mlogm);
        }
      }
      for (int64_t i = 0; i < ni; ++i) lse[b * N + i0 + i] = lset[i];

      // out accumulator += m^T v
      kb<S, EK_B_RR_Q, TI, 1, true>(Lb, vy, ldv, ni, oacc, Dvp, T, Dvp / L);
    }

    for (int64_t t = 0; t < T; ++t) {
      S s = S(0), h = S(0);
      for (int j = 0; j < L; ++j) {
        s += Sacc[t * L + j];
        h += Hacc[t * L + j];
      }
      const S inv = s > S(0) ? S(1) / s : S(0);
      Sout[b * T + t] = s;
      ent[b * T + t] = s > S(0) ? slog(s) - h * inv : S(0);
      In* o = out + (b * T + t) * Dv;
      const S* oa = oacc + t * Dvp;
      for (int64_t c = 0; c < Dv; ++c) o[c] = FromAcc<In>::cvt(oa[c] * inv);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Backward.

template <class S, class In>
void bwd_range(const eclip_kernels::cpu::SlotAttentionArgs& a, int64_t b0, int64_t b1) {
  typedef typename VT<S>::V V;
  typedef typename VT<S>::I I;
  typedef typename VT<S>::MaskInt MI;
  constexpr int L = VT<S>::L;
  const int64_t T = a.T, N = a.N, D = a.D, Dv = a.Dv;
  const int64_t Dp = round_up(D, L), Dvp = round_up(Dv, L);
  const S scale = static_cast<S>(a.scale), eps = static_cast<S>(a.eps);

  int64_t bytes = 0;
  auto sz = [&](int64_t n) { bytes += round_up(n * static_cast<int64_t>(sizeof(S)), 64); };
  sz(T * Dp); sz(D * T); sz(T * Dvp); sz(Dv * T); sz(D * TI); sz(Dv * TI); sz(TI * Dp);
  sz(T * TI); sz(T * TI); sz(T * TI); sz(T * TI); sz(TI * Dp); sz(TI * Dvp); sz(T * Dp);
  sz(T); sz(T); sz(T); sz(T); sz(TI);
  ScratchBlock block(bytes);
  Carver cv{block.aligned()};
  S* qs = cv.take<S>(T * Dp);
  S* qT = cv.take<S>(D * T);
  S* gp = cv.take<S>(T * Dvp);
  S* gT = cv.take<S>(Dv * T);
  S* kT = cv.take<S>(D * TI);
  S* vT = cv.take<S>(Dv * TI);
  S* krows = cv.take<S>(TI * Dp);
  S* Mb = cv.take<S>(T * TI);
  S* Gb = cv.take<S>(T * TI);
  S* Ab = cv.take<S>(T * TI);
  S* DLb = cv.take<S>(T * TI);
  S* dkb = cv.take<S>(TI * Dp);
  S* dvb = cv.take<S>(TI * Dvp);
  S* dqacc = cv.take<S>(T * Dp);
  S* invS = cv.take<S>(T);
  S* logS = cv.take<S>(T);
  S* gent = cv.take<S>(T);
  S* cc = cv.take<S>(T);
  MI* mtile = cv.take<MI>(TI);

  const In* q = static_cast<const In*>(a.q);
  const In* k = static_cast<const In*>(a.k);
  const In* v = static_cast<const In*>(a.v);
  const In* out = static_cast<const In*>(a.out);
  const In* gout = static_cast<const In*>(a.grad_out);
  const S* ent = static_cast<const S*>(a.ent);
  const S* Sin = static_cast<const S*>(a.S);
  const S* gent_in = static_cast<const S*>(a.grad_ent);
  In* dq = static_cast<In*>(a.grad_q);
  In* dk = static_cast<In*>(a.grad_k);
  In* dv = static_cast<In*>(a.grad_v);

  for (int64_t b = b0; b < b1; ++b) {
    load_rows(q + b * T * D, D, T, D, qs, Dp, scale);
    load_transposed(q + b * T * D, D, T, D, qT, T, T, S(1));  // unscaled: ka applies the scale
    load_rows(gout + b * T * Dv, Dv, T, Dv, gp, Dvp, S(1));
    load_transposed(gout + b * T * Dv, Dv, T, Dv, gT, T, T, S(1));
    for (int64_t t = 0; t < T; ++t) {
      const S s = Sin[b * T + t];
      invS[t] = s > S(0) ? S(1) / s : S(0);
      logS[t] = s > S(0) ? slog(s) : S(0);
      const S ge = gent_in[b * T + t];
      gent[t] = ge;
      const In* o = out + (b * T + t) * Dv;
      const S* g = gp + t * Dvp;
      S dot = S(0);
      for (int64_t c = 0; c < Dv; ++c) dot += g[c] * to_acc(o[c]);
      cc[t] = dot + ge * (ent[b * T + t] - S(1));
    }
    for (int64_t j = 0; j < T * Dp; ++j) dqacc[j] = S(0);

    for (int64_t i0 = 0; i0 < N; i0 += TI) {
      const int64_t ni = ek_min(TI, N - i0);
      const int64_t nv = (ni + L - 1) / L;
      const int64_t nip = nv * L;
      const In* kb_ = k + (b * N + i0) * D;
      const int64_t row = b * N + i0;
      const int64_t pf_nr = ek_min(TI, b1 * N - (row + ni));
      load_transposed(kb_, D, ni, D, kT, TI, nip, S(1), pf_nr > 0 ? kb_ + ni * D : nullptr, pf_nr);
      const bool inplace_k = SameType<S, In>::value && D % L == 0;
      const bool inplace_v = SameType<S, In>::value && Dv % L == 0;
      const S* ky = krows;
      int64_t ldk = Dp;
      S* dkc = dkb;
      S* dvc = dvb;
      int64_t lddk = Dp, lddv = Dvp;
      if (inplace_k) {
        ky = reinterpret_cast<const S*>(kb_);
        ldk = D;
        dkc = reinterpret_cast<S*>(dk + (b * N + i0) * D);
        lddk = D;
      } else {
        load_rows(kb_, D, ni, D, krows, Dp, S(1));
      }
      if (inplace_v) {
        dvc = reinterpret_cast<S*>(dv + (b * N + i0) * Dv);
        lddv = Dv;
      }
      load_transposed(v + row * Dv, Dv, ni, Dv, vT, TI, nip, S(1), pf_nr > 0 ? v + (row + ni) * Dv : nullptr,
                      pf_nr);
      const bool* mk = a.mask ? a.mask + b * N + i0 : nullptr;
      for (int64_t i = 0; i < nip; ++i) mtile[i] = (i < ni && (!mk || mk[i])) ? MI(1) : MI(0);

      tile_logits<S>(kT, qT, T, D, Mb, nv, scale);  // logits = scale * <k, q>, exactly as in the forward
      ka<S>(vT, gT, T, Dv, Gb, nv, T, S(1));  // <g_out[t], v[i]>

      for (int64_t iv = 0; iv < nv; ++iv) {
        const int64_t o = iv * L;
        const I valid = *reinterpret_cast<const I*>(mtile + o) != 0;
        // The softmax over queries is recomputed exactly as the forward computed it (max-shifted, then
        // normalized), not as exp(logit - lse): with large logits, lse carries an absolute rounding error
        // of |lse| * 2^-24 that exp(logit - lse) would turn into a relative error of M.
        V mx = loadu(Mb + o);
        for (int64_t t = 1; t < T; ++t) {
          const V x = loadu(Mb + t * TI + o);
          mx = x > mx ? x : mx;
        }
        V sum = V{};
        for (int64_t t = 0; t < T; ++t) {
          const V e = vexp(loadu(Mb + t * TI + o) - mx);
          storeu(Mb + t * TI + o, e);
          sum += e;
        }
        const V inv = bcast(S(1)) / sum;
        V r = V{};
        for (int64_t t = 0; t < T; ++t) {
          const int64_t p = t * TI + o;
          V M = loadu(Mb + p) * inv;
          M = valid ? M : V{};
          const V m = valid ? M + eps : V{};
          const V is = bcast(invS[t]);
          const V lg = m > V{} ? vlog(m) - logS[t] : V{};
          const V dA = loadu(Gb + p) - gent[t] * (lg + S(1));
          V dm = (dA - cc[t]) * is;
          dm = valid ? dm : V{};
          r += M * dm;
          storeu(Mb + p, M);
          storeu(Gb + p, dm);
          storeu(Ab + p, m * is);
        }
        for (int64_t t = 0; t < T; ++t) {
          const int64_t p = t * TI + o;
          storeu(DLb + p, loadu(Mb + p) * (loadu(Gb + p) - r));
        }
      }

      kb<S, EK_B_RR_I, 1, TI, false>(Ab, gp, Dvp, T, dvc, lddv, ni, Dvp / L);  // dv = A g_out
      kb<S, EK_B_RR_I, 1, TI, false>(DLb, qs, Dp, T, dkc, lddk, ni, Dp / L);   // dk = dlogit (scale q)
      kb<S, EK_B_RR_Q, TI, 1, true>(DLb, ky, ldk, ni, dqacc, Dp, T, Dp / L);   // dq += dlogit^T k

      for (int64_t i = 0; i < ni; ++i) {
        In* dkr = dk + (b * N + i0 + i) * D;
        In* dvr = dv + (b * N + i0 + i) * Dv;
        const S* dks = dkb + i * Dp;
        const S* dvs = dvb + i * Dvp;
        if (!inplace_k)
          for (int64_t c = 0; c < D; ++c) dkr[c] = FromAcc<In>::cvt(dks[c]);
        if (!inplace_v)
          for (int64_t c = 0; c < Dv; ++c) dvr[c] = FromAcc<In>::cvt(dvs[c]);
      }
    }
    for (int64_t t = 0; t < T; ++t) {
      In* dqr = dq + (b * T + t) * D;
      const S* s = dqacc + t * Dp;
      for (int64_t c = 0; c < D; ++c) dqr[c] = FromAcc<In>::cvt(s[c] * scale);
    }
  }
}

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
