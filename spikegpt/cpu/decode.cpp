// Fused CPU ops of the recurrent decoder's step (spikegpt/recurrent.py, `_step_fused`): the elementwise
// work between a layer's matrix products as four native calls, registered as torch.ops.spikegpt.decode_*
// so that the TorchScript'ed step calls them without a Python round trip.
//
// Each op does what `_step_impl` does with the same IEEE operations in the same order (built with
// -ffp-contract=off: an FMA exactly where ATen's addcmul has one), and calls ATen itself for LayerNorm,
// exp, log and sigmoid, so a fused step is bitwise the unfused one.  The state (L, 7, B, C) and the new
// state are contiguous; the ops read rows of the one and write rows of the other, which replaces the
// step's unbind of the state and stack of the new one.
#include <torch/extension.h>

#include <cmath>

#include "mul_add.h"
#include <cstdint>
#include <limits>
#include <vector>

namespace {

using spikegpt_cpu::mul_add;

// Row `slot` of layer `layer` of a contiguous (L, 7, B, C) state.
template <typename T>
T* row(const torch::Tensor& s, int64_t layer, int64_t slot) {
  return s.data_ptr<T>() + (layer * 7 + slot) * s.size(2) * s.size(3);
}

void check_state(const torch::Tensor& state, const torch::Tensor& out, const torch::Tensor& x) {
  TORCH_CHECK(state.dim() == 4 && state.size(1) == 7 && state.is_contiguous() && out.is_contiguous() &&
                  out.sizes() == state.sizes() && out.scalar_type() == state.scalar_type() &&
                  x.scalar_type() == state.scalar_type() && x.is_contiguous() &&
                  x.numel() == state.size(2) * state.size(3),
              "spikegpt decode ops: contiguous (L, 7, B, C) states and (B, C) rows of one dtype");
}

// z = LayerNorm(x) (written to the new state's `slot`), and the token-shift mixes of z with the state's
// `slot`: out_m = z mu_m + last (1 - mu_m), M of them (mu, omu (M, 1, C)), returned as the rows of one
// (M, B, C) tensor, laid out as the unfused step's (a product's result can depend on its input's alignment).
std::vector<torch::Tensor> decode_ln_mix(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b,
                                         double eps, const torch::Tensor& state, const torch::Tensor& out,
                                         int64_t layer, int64_t slot, const torch::Tensor& mu,
                                         const torch::Tensor& omu) {
  check_state(state, out, x);
  const int64_t C = state.size(3), N = x.numel(), M = mu.size(0);
  TORCH_CHECK(mu.is_contiguous() && omu.is_contiguous() && mu.numel() == M * C && omu.numel() == M * C &&
                  mu.scalar_type() == x.scalar_type() && omu.scalar_type() == x.scalar_type(),
              "decode_ln_mix: mu and 1 - mu (M, 1, C) of the state's dtype");
  const torch::Tensor z = at::layer_norm(x, {C}, w, b, eps).contiguous();
  const torch::Tensor mixes = torch::empty({M, state.size(2), C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "decode_ln_mix", [&] {
    const scalar_t* __restrict pz = z.data_ptr<scalar_t>();
    const scalar_t* __restrict last = row<scalar_t>(state, layer, slot);
    scalar_t* __restrict zs = row<scalar_t>(out, layer, slot);
    for (int64_t i = 0; i < N; ++i) zs[i] = pz[i];
    for (int64_t m = 0; m < M; ++m) {
      const scalar_t* __restrict pm = mu.data_ptr<scalar_t>() + m * C;
      const scalar_t* __restrict po = omu.data_ptr<scalar_t>() + m * C;
      scalar_t* __restrict o = mixes.data_ptr<scalar_t>() + m * N;
      for (int64_t i = 0; i < N; i += C) {
        for (int64_t c = 0; c < C; ++c) o[i + c] = pz[i + c] * pm[c] + last[i + c] * po[c];
      }
    }
  });
  return mixes.unbind(0);
}

// WKV for one token from the state's (p, q, o) of `layer`, then the receptance gate: returns sigmoid(r) y
// and writes the renormalised state (p', 1, o') to the new state:
//   K = max(k, o), ek = e^{k-K}, es = e^{o-K}, a = p es, b = q es, now = e^u ek,
//   y = (a + now v) / (b + now), den = max(ek + e^w b, tiny), p' = (ek v + e^w a) / den, o' = K + log den.
torch::Tensor decode_wkv(const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& r,
                         const torch::Tensor& state, const torch::Tensor& out, int64_t layer, const torch::Tensor& eu,
                         const torch::Tensor& ew, double tiny) {
  check_state(state, out, k);
  const int64_t C = state.size(3), N = k.numel();
  TORCH_CHECK(v.is_contiguous() && v.scalar_type() == k.scalar_type() && v.numel() == N &&
                  eu.is_contiguous() && ew.is_contiguous() && eu.numel() == C && ew.numel() == C &&
                  eu.scalar_type() == k.scalar_type() && ew.scalar_type() == k.scalar_type(),
              "decode_wkv: k, v (B, C) and e^u, e^w (C,) of the state's dtype");
  auto K = torch::empty_like(k), dk = torch::empty_like(k), dof = torch::empty_like(k);
  auto a = torch::empty_like(k), bq = torch::empty_like(k), y = torch::empty_like(k), den = torch::empty_like(k);
  AT_DISPATCH_FLOATING_TYPES(k.scalar_type(), "decode_wkv", [&] {
    using T = scalar_t;
    const T *pk = k.data_ptr<T>(), *po = row<T>(state, layer, 4);
    T *pK = K.data_ptr<T>(), *pdk = dk.data_ptr<T>(), *pdo = dof.data_ptr<T>();
    for (int64_t i = 0; i < N; ++i) {
      const T kk = pk[i], oo = po[i];
      // ATen's maximum: NaN if either is, else the larger (the second on ties, as max_ps).
      const T m = (kk != kk || oo != oo) ? std::numeric_limits<T>::quiet_NaN() : (kk > oo ? kk : oo);
      pK[i] = m;
      pdk[i] = kk - m;
      pdo[i] = oo - m;
    }
  });
  const torch::Tensor ek = at::exp(dk), es = at::exp(dof);
  AT_DISPATCH_FLOATING_TYPES(k.scalar_type(), "decode_wkv", [&] {
    using T = scalar_t;
    const T *pek = ek.data_ptr<T>(), *pes = es.data_ptr<T>(), *pv = v.data_ptr<T>();
    const T *pp = row<T>(state, layer, 2), *pq = row<T>(state, layer, 3);
    const T *peu = eu.data_ptr<T>(), *pew = ew.data_ptr<T>();
    T *pa = a.data_ptr<T>(), *pb = bq.data_ptr<T>(), *py = y.data_ptr<T>(), *pden = den.data_ptr<T>();
    const T lo = static_cast<T>(tiny);
    for (int64_t i0 = 0; i0 < N; i0 += C) {
      for (int64_t c = 0; c < C; ++c) {
        const int64_t i = i0 + c;
        const T aa = pp[i] * pes[i], bb = pq[i] * pes[i], now = peu[c] * pek[i];
        pa[i] = aa;
        pb[i] = bb;
        py[i] = (aa + now * pv[i]) / (bb + now);
        const T d = pek[i] + pew[c] * bb;
        pden[i] = d < lo ? lo : d;  // clamp_min: NaN stays NaN
      }
    }
  });
  const torch::Tensor logden = at::log(den), gate = at::sigmoid(r).contiguous();
  auto ry = torch::empty_like(k);
  AT_DISPATCH_FLOATING_TYPES(k.scalar_type(), "decode_wkv", [&] {
    using T = scalar_t;
    const T *pek = ek.data_ptr<T>(), *pv = v.data_ptr<T>(), *pa = a.data_ptr<T>(), *pden = den.data_ptr<T>();
    const T *pK = K.data_ptr<T>(), *pl = logden.data_ptr<T>(), *pg = gate.data_ptr<T>(), *py = y.data_ptr<T>();
    const T* pew = ew.data_ptr<T>();
    T *np = row<T>(out, layer, 2), *nq = row<T>(out, layer, 3), *no = row<T>(out, layer, 4);
    T* pry = ry.data_ptr<T>();
    for (int64_t i0 = 0; i0 < N; i0 += C) {
      for (int64_t c = 0; c < C; ++c) {
        const int64_t i = i0 + c;
        np[i] = (pek[i] * pv[i] + pew[c] * pa[i]) / pden[i];
        nq[i] = T(1);
        no[i] = pK[i] + pl[i];
        pry[i] = pg[i] * py[i];
      }
    }
  });
  return ry;
}

// One neuron step on input `inp` (times sigmoid(gate) where a gate is given) from the membrane in the
// state's `slot`; the new membrane goes to the new state, the spike count (where `collect`) to
// counts[index]; returns x + output.  `neuron`: -1 none (output = input), 0 LIF, 1 GIF (`reset` 0 hard,
// 1 soft, 2 zero):
//   h = v + (inp - v) / tau;  LIF: s = [h >= theta], output s, v' = h (1 - s);
//   GIF: s = floor(a / theta) clipped to [0, L] (bipolar: a = |h|, sign of h), output theta s,
//        v' = h where a < theta else 0 (hard), h - theta s (soft), 0 (zero).
torch::Tensor decode_neuron(const torch::Tensor& x, const torch::Tensor& inp, const c10::optional<torch::Tensor>& gate,
                            const torch::Tensor& state, const torch::Tensor& out, int64_t layer, int64_t slot,
                            const torch::Tensor& tau, const torch::Tensor& theta, int64_t neuron, int64_t levels,
                            bool bipolar, int64_t reset, bool collect, const torch::Tensor& counts, int64_t index) {
  check_state(state, out, x);
  TORCH_CHECK(inp.is_contiguous() && inp.scalar_type() == x.scalar_type() && inp.numel() == x.numel() &&
                  tau.numel() == 1 && theta.numel() == 1 && tau.scalar_type() == x.scalar_type() &&
                  theta.scalar_type() == x.scalar_type(),
              "decode_neuron: input (B, C), tau and theta (0-d) of the state's dtype");
  TORCH_CHECK(!collect || (counts.scalar_type() == torch::kLong && counts.is_contiguous() && index < counts.numel()),
              "decode_neuron: int64 spike counts");
  const int64_t N = x.numel();
  const torch::Tensor g = gate.has_value() ? at::sigmoid(*gate).contiguous() : torch::Tensor();
  auto y = torch::empty_like(x);
  int64_t fired = 0;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "decode_neuron", [&] {
    using T = scalar_t;
    const T* __restrict px = x.data_ptr<T>();
    const T* __restrict pi = inp.data_ptr<T>();
    const T* __restrict pg = g.defined() ? g.data_ptr<T>() : nullptr;
    const T* __restrict pv = row<T>(state, layer, slot);
    T* __restrict nv = row<T>(out, layer, slot);
    T* __restrict py = y.data_ptr<T>();
    const T tt = *tau.data_ptr<T>(), th = *theta.data_ptr<T>(), L = T(levels), nth = -th;
    for (int64_t i = 0; i < N; ++i) {
      const T in = pg ? pg[i] * pi[i] : pi[i];
      if (neuron < 0) {
        nv[i] = pv[i];
        py[i] = px[i] + in;
        continue;
      }
      const T h = pv[i] + (in - pv[i]) / tt;
      if (neuron == 0) {
        const bool f = h >= th;
        nv[i] = f ? T(0) : h;
        py[i] = px[i] + (f ? T(1) : T(0));
        fired += f;
        continue;
      }
      const T a = bipolar ? std::abs(h) : h;
      T s = std::floor(a / th);
      if (bipolar) {
        s = std::copysign(s > L ? L : s, h);
      } else {
        s = s < T(0) ? T(0) : (s > L ? L : s);
      }
      nv[i] = reset == 0 ? (a >= th ? T(0) : h) : reset == 1 ? mul_add(s, nth, h) : T(0);
      py[i] = px[i] + th * s;
      fired += s != T(0);
    }
  });
  if (collect) counts.data_ptr<int64_t>()[index] = fired;
  return y;
}

// The FFN's squared ReLU, relu(x) relu(x) (NaN propagates, as through ATen's relu).
torch::Tensor decode_relu_square(const torch::Tensor& x) {
  const torch::Tensor xc = x.contiguous();
  auto y = torch::empty_like(xc);
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "decode_relu_square", [&] {
    const scalar_t* __restrict px = xc.data_ptr<scalar_t>();
    scalar_t* __restrict py = y.data_ptr<scalar_t>();
    const int64_t N = xc.numel();
    for (int64_t i = 0; i < N; ++i) {
      const scalar_t r = px[i] < scalar_t(0) ? scalar_t(0) : px[i];
      py[i] = r * r;
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(spikegpt, m) {
  m.def("decode_ln_mix(Tensor x, Tensor w, Tensor b, float eps, Tensor state, Tensor(a!) out, int layer, int slot, "
        "Tensor mu, Tensor omu) -> Tensor[]",
        &decode_ln_mix);
  m.def("decode_wkv(Tensor k, Tensor v, Tensor r, Tensor state, Tensor(a!) out, int layer, Tensor eu, Tensor ew, "
        "float tiny) -> Tensor",
        &decode_wkv);
  m.def("decode_neuron(Tensor x, Tensor inp, Tensor? gate, Tensor state, Tensor(a!) out, int layer, int slot, "
        "Tensor tau, Tensor theta, int neuron, int levels, bool bipolar, int reset, bool collect, "
        "Tensor(b!) counts, int index) -> Tensor",
        &decode_neuron);
  m.def("decode_relu_square(Tensor x) -> Tensor", &decode_relu_square);
}
