// Fused CPU kernels for SpikeGPT's two sequence operations, forward and backward, each running a whole
// (B, T, C) call in native code (the math of spikegpt/ops.py; the formulas are in spikegpt/cpu/__init__.py).
//
// Layout: contiguous (B, T, C); the B sequences are split over threads, each runs its tokens in order
// with the C channels as the inner, vectorised loop.  Sums over B (gradients of w, u and the threshold)
// are per-sequence partials added in a fixed order, so every result is independent of the thread count.
// Build flags keep IEEE arithmetic (-ffp-contract=off, no fast-math): no implicit FMA contraction, no
// reassociation, so the neuron kernel rounds exactly as the PyTorch reference does.  The build targets the
// instruction set of ATen's dispatched CPU capability (spikegpt/cpu/__init__.py), so __FMA__ is defined
// exactly where ATen's kernels run with FMA contraction; addcmul's a + b * c is then one fused multiply-add.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>

#include "mul_add.h"
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using spikegpt_cpu::mul_add;

// e^x for x <= 0 (every exponent of the WKV scan is a difference to a running maximum).  fp32: the
// Cephes polynomial (relative error ~1e-7, written so the compiler vectorises it), 0 below the normal
// range; fp64: the C library's exp.
inline float exp_nonpos(float x) {
  const float lo = -87.33654f;
  const float xc = x < lo ? lo : x;
  const float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < lo ? 0.0f : p * scale;
}
inline double exp_nonpos(double x) { return std::exp(x); }

// ------------------------------------------------------------------------------------------------
// WKV.  Per channel the state before token t is (a_t, b_t, o_t): numerator a e^o, denominator b e^o.
// ------------------------------------------------------------------------------------------------
template <typename T>
inline void wkv_forward_row(int64_t C, const T* __restrict w, const T* __restrict u, const T* __restrict k,
                            const T* __restrict v, T* __restrict y, T* __restrict a, T* __restrict b,
                            T* __restrict o, T* __restrict sa, T* __restrict sb, T* __restrict so) {
#pragma GCC ivdep
  for (int64_t c = 0; c < C; ++c) {
    const T kk = k[c], vv = v[c], aa = a[c], bb = b[c], oo = o[c];
    sa[c] = aa;
    sb[c] = bb;
    so[c] = oo;
    // y_t = (a e^o + e^{u+k} v) / (b e^o + e^{u+k}), both terms scaled by e^{-max(o, u+k)}.
    const T d1 = oo - (u[c] + kk);
    const T e = exp_nonpos(-std::abs(d1));
    const T e1 = d1 >= 0 ? T(1) : e, e2 = d1 >= 0 ? e : T(1);
    y[c] = (e1 * aa + e2 * vv) / (e1 * bb + e2);
    // state_{t+1} = e^w state_t + e^k (v, 1), rescaled to o_{t+1} = max(w + o, k).
    const T wo = w[c] + oo;
    const T d2 = wo - kk;
    const T f = exp_nonpos(-std::abs(d2));
    const T f1 = d2 >= 0 ? T(1) : f, f2 = d2 >= 0 ? f : T(1);
    a[c] = f1 * aa + f2 * vv;
    b[c] = f1 * bb + f2;
    o[c] = d2 >= 0 ? wo : kk;
  }
}

