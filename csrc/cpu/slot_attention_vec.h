// Vector types (GCC/clang vector extensions), exp and log, element conversion.
//
// Part of the slot-attention CPU kernels: included by slot_attention_impl.h once per instruction set, inside
// that copy's anonymous namespace, after the parts listed before it there. No include guard and no #include
// on purpose (see slot_attention_impl.h).

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
