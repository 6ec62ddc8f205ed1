// Forward: softmax over queries per token, column sums, entropy and the output, per sample.
//
// Part of the slot-attention CPU kernels: included by slot_attention_impl.h once per instruction set, inside
// that copy's anonymous namespace, after the parts listed before it there. No include guard and no #include
// on purpose (see slot_attention_impl.h).

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