template <typename T>
inline void wkv_backward_row(int64_t C, const T* __restrict w, const T* __restrict u, const T* __restrict k,
                             const T* __restrict v, const T* __restrict gy, const T* __restrict sa,
                             const T* __restrict sb, const T* __restrict so, T* __restrict ga,
                             T* __restrict gb, T* __restrict gk, T* __restrict gv, T* __restrict gw,
                             T* __restrict gu) {
#pragma GCC ivdep
  for (int64_t c = 0; c < C; ++c) {
    const T kk = k[c], vv = v[c], aa = sa[c], bb = sb[c], oo = so[c];
    const T d1 = oo - (u[c] + kk);
    const T e = exp_nonpos(-std::abs(d1));
    const T e1 = d1 >= 0 ? T(1) : e, e2 = d1 >= 0 ? e : T(1);
    const T den = e1 * bb + e2;
    const T yy = (e1 * aa + e2 * vv) / den;
    const T d2 = w[c] + oo - kk;
    const T f = exp_nonpos(-std::abs(d2));
    const T f1 = d2 >= 0 ? T(1) : f, f2 = d2 >= 0 ? f : T(1);
    // (ga, gb): dL/d(a, b) of the state after token t, scaled by e^{o_{t+1}}.
    const T gA = ga[c], gB = gb[c];
    const T r = gy[c] / den;
    const T from_u = r * e2 * (vv - yy);
    gk[c] = from_u + (gA * vv + gB) * f2;
    gv[c] = r * e2 + gA * f2;
    gu[c] += from_u;
    gw[c] += f1 * (gA * aa + gB * bb);
    ga[c] = gA * f1 + r * e1;
    gb[c] = gB * f1 - r * e1 * yy;
  }
}

// Returns y, the final state (p, o) normalised to q = 1 (p = a / b, o = o + log b) and, for backward,
// the per-token states before each token (sa, sb, so) and the final b.
std::vector<torch::Tensor> wkv_forward(torch::Tensor w, torch::Tensor u, torch::Tensor k, torch::Tensor v,
                                       torch::Tensor p0, torch::Tensor q0, torch::Tensor o0) {
  const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
  auto y = torch::empty_like(k);
  auto sa = torch::empty_like(k), sb = torch::empty_like(k), so = torch::empty_like(k);
  auto a = p0.clone(), b = q0.clone(), o = o0.clone();
  AT_DISPATCH_FLOATING_TYPES(k.scalar_type(), "wkv_forward", [&] {
    const scalar_t *pw = w.data_ptr<scalar_t>(), *pu = u.data_ptr<scalar_t>();
    const scalar_t *pk = k.data_ptr<scalar_t>(), *pv = v.data_ptr<scalar_t>();
    scalar_t *py = y.data_ptr<scalar_t>(), *psa = sa.data_ptr<scalar_t>(), *psb = sb.data_ptr<scalar_t>(),
             *pso = so.data_ptr<scalar_t>();
    scalar_t *pa = a.data_ptr<scalar_t>(), *pb = b.data_ptr<scalar_t>(), *po = o.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t i = b0; i < b1; ++i) {
        for (int64_t t = 0; t < T; ++t) {
          const int64_t off = (i * T + t) * C;
          wkv_forward_row(C, pw, pu, pk + off, pv + off, py + off, pa + i * C, pb + i * C, po + i * C, psa + off,
                      psb + off, pso + off);
        }
      }
    });
  });
  auto p = a / b;
  auto o_out = o + torch::log(b);
  return {y, p, o_out, sa, sb, so, b};
}

