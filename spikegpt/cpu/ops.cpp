// Fused CPU kernels for SpikeGPT's two sequence operations, forward and backward, each running a whole
// (B, T, C) call in native code (the math of spikegpt/ops.py; the formulas are in spikegpt/cpu/__init__.py).
//
// Layout: contiguous (B, T, C); the B sequences are split over threads, each runs its tokens in order
// with the C channels as the inner, vectorised loop.  Sums over B (gradients of w, u and the threshold)
// are per-sequence partials added in a fixed order, so every result is independent of the thread count.
// Build flags keep IEEE arithmetic (-ffp-contract=off, no fast-math): no FMA contraction, no
// reassociation, so the neuron kernel rounds exactly as the PyTorch reference does.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define SPIKEGPT_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SPIKEGPT_CLONES
#endif

namespace {

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

SPIKEGPT_CLONES void wkv_forward_row_f(int64_t C, const float* w, const float* u, const float* k, const float* v,
                                       float* y, float* a, float* b, float* o, float* sa, float* sb, float* so) {
  wkv_forward_row<float>(C, w, u, k, v, y, a, b, o, sa, sb, so);
}
SPIKEGPT_CLONES void wkv_backward_row_f(int64_t C, const float* w, const float* u, const float* k, const float* v,
                                        const float* gy, const float* sa, const float* sb, const float* so,
                                        float* ga, float* gb, float* gk, float* gv, float* gw, float* gu) {
  wkv_backward_row<float>(C, w, u, k, v, gy, sa, sb, so, ga, gb, gk, gv, gw, gu);
}
inline void forward_row(int64_t C, const float* w, const float* u, const float* k, const float* v, float* y,
                        float* a, float* b, float* o, float* sa, float* sb, float* so) {
  wkv_forward_row_f(C, w, u, k, v, y, a, b, o, sa, sb, so);
}
inline void forward_row(int64_t C, const double* w, const double* u, const double* k, const double* v, double* y,
                        double* a, double* b, double* o, double* sa, double* sb, double* so) {
  wkv_forward_row<double>(C, w, u, k, v, y, a, b, o, sa, sb, so);
}
inline void backward_row(int64_t C, const float* w, const float* u, const float* k, const float* v, const float* gy,
                         const float* sa, const float* sb, const float* so, float* ga, float* gb, float* gk,
                         float* gv, float* gw, float* gu) {
  wkv_backward_row_f(C, w, u, k, v, gy, sa, sb, so, ga, gb, gk, gv, gw, gu);
}
inline void backward_row(int64_t C, const double* w, const double* u, const double* k, const double* v,
                         const double* gy, const double* sa, const double* sb, const double* so, double* ga,
                         double* gb, double* gk, double* gv, double* gw, double* gu) {
  wkv_backward_row<double>(C, w, u, k, v, gy, sa, sb, so, ga, gb, gk, gv, gw, gu);
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
          forward_row(C, pw, pu, pk + off, pv + off, py + off, pa + i * C, pb + i * C, po + i * C, psa + off,
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
          backward_row(C, pw, pu, pk + off, pv + off, pgy + off, psa + off, psb + off, pso + off, pga + i * C,
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
// GIF neuron (LIF at one level).  reset: 0 hard, 1 soft, 2 zero (v forced to 0 after every step);
// surrogate: 0 atan, 1 ste; scaled: output theta * s (GIF) or s (LIF).
// ------------------------------------------------------------------------------------------------
struct NeuronConsts {
  int64_t levels;
  bool bipolar;
  int reset, surrogate;
  bool scaled;
  bool fma;  // round a + b * c as one fused multiply-add, as ATen's addcmul does where the CPU has FMA
};

template <typename T>
inline T mul_add(T b, T c, T a, bool fused) {
  return fused ? std::fma(b, c, a) : a + b * c;
}

// The spike count: clip(floor(h / theta), 0, L) or sign(h) min(floor(|h| / theta), L).
template <typename T>
inline T count_of(T h, T theta, T levels, bool bipolar) {
  if (bipolar) {
    const T n = std::floor(std::abs(h) / theta);
    return std::copysign(n > levels ? levels : n, h);
  }
  const T n = std::floor(h / theta);
  return n < 0 ? T(0) : (n > levels ? levels : n);
}

// d/dz of arctan(pi/2 alpha z) / pi + 1/2, rounded as the reference: (alpha/2) * 1 / (1 + (z c)^2).
template <typename T>
inline T atan_sg(T z, T c, T half_alpha) {
  const T zc = z * c;
  return (T(1) / (zc * zc + T(1))) * half_alpha;
}

template <typename T>
void gif_forward_seq(int64_t Tn, int64_t C, const T* x, const T* v0, T* y, T* h, T* v, T theta, T tau,
                     const NeuronConsts& nc) {
  const T levels = T(nc.levels);
  for (int64_t c = 0; c < C; ++c) v[c] = v0[c];
  for (int64_t t = 0; t < Tn; ++t) {
    const T* xt = x + t * C;
    T *yt = y + t * C, *ht = h + t * C;
    const bool carried = !(nc.reset == 2 && t > 0);
#pragma GCC ivdep
    for (int64_t c = 0; c < C; ++c) {
      const T vp = carried ? v[c] : T(0);
      const T hh = vp + (xt[c] - vp) / tau;
      const T s = count_of(hh, theta, levels, nc.bipolar);
      ht[c] = hh;
      yt[c] = nc.scaled ? theta * s : s;
      v[c] = nc.reset == 0 ? (s != 0 ? T(0) : hh) : (nc.reset == 1 ? mul_add(s, -theta, hh, nc.fma) : T(0));
    }
  }
}

template <typename T>
void gif_backward_seq(int64_t Tn, int64_t C, const T* gy, const T* gvl, const T* h, T* gx, T* gv0, T* gth, T theta,
                      T tau, T keep, T c_atan, T half_alpha, const NeuronConsts& nc) {
  const T levels = T(nc.levels);
  std::vector<T> g_next(C);  // dL/dh of the next token
  for (int64_t t = Tn - 1; t >= 0; --t) {
    const T *gyt = gy + t * C, *ht = h + t * C;
    T* gxt = gx + t * C;
    const bool last = t == Tn - 1;
#pragma GCC ivdep
    for (int64_t c = 0; c < C; ++c) {
      const T hh = ht[c], gyv = gyt[c];
      const T s = count_of(hh, theta, levels, nc.bipolar);
      const T gs = nc.scaled ? gyv * theta : gyv;
      // Surrogate slopes of the count: ds/dh, ds/dtheta.
      T ds_dh, ds_dth;
      if (nc.surrogate == 1) {
        const T top = (levels + 1) * theta;
        const T inside = (nc.bipolar ? std::abs(hh) < top : (hh >= 0 && hh < top)) ? T(1) : T(0);
        ds_dh = inside / theta;
        ds_dth = (-inside * hh) / (theta * theta);
      } else {
        ds_dh = atan_sg(hh - theta, c_atan, half_alpha);
        ds_dth = -ds_dh;
        for (int64_t kl = 2; kl <= nc.levels; ++kl) {
          const T sg = atan_sg(hh - T(kl) * theta, c_atan, half_alpha);
          ds_dh = ds_dh + sg;
          ds_dth = ds_dth - T(kl) * sg;
        }
        if (nc.bipolar) {
          for (int64_t kl = 1; kl <= nc.levels; ++kl) {
            const T sg = atan_sg(hh + T(kl) * theta, c_atan, half_alpha);
            ds_dh = ds_dh + sg;
            ds_dth = ds_dth + T(kl) * sg;
          }
        }
      }
      const T from_spike = gs * ds_dh;
      T g, th_part;
      if (nc.reset == 2) {
        g = from_spike;
        th_part = gyv * s + gs * ds_dth;
      } else {
        T dv_dh, dv_dth;
        if (nc.reset == 0) {
          // The fired indicator F = 1[s != 0] and its surrogate (the first level).
          T dF_dh, dF_dth;
          if (nc.surrogate == 1) {
            const T top = 2 * theta;
            if (nc.bipolar) {
              const T inside = std::abs(hh) < top ? T(1) : T(0);
              const T sign = hh > 0 ? T(1) : (hh < 0 ? T(-1) : T(0));
              dF_dh = inside * sign / theta;
              dF_dth = (-inside * std::abs(hh)) / (theta * theta);
            } else {
              const T inside = (hh >= 0 && hh < top) ? T(1) : T(0);
              dF_dh = inside / theta;
              dF_dth = (-inside * hh) / (theta * theta);
            }
          } else if (nc.bipolar) {
            const T up = atan_sg(hh - theta, c_atan, half_alpha), down = atan_sg(hh + theta, c_atan, half_alpha);
            dF_dh = up - down;
            dF_dth = -(up + down);
          } else {
            dF_dh = atan_sg(hh - theta, c_atan, half_alpha);
            dF_dth = -dF_dh;
          }
          dv_dh = (T(1) - (s != 0 ? T(1) : T(0))) - hh * dF_dh;
          dv_dth = -hh * dF_dth;
        } else {
          dv_dh = T(1) - theta * ds_dh;
          dv_dth = -s - theta * ds_dth;
        }
        // dL/dv_t: the final membrane's gradient, or dL/dh_{t+1} (1 - 1/tau).
        const T gv_t = last ? gvl[c] : g_next[c] * keep;
        g = last ? mul_add(gvl[c], dv_dh, from_spike, nc.fma) : mul_add(g_next[c], dv_dh * keep, from_spike, nc.fma);
        th_part = gyv * s + gs * ds_dth + gv_t * dv_dth;
      }
      g_next[c] = g;
      gxt[c] = g / tau;
      gth[c] += th_part;
    }
  }
  for (int64_t c = 0; c < C; ++c) gv0[c] = g_next[c] * keep;
}

SPIKEGPT_CLONES void gif_forward_seq_f(int64_t Tn, int64_t C, const float* x, const float* v0, float* y, float* h,
                                       float* v, float theta, float tau, const NeuronConsts& nc) {
  gif_forward_seq<float>(Tn, C, x, v0, y, h, v, theta, tau, nc);
}
SPIKEGPT_CLONES void gif_backward_seq_f(int64_t Tn, int64_t C, const float* gy, const float* gvl, const float* h,
                                        float* gx, float* gv0, float* gth, float theta, float tau, float keep,
                                        float c_atan, float half_alpha, const NeuronConsts& nc) {
  gif_backward_seq<float>(Tn, C, gy, gvl, h, gx, gv0, gth, theta, tau, keep, c_atan, half_alpha, nc);
}
inline void forward_seq(int64_t Tn, int64_t C, const float* x, const float* v0, float* y, float* h, float* v,
                        float theta, float tau, const NeuronConsts& nc) {
  gif_forward_seq_f(Tn, C, x, v0, y, h, v, theta, tau, nc);
}
inline void forward_seq(int64_t Tn, int64_t C, const double* x, const double* v0, double* y, double* h, double* v,
                        double theta, double tau, const NeuronConsts& nc) {
  gif_forward_seq<double>(Tn, C, x, v0, y, h, v, theta, tau, nc);
}
inline void backward_seq(int64_t Tn, int64_t C, const float* gy, const float* gvl, const float* h, float* gx,
                         float* gv0, float* gth, float theta, float tau, float keep, float c_atan, float half_alpha,
                         const NeuronConsts& nc) {
  gif_backward_seq_f(Tn, C, gy, gvl, h, gx, gv0, gth, theta, tau, keep, c_atan, half_alpha, nc);
}
inline void backward_seq(int64_t Tn, int64_t C, const double* gy, const double* gvl, const double* h, double* gx,
                         double* gv0, double* gth, double theta, double tau, double keep, double c_atan,
                         double half_alpha, const NeuronConsts& nc) {
  gif_backward_seq<double>(Tn, C, gy, gvl, h, gx, gv0, gth, theta, tau, keep, c_atan, half_alpha, nc);
}

// Returns y (theta s, or s), the last membrane and h (saved for backward).
std::vector<torch::Tensor> gif_forward(torch::Tensor x, torch::Tensor v0, double theta, double tau, int64_t levels,
                                       bool bipolar, int64_t reset, int64_t surrogate, bool scaled, bool fma) {
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2);
  const NeuronConsts nc{levels, bipolar, int(reset), int(surrogate), scaled, fma};
  auto y = torch::empty_like(x), h = torch::empty_like(x), v = torch::empty_like(v0);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gif_forward", [&] {
    const scalar_t *px = x.data_ptr<scalar_t>(), *pv0 = v0.data_ptr<scalar_t>();
    scalar_t *py = y.data_ptr<scalar_t>(), *ph = h.data_ptr<scalar_t>(), *pv = v.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t i = b0; i < b1; ++i) {
        forward_seq(T, C, px + i * T * C, pv0 + i * C, py + i * T * C, ph + i * T * C, pv + i * C,
                    scalar_t(theta), scalar_t(tau), nc);
      }
    });
  });
  if (reset == 2) v.zero_();
  return {y, v, h};
}

