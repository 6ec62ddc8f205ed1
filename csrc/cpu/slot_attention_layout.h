// Memory layout: rows and transposed tiles loaded into the accumulation type, prefetch, per-thread scratch.
//
// Part of the slot-attention CPU kernels: included by slot_attention_impl.h once per instruction set, inside
// that copy's anonymous namespace, after the parts listed before it there. No include guard and no #include
// on purpose (see slot_attention_impl.h).

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
  constexpr int L = VT<S>::L;
#if defined(__clang__)
  // clang: constant lane indices as arguments (it has no __builtin_shuffle); the same selection as below.
  for (int a = 0; a < L; ++a) {
    if (a & H) continue;
    const V x = r[a], y = r[a + H];
    r[a] = __builtin_shufflevector(x, y, ((J & H) ? (L + J - H) : J)...);
    r[a + H] = __builtin_shufflevector(x, y, ((J & H) ? (L + J) : (J + H))...);
  }
#else
  typedef typename VT<S>::I I;
  const I lo = I{((J & H) ? (L + J - H) : J)...};
  const I hi = I{((J & H) ? (L + J) : (J + H))...};
  for (int a = 0; a < L; ++a) {
    if (a & H) continue;
    const V x = r[a], y = r[a + H];
    r[a] = __builtin_shuffle(x, y, lo);
    r[a + H] = __builtin_shuffle(x, y, hi);
  }
#endif
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