// Gradients of w, u, k, v and the initial state (p0, q0, o0) from those of y and the final (p, o).
std::vector<torch::Tensor> wkv_backward(torch::Tensor w, torch::Tensor u, torch::Tensor k, torch::Tensor v,
                                        torch::Tensor p0, torch::Tensor q0, torch::Tensor sa, torch::Tensor sb,
                                        torch::Tensor so, torch::Tensor p_last, torch::Tensor b_last,
                                        torch::Tensor gy, torch::Tensor gp, torch::Tensor go) {
  const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
  auto gk = torch::empty_like(k), gv = torch::empty_like(k);
  // dL/d(a, b) of the final state, scaled by e^{o_T}: p = a / b, o_out = o + log b.
  auto ga = gp / b_last;
  auto gb = (go - gp * p_last) / b_last;
  auto gw_part = torch::zeros({B, C}, k.options()), gu_part = torch::zeros({B, C}, k.options());
  AT_DISPATCH_FLOATING_TYPES(k.scalar_type(), "wkv_backward", [&] {
    const scalar_t *pw = w.data_ptr<scalar_t>(), *pu = u.data_ptr<scalar_t>();
    const scalar_t *pk = k.data_ptr<scalar_t>(), *pv = v.data_ptr<scalar_t>(), *pgy = gy.data_ptr<scalar_t>();
    const scalar_t *psa = sa.data_ptr<scalar_t>(), *psb = sb.data_ptr<scalar_t>(), *pso = so.data_ptr<scalar_t>();
    scalar_t *pga = ga.data_ptr<scalar_t>(), *pgb = gb.data_ptr<scalar_t>();
    scalar_t *pgk = gk.data_ptr<scalar_t>(), *pgv = gv.data_ptr<scalar_t>();
    scalar_t *pgw = gw_part.data_ptr<scalar_t>(), *pgu = gu_part.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t i = b0; i < b1; ++i) {
        for (int64_t t = T - 1; t >= 0; --t) {
          const int64_t off = (i * T + t) * C;
          wkv_backward_row(C, pw, pu, pk + off, pv + off, pgy + off, psa + off, psb + off, pso + off, pga + i * C,
                       pgb + i * C, pgk + off, pgv + off, pgw + i * C, pgu + i * C);
        }
      }
    });
  });
  // The initial state is (a, b, o) = (p0, q0, o0): dL/do0 = dL/da a + dL/db b in true (unscaled) terms.
  auto go0 = ga * p0 + gb * q0;
  return {gw_part.sum(0), gu_part.sum(0), gk, gv, ga, gb, go0};
}

// ------------------------------------------------------------------------------------------------
// GIF neuron (LIF at one level).  RESET: 0 hard, 1 soft, 2 zero (v forced to 0 after every step);
// SURROGATE: 0 atan, 1 ste.  out_scale is theta (GIF: y = theta s) or 1 (LIF: y = s; 1 * s is s exactly).
// ------------------------------------------------------------------------------------------------
constexpr int kHard = 0, kSoft = 1, kZero = 2, kAtan = 0, kSte = 1;

struct NeuronConsts {
  double theta, tau, keep, c_atan, half_alpha, out_scale;  // keep = 1 - 1/tau, c_atan = pi/2 alpha
  int64_t levels;
};

// The spike count: clip(floor(h / theta), 0, L) or sign(h) min(floor(|h| / theta), L).
template <typename T, bool BIPOLAR>
inline T count_of(T h, T theta, T levels) {
  if constexpr (BIPOLAR) {
    const T n = std::floor(std::abs(h) / theta);
    return std::copysign(n > levels ? levels : n, h);
  } else {
    const T n = std::floor(h / theta);
    return n < 0 ? T(0) : (n > levels ? levels : n);
  }
}

// d/dz of arctan(pi/2 alpha z) / pi + 1/2, rounded as the reference: (alpha/2) * 1 / (1 + (z c)^2).
template <typename T>
inline T atan_sg(T z, T c, T half_alpha) {
  const T zc = z * c;
  return (T(1) / (zc * zc + T(1))) * half_alpha;
}

template <typename T, bool BIPOLAR, int RESET>
void gif_forward_seq(int64_t Tn, int64_t C, const T* x, const T* v0, T* y, T* h, T* v, const NeuronConsts& k) {
  const T theta = T(k.theta), tau = T(k.tau), levels = T(k.levels), out_scale = T(k.out_scale);
  for (int64_t c = 0; c < C; ++c) v[c] = v0[c];
  for (int64_t t = 0; t < Tn; ++t) {
    const T* __restrict xt = x + t * C;
    T* __restrict yt = y + t * C;
    T* __restrict ht = h + t * C;
    T* __restrict vv = v;  // under the zero reset, v0 before the first token and 0 after every token
    for (int64_t c = 0; c < C; ++c) {
      const T vp = vv[c];
      const T hh = vp + (xt[c] - vp) / tau;
      const T s = count_of<T, BIPOLAR>(hh, theta, levels);
      ht[c] = hh;
      yt[c] = out_scale * s;
      if constexpr (RESET == kHard) {
        vv[c] = s != 0 ? T(0) : hh;
      } else if constexpr (RESET == kSoft) {
        vv[c] = mul_add(s, -theta, hh);
      } else {
        vv[c] = T(0);
      }
    }
  }
}