// Returns dL/dx, dL/dv0 and dL/dtheta (0-d).  The constants come rounded as the reference rounds them:
// keep = 1 - 1/tau, c_atan = pi/2 alpha and half_alpha = alpha/2, each computed in double.
std::vector<torch::Tensor> gif_backward(torch::Tensor gy, torch::Tensor gvl, torch::Tensor h, double theta, double tau,
                                        double keep, double c_atan, double half_alpha, int64_t levels, bool bipolar,
                                        int64_t reset, int64_t surrogate, bool scaled, bool fma) {
  const int64_t B = h.size(0), T = h.size(1), C = h.size(2);
  const NeuronConsts nc{levels, bipolar, int(reset), int(surrogate), scaled, fma};
  auto gx = torch::empty_like(h), gv0 = torch::empty({B, C}, h.options());
  auto gth = torch::zeros({B, C}, h.options());
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "gif_backward", [&] {
    const scalar_t *pgy = gy.data_ptr<scalar_t>(), *pgvl = gvl.data_ptr<scalar_t>(), *ph = h.data_ptr<scalar_t>();
    scalar_t *pgx = gx.data_ptr<scalar_t>(), *pgv0 = gv0.data_ptr<scalar_t>(), *pgth = gth.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t i = b0; i < b1; ++i) {
        backward_seq(T, C, pgy + i * T * C, pgvl + i * C, ph + i * T * C, pgx + i * T * C, pgv0 + i * C,
                     pgth + i * C, scalar_t(theta), scalar_t(tau), scalar_t(keep), scalar_t(c_atan),
                     scalar_t(half_alpha), nc);
      }
    });
  });
  return {gx, gv0, gth.to(torch::kFloat64).sum().to(h.scalar_type())};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("wkv_forward", &wkv_forward);
  m.def("wkv_backward", &wkv_backward);
  m.def("gif_forward", &gif_forward);
  m.def("gif_backward", &gif_backward);
}
