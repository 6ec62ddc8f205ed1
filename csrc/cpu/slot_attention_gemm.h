// Register-blocked contractions: ka (token x query, the logits) and kb (row x feature).
//
// Part of the slot-attention CPU kernels: included by slot_attention_impl.h once per instruction set, inside
// that copy's anonymous namespace, after the parts listed before it there. No include guard and no #include
// on purpose (see slot_attention_impl.h).

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