template <typename T, bool BIPOLAR, int RESET, int SURROGATE>
void gif_backward_seq(int64_t Tn, int64_t C, const T* gy, const T* gvl, const T* h, T* gx, T* gv0, T* gth,
                      const NeuronConsts& k) {
  const T theta = T(k.theta), tau = T(k.tau), keep = T(k.keep), c_atan = T(k.c_atan), half_alpha = T(k.half_alpha);
  const T levels = T(k.levels), out_scale = T(k.out_scale);
  std::vector<T> g_buf(C), dsdh_buf(C), dsdth_buf(C), dvdh_buf(C), dvdth_buf(C);
  T* __restrict g_next = g_buf.data();  // dL/dh of the next token; before the last token, dL/dv_last
  for (int64_t c = 0; c < C; ++c) g_next[c] = gvl[c];
  T* __restrict ds_dh = dsdh_buf.data();
  T* __restrict ds_dth = dsdth_buf.data();
  T* __restrict dv_dh = dvdh_buf.data();
  T* __restrict dv_dth = dvdth_buf.data();
  for (int64_t t = Tn - 1; t >= 0; --t) {
    const T* __restrict gyt = gy + t * C;
    const T* __restrict ht = h + t * C;
    T* __restrict gxt = gx + t * C;
    T* __restrict gacc = gth;
    // Surrogate slopes of the count, ds/dh and ds/dtheta, summed level by level as the reference sums.
    if constexpr (SURROGATE == kSte) {
      const T top = (levels + 1) * theta;
      for (int64_t c = 0; c < C; ++c) {
        const T hh = ht[c];
        const T inside = (BIPOLAR ? std::abs(hh) < top : (hh >= 0 && hh < top)) ? T(1) : T(0);
        ds_dh[c] = inside / theta;
        ds_dth[c] = (-inside * hh) / (theta * theta);
      }
    } else {
      for (int64_t c = 0; c < C; ++c) {
        ds_dh[c] = atan_sg(ht[c] - theta, c_atan, half_alpha);
        ds_dth[c] = -ds_dh[c];
      }
      for (int64_t kl = 2; kl <= k.levels; ++kl) {
        const T at = T(kl) * theta, kt = T(kl);
        for (int64_t c = 0; c < C; ++c) {
          const T sg = atan_sg(ht[c] - at, c_atan, half_alpha);
          ds_dh[c] = ds_dh[c] + sg;
          ds_dth[c] = ds_dth[c] - kt * sg;
        }
      }
      if constexpr (BIPOLAR) {
        for (int64_t kl = 1; kl <= k.levels; ++kl) {
          const T at = T(kl) * theta, kt = T(kl);
          for (int64_t c = 0; c < C; ++c) {
            const T sg = atan_sg(ht[c] + at, c_atan, half_alpha);
            ds_dh[c] = ds_dh[c] + sg;
            ds_dth[c] = ds_dth[c] + kt * sg;
          }
        }
      }
    }
    // Per channel, the local terms: ds_dh becomes dL/dh from the spike, ds_dth the threshold gradient
    // without the membrane's term, and (dv_dh, dv_dth) the reset's slopes.
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const T hh = ht[c], gyv = gyt[c];
      const T s = count_of<T, BIPOLAR>(hh, theta, levels);
      const T gs = gyv * out_scale;
      const T from_spike = gs * ds_dh[c];
      const T th_part = gyv * s + gs * ds_dth[c];
      if constexpr (RESET == kHard) {
        // The fired indicator F = 1[s != 0], with the surrogate of the first level.
        T dF_dh, dF_dth;
        if constexpr (SURROGATE == kSte && BIPOLAR) {
          const T inside = std::abs(hh) < 2 * theta ? T(1) : T(0);
          const T sign = hh > 0 ? T(1) : (hh < 0 ? T(-1) : T(0));
          dF_dh = inside * sign / theta;
          dF_dth = (-inside * std::abs(hh)) / (theta * theta);
        } else if constexpr (SURROGATE == kSte) {
          const T inside = (hh >= 0 && hh < 2 * theta) ? T(1) : T(0);
          dF_dh = inside / theta;
          dF_dth = (-inside * hh) / (theta * theta);
        } else if constexpr (BIPOLAR) {
          const T up = atan_sg(hh - theta, c_atan, half_alpha), down = atan_sg(hh + theta, c_atan, half_alpha);
          dF_dh = up - down;
          dF_dth = -(up + down);
        } else {
          dF_dh = atan_sg(hh - theta, c_atan, half_alpha);
          dF_dth = -dF_dh;
        }
        dv_dh[c] = (T(1) - (s != 0 ? T(1) : T(0))) - hh * dF_dh;
        dv_dth[c] = -hh * dF_dth;
      } else if constexpr (RESET == kSoft) {
        dv_dh[c] = T(1) - theta * ds_dh[c];
        dv_dth[c] = -s - theta * ds_dth[c];
      }
      ds_dh[c] = from_spike;
      ds_dth[c] = th_part;
    }
    // The recurrence: dL/dv_t is the final membrane's gradient, or dL/dh_{t+1} (1 - 1/tau).
    const T to_v = t == Tn - 1 ? T(1) : keep;  // 1 * g is g exactly
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      T g = ds_dh[c], th_part = ds_dth[c];
      if constexpr (RESET != kZero) {
        const T gv_t = g_next[c] * to_v;
        g = mul_add(g_next[c], dv_dh[c] * to_v, g);
        th_part = th_part + gv_t * dv_dth[c];
      }
      g_next[c] = g;
      gxt[c] = g / tau;
      gacc[c] += th_part;
    }
  }
  for (int64_t c = 0; c < C; ++c) gv0[c] = g_next[c] * keep;
}

