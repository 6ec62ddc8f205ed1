// Backward: the softmax recomputed per token tile, then dv, dk and dq, per sample.
//
// Part of the slot-attention CPU kernels: included by slot_attention_impl.h once per instruction set, inside
// that copy's anonymous namespace, after the parts listed before it there. No include guard and no #include
// on purpose (see slot_attention_impl.h).

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