template <typename T, bool BIPOLAR, int RESET, int SURROGATE>
void gif_run(bool forward, int64_t B, int64_t Tn, int64_t C, const NeuronConsts& k, const T* in0, const T* in1,
             const T* in2, T* out0, T* out1, T* out2) {
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t i = b0; i < b1; ++i) {
      if (forward) {  // in: x, v0; out: y, h, v
        gif_forward_seq<T, BIPOLAR, RESET>(Tn, C, in0 + i * Tn * C, in1 + i * C, out0 + i * Tn * C,
                                           out1 + i * Tn * C, out2 + i * C, k);
      } else {  // in: gy, gv_last, h; out: gx, gv0, per-channel threshold gradient
        gif_backward_seq<T, BIPOLAR, RESET, SURROGATE>(Tn, C, in0 + i * Tn * C, in1 + i * C, in2 + i * Tn * C,
                                                       out0 + i * Tn * C, out1 + i * C, out2 + i * C, k);
      }
    }
  });
}

// The template instance for (bipolar, reset, surrogate).
template <typename T>
void gif_dispatch(bool forward, bool bipolar, int64_t reset, int64_t surrogate, int64_t B, int64_t Tn, int64_t C,
                  const NeuronConsts& k, const T* in0, const T* in1, const T* in2, T* out0, T* out1, T* out2) {
  using Fn = void (*)(bool, int64_t, int64_t, int64_t, const NeuronConsts&, const T*, const T*, const T*, T*, T*, T*);
  static const Fn table[2][3][2] = {
      {{gif_run<T, false, kHard, kAtan>, gif_run<T, false, kHard, kSte>},
       {gif_run<T, false, kSoft, kAtan>, gif_run<T, false, kSoft, kSte>},
       {gif_run<T, false, kZero, kAtan>, gif_run<T, false, kZero, kSte>}},
      {{gif_run<T, true, kHard, kAtan>, gif_run<T, true, kHard, kSte>},
       {gif_run<T, true, kSoft, kAtan>, gif_run<T, true, kSoft, kSte>},
       {gif_run<T, true, kZero, kAtan>, gif_run<T, true, kZero, kSte>}}};
  TORCH_CHECK(reset >= 0 && reset < 3 && surrogate >= 0 && surrogate < 2, "bad GIF reset/surrogate code");
  table[bipolar][reset][surrogate](forward, B, Tn, C, k, in0, in1, in2, out0, out1, out2);
}

NeuronConsts consts_of(double theta, double tau, double alpha, int64_t levels, bool scaled) {
  // Each constant rounded once from double, as the reference's Python scalars are.
  return {theta, tau, 1 - 1 / tau, M_PI / 2 * alpha, alpha / 2, scaled ? theta : 1.0, levels};
}

// Returns y (theta s, or s), the last membrane and h (saved for backward).
std::vector<torch::Tensor> gif_forward(torch::Tensor x, torch::Tensor v0, double theta, double tau, double alpha,
                                       int64_t levels, bool bipolar, int64_t reset, int64_t surrogate, bool scaled) {
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2);
  const NeuronConsts k = consts_of(theta, tau, alpha, levels, scaled);
  auto y = torch::empty_like(x), h = torch::empty_like(x), v = torch::empty_like(v0);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gif_forward", [&] {
    gif_dispatch<scalar_t>(true, bipolar, reset, surrogate, B, T, C, k, x.data_ptr<scalar_t>(),
                           v0.data_ptr<scalar_t>(), nullptr, y.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(),
                           v.data_ptr<scalar_t>());
  });
  return {y, v, h};
}

// Returns dL/dx, dL/dv0 and dL/dtheta (0-d; per-channel partials summed in fp64).
std::vector<torch::Tensor> gif_backward(torch::Tensor gy, torch::Tensor gvl, torch::Tensor h, double theta, double tau,
                                        double alpha, int64_t levels, bool bipolar, int64_t reset, int64_t surrogate,
                                        bool scaled) {
  const int64_t B = h.size(0), T = h.size(1), C = h.size(2);
  const NeuronConsts k = consts_of(theta, tau, alpha, levels, scaled);
  auto gx = torch::empty_like(h), gv0 = torch::empty({B, C}, h.options()), gth = torch::zeros({B, C}, h.options());
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "gif_backward", [&] {
    gif_dispatch<scalar_t>(false, bipolar, reset, surrogate, B, T, C, k, gy.data_ptr<scalar_t>(),
                           gvl.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(),
                           gv0.data_ptr<scalar_t>(), gth.data_ptr<scalar_t>());
  });
  return {gx, gv0, gth.to(torch::kFloat64).sum().to(h.scalar_type())};
}

// ------------------------------------------------------------------------------------------------
// Token-shift mixes: out_m = z mu_m + zs (1 - mu_m), zs_t = z_{t-1} (zs_0 = last), for M mixes of one z.
// ------------------------------------------------------------------------------------------------
template <typename T>
void mix_forward_seq(int64_t Tn, int64_t C, int64_t M, int64_t B, int64_t i, const T* z, const T* last, const T* mu,
                     const T* om, T* out) {
  for (int64_t t = 0; t < Tn; ++t) {
    const T* __restrict zt = z + (i * Tn + t) * C;
    const T* __restrict zs = t == 0 ? last + i * C : zt - C;
    for (int64_t m = 0; m < M; ++m) {
      const T* __restrict mm = mu + m * C;
      const T* __restrict oo = om + m * C;
      T* __restrict ot = out + ((m * B + i) * Tn + t) * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) ot[c] = zt[c] * mm[c] + zs[c] * oo[c];
    }
  }
}

template <typename T>
void mix_backward_seq(int64_t Tn, int64_t C, int64_t M, int64_t B, int64_t i, const T* g, const T* z, const T* last,
                      const T* mu, const T* om, T* gz, T* glast, T* gmu) {
  for (int64_t t = 0; t < Tn; ++t) {
    const T* __restrict zt = z + (i * Tn + t) * C;
    const T* __restrict zs = t == 0 ? last + i * C : zt - C;
    T* __restrict gzt = gz + (i * Tn + t) * C;
    // dL/dz_t gets g_t mu from its own token, and g_{t+1} (1 - mu) from the next token's shift.
    T* __restrict to_prev = t == 0 ? glast + i * C : gzt - C;
    for (int64_t m = 0; m < M; ++m) {
      const T* __restrict gt = g + ((m * B + i) * Tn + t) * C;
      const T* __restrict mm = mu + m * C;
      const T* __restrict oo = om + m * C;
      T* __restrict gm = gmu + (i * M + m) * C;
      const T keep_own = m == 0 ? T(0) : T(1), keep_prev = (m == 0 && t == 0) ? T(0) : T(1);
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        gzt[c] = keep_own == 0 ? gt[c] * mm[c] : gzt[c] + gt[c] * mm[c];
        to_prev[c] = keep_prev == 0 ? gt[c] * oo[c] : to_prev[c] + gt[c] * oo[c];
        gm[c] += gt[c] * (zt[c] - zs[c]);
      }
    }
  }
}

std::vector<torch::Tensor> mix_forward(torch::Tensor z, torch::Tensor last, torch::Tensor mu) {
  const int64_t B = z.size(0), T = z.size(1), C = z.size(2), M = mu.size(0);
  auto om = 1 - mu;  // rounded as the reference's (1 - mu)
  auto out = torch::empty({M, B, T, C}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "mix_forward", [&] {
    const scalar_t *pz = z.data_ptr<scalar_t>(), *pl = last.data_ptr<scalar_t>();
    const scalar_t *pmu = mu.data_ptr<scalar_t>(), *pom = om.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t i = b0; i < b1; ++i) mix_forward_seq<scalar_t>(T, C, M, B, i, pz, pl, pmu, pom, po);
    });
  });
  return {out};
}

// Returns dL/dz, dL/dlast and dL/dmu = sum over (B, T) of g (z - zs) (per-sequence partials, then in order).
std::vector<torch::Tensor> mix_backward(torch::Tensor g, torch::Tensor z, torch::Tensor last, torch::Tensor mu) {
  const int64_t B = z.size(0), T = z.size(1), C = z.size(2), M = mu.size(0);
  auto om = 1 - mu;
  auto gz = torch::empty_like(z), glast = torch::empty_like(last);
  auto gmu_part = torch::zeros({B, M, C}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "mix_backward", [&] {
    const scalar_t *pg = g.data_ptr<scalar_t>(), *pz = z.data_ptr<scalar_t>(), *pl = last.data_ptr<scalar_t>();
    const scalar_t *pmu = mu.data_ptr<scalar_t>(), *pom = om.data_ptr<scalar_t>();
    scalar_t *pgz = gz.data_ptr<scalar_t>(), *pgl = glast.data_ptr<scalar_t>(), *pgm = gmu_part.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t i = b0; i < b1; ++i) mix_backward_seq<scalar_t>(T, C, M, B, i, pg, pz, pl, pmu, pom, pgz, pgl, pgm);
    });
  });
  return {gz, glast, gmu_part.sum(0)};
}

// ------------------------------------------------------------------------------------------------
// The FFN's squared ReLU: y = r r with r = relu(x); dL/dx = 0 where r <= 0, else g (2 r) (the rounding of
// ATen's pow and threshold backward: 2 r is exact).  NaN propagates as through clamp_min.
// ------------------------------------------------------------------------------------------------
constexpr int64_t kElementwiseGrain = 1 << 15;

template <typename T>
void relu_square_range(int64_t i0, int64_t i1, const T* __restrict x, T* __restrict y) {
#pragma omp simd
  for (int64_t i = i0; i < i1; ++i) {
    const T r = x[i] < T(0) ? T(0) : x[i];
    y[i] = r * r;
  }
}

template <typename T>
void relu_square_backward_range(int64_t i0, int64_t i1, const T* __restrict g, const T* __restrict x,
                                T* __restrict gx) {
#pragma omp simd
  for (int64_t i = i0; i < i1; ++i) {
    const T r = x[i] < T(0) ? T(0) : x[i];
    gx[i] = r <= T(0) ? T(0) : g[i] * (T(2) * r);
  }
}

torch::Tensor relu_square_forward(torch::Tensor x) {
  auto y = torch::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "relu_square_forward", [&] {
    const scalar_t* px = x.data_ptr<scalar_t>();
    scalar_t* py = y.data_ptr<scalar_t>();
    at::parallel_for(0, x.numel(), kElementwiseGrain,
                     [&](int64_t i0, int64_t i1) { relu_square_range<scalar_t>(i0, i1, px, py); });
  });
  return y;
}

torch::Tensor relu_square_backward(torch::Tensor g, torch::Tensor x) {
  auto gx = torch::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "relu_square_backward", [&] {
    const scalar_t *pg = g.data_ptr<scalar_t>(), *px = x.data_ptr<scalar_t>();
    scalar_t* pgx = gx.data_ptr<scalar_t>();
    at::parallel_for(0, x.numel(), kElementwiseGrain,
                     [&](int64_t i0, int64_t i1) { relu_square_backward_range<scalar_t>(i0, i1, pg, px, pgx); });
  });
  return gx;
}

// ------------------------------------------------------------------------------------------------
// The receptance gates' backward: out = s y with s = sigmoid(a) (ATen's sigmoid, in the forward);
// dL/dy = g s, dL/da = ((g y) (1 - s)) s, rounded as ATen's mul and sigmoid_backward round them.
// ------------------------------------------------------------------------------------------------
template <typename T>
void sigmoid_gate_backward_range(int64_t i0, int64_t i1, const T* __restrict g, const T* __restrict s,
                                 const T* __restrict y, T* __restrict ga, T* __restrict gy) {
#pragma omp simd
  for (int64_t i = i0; i < i1; ++i) {
    gy[i] = g[i] * s[i];
    ga[i] = g[i] * y[i] * (T(1) - s[i]) * s[i];
  }
}

std::vector<torch::Tensor> sigmoid_gate_backward(torch::Tensor g, torch::Tensor s, torch::Tensor y) {
  auto ga = torch::empty_like(s), gy = torch::empty_like(y);
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "sigmoid_gate_backward", [&] {
    const scalar_t *pg = g.data_ptr<scalar_t>(), *ps = s.data_ptr<scalar_t>(), *py = y.data_ptr<scalar_t>();
    scalar_t *pga = ga.data_ptr<scalar_t>(), *pgy = gy.data_ptr<scalar_t>();
    at::parallel_for(0, s.numel(), kElementwiseGrain, [&](int64_t i0, int64_t i1) {
      sigmoid_gate_backward_range<scalar_t>(i0, i1, pg, ps, py, pga, pgy);
    });
  });
  return {ga, gy};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("wkv_forward", &wkv_forward);
  m.def("wkv_backward", &wkv_backward);
  m.def("gif_forward", &gif_forward);
  m.def("gif_backward", &gif_backward);
  m.def("mix_forward", &mix_forward);
  m.def("mix_backward", &mix_backward);
  m.def("relu_square_forward", &relu_square_forward);
  m.def("relu_square_backward", &relu_square_backward);
  m.def("sigmoid_gate_backward", &sigmoid_gate_backward);
}
