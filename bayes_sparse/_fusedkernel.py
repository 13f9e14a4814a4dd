"""A small C++ kernel for the per-weight maths of Sparse VD and L0 on CPU, compiled on first use.

:func:`bayes_sparse.functional.vd_weight_stats` needs, per weight, ``log alpha``, ``alpha theta^2`` and the KL
term, and in the backward pass their derivatives. Written with ATen operations that is about fifteen
passes over the weights each way, a few of them transcendental; on a LeNet-300-100 step they cost more than
the matrix products. Here the forward is one pass (and a sum), the backward one pass that recomputes what it
needs from ``theta`` and ``log sigma^2`` (so nothing per weight is kept between them: in a training step the
backward is bound by memory traffic, and keeping alpha and ``s`` to save its exp/log made it no faster). The
loops are plain
C++ that the compiler vectorizes, ``exp``/``log`` included (glibc's vector maths, declared SIMD-callable;
no ``-ffast-math``, so NaN and inf propagate as in the ATen formulas), and rows are split across threads.

L0's hard-concrete gates take the same route: one pass draws the uniform noise (a counter-based hash of a seed
taken from torch's generator, so ``torch.manual_seed`` still fixes it; the loop vectorizes, where torch's
generator fills a tensor one number at a time), forms the gates, keeps each gate's derivative w.r.t. log alpha
(and, for the gated weight, the gate) and sums the expected L0; one pass computes the gradient from those.

The kernel is float32-only and CPU-only, and only used outside ``torch.compile`` tracing; everything else
(float64 for ``gradcheck``, CUDA, compiled graphs, machines without a compiler, ``BAYES_SPARSE_NO_CPP=1``)
takes the ATen formulas, which are the reference the tests hold the kernel to. The extension is built under
a name derived from a hash of its source, so a changed source is never served from a stale build.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Optional

import torch
from torch import Tensor

from ._cppext import Extension

__all__ = ["available", "disabled", "hc_backward", "hc_forward", "hc_uniform", "new_seed", "usable", "vd_backward", "vd_forward"]


_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>

// glibc's vector maths (libmvec) for expf/logf: declared SIMD-callable here, so the loops below vectorize
// without -ffast-math (which would also drop NaN propagation: a NaN parameter must give a NaN result).
extern "C" {
__attribute__((__simd__("notinbranch"))) float expf(float) noexcept;
__attribute__((__simd__("notinbranch"))) float logf(float) noexcept;
}

namespace {
constexpr float K1 = 0.63576f, K2 = 1.87320f, K3 = 1.48695f, EPS = 1e-16f;
constexpr int64_t GRAIN = 16384;

void check(const torch::Tensor& t, const torch::Tensor& like, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == torch::kFloat32, name, " must be float32");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.numel() == like.numel(), name, " has ", t.numel(), " elements, expected ", like.numel());
}
// Sum of chunk(i0, i1) over fixed chunks of [0, n), chunks split across threads: the order of the float
// additions does not depend on the thread count (partial sums in double).
template <typename F>
double chunked_sum(int64_t n, F chunk) {
  const int64_t chunks = (n + GRAIN - 1) / GRAIN;
  std::vector<double> partial(chunks > 0 ? chunks : 1, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t ch = c0; ch < c1; ++ch) partial[ch] = chunk(ch * GRAIN, std::min(n, (ch + 1) * GRAIN));
  });
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}
}  // namespace

// One element: log alpha (clipped), alpha, s = sigmoid(k2 + k3 log alpha), and the unclipped value u.
struct Stats { float u, la, a, s; };
static inline Stats stats(float t2, float ls, float c) {
  const float u = ls - logf(t2 + EPS);
  const float la = u < -c ? -c : (u > c ? c : u);  // NaN stays NaN, as torch.clamp
  return {u, la, expf(la), 1.f / (1.f + expf(-(K2 + K3 * la)))};
}

// Branch-free loops (the mask and the gradient are template switches) so that the compiler vectorizes them.
template <bool MASKED>
static float forward_chunk(const float* th, const float* ls, const float* m, float* v, float* l, float c,
                           int64_t i0, int64_t i1) {
  float acc = 0.f;
  #pragma omp simd reduction(+:acc)
  for (int64_t i = i0; i < i1; ++i) {
    const float t2 = th[i] * th[i];
    const Stats q = stats(t2, ls[i], c);
    const float kl = K1 - K1 * q.s + 0.5f * (logf(1.f + q.a) - q.la);
    v[i] = q.a * t2;
    l[i] = q.la;
    acc += MASKED ? kl * m[i] : kl;
  }
  return acc;
}

template <bool MASKED, bool HAS_GV>
static void backward_chunk(const float* th, const float* ls, const float* m, const float* gv, float* gt, float* gl,
                           float c, float gk, int64_t i0, int64_t i1) {
  #pragma omp simd
  for (int64_t i = i0; i < i1; ++i) {
    const float t = th[i], t2 = t * t, denom = t2 + EPS;
    const Stats q = stats(t2, ls[i], c);
    const float g = HAS_GV ? gv[i] : 0.f;
    const float dkl = -K1 * K3 * q.s * (1.f - q.s) - 0.5f / (1.f + q.a);
    float g_la = g * q.a * t2 + gk * (MASKED ? m[i] : 1.f) * dkl;
    g_la = (q.u > -c && q.u < c) ? g_la : 0.f;
    gl[i] = g_la;
    gt[i] = t * (2.f * q.a * g - 2.f * g_la / denom);
  }
}

// Returns (alpha theta^2, log alpha, KL summed over the mask as a 0-d tensor).
std::vector<torch::Tensor> vd_forward(torch::Tensor theta, torch::Tensor log_sigma2, torch::Tensor mask, double clip) {
  check(theta, theta, "theta");
  check(log_sigma2, theta, "log_sigma2");
  const bool masked = mask.numel() > 0;
  if (masked) check(mask, theta, "mask");
  auto var = torch::empty_like(theta);
  auto la = torch::empty_like(theta);
  const float* th = theta.data_ptr<float>();
  const float* ls = log_sigma2.data_ptr<float>();
  const float* m = masked ? mask.data_ptr<float>() : nullptr;
  float* v = var.data_ptr<float>();
  float* l = la.data_ptr<float>();
  const float c = static_cast<float>(clip);
  const double total = chunked_sum(theta.numel(), [&](int64_t i0, int64_t i1) {
    return masked ? forward_chunk<true>(th, ls, m, v, l, c, i0, i1) : forward_chunk<false>(th, ls, m, v, l, c, i0, i1);
  });
  return {var, la, torch::tensor(static_cast<float>(total))};
}

// Gradients of (alpha theta^2, KL sum) w.r.t. (theta, log sigma^2); g_var may be empty (no gradient).
std::vector<torch::Tensor> vd_backward(torch::Tensor theta, torch::Tensor log_sigma2, torch::Tensor mask,
                                       torch::Tensor g_var, double g_kl, double clip) {
  check(theta, theta, "theta");
  check(log_sigma2, theta, "log_sigma2");
  const bool masked = mask.numel() > 0, has_gv = g_var.numel() > 0;
  if (masked) check(mask, theta, "mask");
  if (has_gv) check(g_var, theta, "g_var");
  auto g_theta = torch::empty_like(theta);
  auto g_ls = torch::empty_like(theta);
  const float* th = theta.data_ptr<float>();
  const float* ls = log_sigma2.data_ptr<float>();
  const float* m = masked ? mask.data_ptr<float>() : nullptr;
  const float* gv = has_gv ? g_var.data_ptr<float>() : nullptr;
  float* gt = g_theta.data_ptr<float>();
  float* gl = g_ls.data_ptr<float>();
  const float c = static_cast<float>(clip), gk = static_cast<float>(g_kl);
  at::parallel_for(0, theta.numel(), GRAIN, [&](int64_t i0, int64_t i1) {
    if (masked && has_gv) backward_chunk<true, true>(th, ls, m, gv, gt, gl, c, gk, i0, i1);
    else if (masked) backward_chunk<true, false>(th, ls, m, gv, gt, gl, c, gk, i0, i1);
    else if (has_gv) backward_chunk<false, true>(th, ls, m, gv, gt, gl, c, gk, i0, i1);
    else backward_chunk<false, false>(th, ls, m, gv, gt, gl, c, gk, i0, i1);
  });
  return {g_theta, g_ls};
}

// ----- hard-concrete gates (L0) ---------------------------------------------------------------------------
// Uniform noise from a counter-based hash of (seed, index): two rounds of murmur3's 32-bit finalizer, the top
// 24 bits centred in (0, 1). Reproducible from the seed alone (hc_uniform gives it to the tests), and the loop
// vectorizes (torch's generator fills a tensor one number at a time).
static inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16; h *= 0x85ebca6bu; h ^= h >> 13; h *= 0xc2b2ae35u; h ^= h >> 16;
  return h;
}
static inline float uniform(uint32_t s0, uint32_t s1, int64_t i) {
  const uint32_t lo = static_cast<uint32_t>(i), hi = static_cast<uint32_t>(static_cast<uint64_t>(i) >> 32);
  const uint32_t h = fmix32(fmix32(lo * 0x9e3779b9u + s0) ^ (s1 + hi * 0x7f4a7c15u));
  const float u = (static_cast<float>(h >> 8) + 0.5f) * (1.0f / 16777216.0f);
  return u < 1e-6f ? 1e-6f : (u > 1.f - 1e-6f ? 1.f - 1e-6f : u);
}

struct HC { float beta, gamma, zeta, shift; };

// THETA: the output is theta * gate (the gated weight) instead of the gate, and the backward returns the
// gradients w.r.t. theta and log alpha in the same pass (no separate multiplication, in either direction).
// The forward also writes the gate's derivative w.r.t. log alpha (0 where the gate is clamped) and, with THETA,
// the gate: the backward then needs neither the noise nor its logs and exps again.
// TWO_THIRDS (beta == 2/3, the paper's and the package's default): with r = (1 - u) / u and e = exp(-log alpha / 2),
// exp(-(logit u + log alpha) / beta) = r sqrt(r) e^3 and exp(-(log alpha - shift)) = exp(shift) e^2, so the
// gate and the expected L0 cost one exp and one sqrt instead of a log and two exps. Overflow of e^2 or e^3
// (log alpha < -59) gives s = 0 and p = 0, underflow (log alpha > 59) s = 1: the limits of the exact forms.
template <bool MASKED, bool THETA, bool TWO_THIRDS>
static float hc_forward_chunk(const float* la, const float* m, const float* th, float* out, float* kg, float* kd,
                              uint32_t s0, uint32_t s1, HC k, int64_t i0, int64_t i1) {
  float acc = 0.f;
  const float exp_shift = std::exp(k.shift);
  #pragma omp simd reduction(+:acc)
  for (int64_t i = i0; i < i1; ++i) {
    const float u = uniform(s0, s1, i);
    float s, p;
    if (TWO_THIRDS) {
      const float r = (1.f - u) / u, e = expf(-0.5f * la[i]), e2 = e * e;
      s = 1.f / (1.f + r * sqrtf(r) * (e2 * e));
      p = 1.f / (1.f + exp_shift * e2);
    } else {
      s = 1.f / (1.f + expf(-(logf(u / (1.f - u)) + la[i]) / k.beta));  // logit(u): one log
      p = 1.f / (1.f + expf(-(la[i] - k.shift)));
    }
    const float st = s * (k.zeta - k.gamma) + k.gamma;
    const float gate = st < 0.f ? 0.f : (st > 1.f ? 1.f : st);
    out[i] = THETA ? th[i] * gate : gate;
    if (THETA) kg[i] = gate;
    kd[i] = (st > 0.f && st < 1.f) ? (k.zeta - k.gamma) / k.beta * s * (1.f - s) : 0.f;
    acc += MASKED ? p * m[i] : p;
  }
  return acc;
}

template <bool MASKED, bool HAS_GG, bool THETA>
static void hc_backward_chunk(const float* la, const float* m, const float* gg, const float* th, const float* kg,
                              const float* kd, float* grad, float* g_th, HC k, float gl0, int64_t i0, int64_t i1) {
  #pragma omp simd
  for (int64_t i = i0; i < i1; ++i) {
    float g = 0.f, gt = 0.f;
    if (HAS_GG) {
      const float go = THETA ? gg[i] * th[i] : gg[i];  // gradient reaching the gate
      g = go * kd[i];
      gt = THETA ? gg[i] * kg[i] : 0.f;
    }
    const float p = 1.f / (1.f + expf(-(la[i] - k.shift)));
    grad[i] = g + gl0 * (MASKED ? m[i] : 1.f) * p * (1.f - p);
    if (THETA) g_th[i] = gt;
  }
}

// Returns (gates, or theta * gates when theta is not empty; expected L0 summed over the mask as a 0-d tensor;
// the gates when theta is given, else an empty tensor; the gates' derivatives): the last two are the backward's.
std::vector<torch::Tensor> hc_forward(torch::Tensor log_alpha, torch::Tensor mask, torch::Tensor theta,
                                      int64_t seed, double beta, double gamma, double zeta) {
  check(log_alpha, log_alpha, "log_alpha");
  const bool masked = mask.numel() > 0, with_theta = theta.numel() > 0;
  if (masked) check(mask, log_alpha, "mask");
  if (with_theta) check(theta, log_alpha, "theta");
  auto out = torch::empty_like(log_alpha);
  auto gates = with_theta ? torch::empty_like(log_alpha) : torch::empty({0}, log_alpha.options());
  auto deriv = torch::empty_like(log_alpha);
  const float* la = log_alpha.data_ptr<float>();
  const float* m = masked ? mask.data_ptr<float>() : nullptr;
  const float* th = with_theta ? theta.data_ptr<float>() : nullptr;
  float* o = out.data_ptr<float>();
  float* kg = with_theta ? gates.data_ptr<float>() : nullptr;
  float* kd = deriv.data_ptr<float>();
  const uint32_t s0 = static_cast<uint32_t>(seed), s1 = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
  const HC k{static_cast<float>(beta), static_cast<float>(gamma), static_cast<float>(zeta),
             static_cast<float>(beta * std::log(-gamma / zeta))};
  const bool two_thirds = std::abs(beta - 2.0 / 3.0) < 1e-12;
  const double total = chunked_sum(log_alpha.numel(), [&](int64_t i0, int64_t i1) {
    if (two_thirds) {
      if (masked && with_theta) return hc_forward_chunk<true, true, true>(la, m, th, o, kg, kd, s0, s1, k, i0, i1);
      if (masked) return hc_forward_chunk<true, false, true>(la, m, th, o, kg, kd, s0, s1, k, i0, i1);
      if (with_theta) return hc_forward_chunk<false, true, true>(la, m, th, o, kg, kd, s0, s1, k, i0, i1);
      return hc_forward_chunk<false, false, true>(la, m, th, o, kg, kd, s0, s1, k, i0, i1);
    }
    if (masked && with_theta) return hc_forward_chunk<true, true, false>(la, m, th, o, kg, kd, s0, s1, k, i0, i1);
    if (masked) return hc_forward_chunk<true, false, false>(la, m, th, o, kg, kd, s0, s1, k, i0, i1);
    if (with_theta) return hc_forward_chunk<false, true, false>(la, m, th, o, kg, kd, s0, s1, k, i0, i1);
    return hc_forward_chunk<false, false, false>(la, m, th, o, kg, kd, s0, s1, k, i0, i1);
  });
  return {out, torch::tensor(static_cast<float>(total)), gates, deriv};
}

// Gradients of <g_out, out> + g_l0 * L0 w.r.t. log alpha and, when theta is not empty (out = theta * gates),
// w.r.t. theta (else an empty tensor), from the forward's gates and derivatives; g_out may be empty (no
// gradient).
std::vector<torch::Tensor> hc_backward(torch::Tensor log_alpha, torch::Tensor mask, torch::Tensor theta,
                                       torch::Tensor gates, torch::Tensor deriv, torch::Tensor g_out, double g_l0,
                                       double beta, double gamma, double zeta) {
  check(log_alpha, log_alpha, "log_alpha");
  const bool masked = mask.numel() > 0, has_gg = g_out.numel() > 0, with_theta = theta.numel() > 0;
  if (masked) check(mask, log_alpha, "mask");
  if (has_gg) check(g_out, log_alpha, "g_out");
  if (with_theta) {
    check(theta, log_alpha, "theta");
    check(gates, log_alpha, "gates");
  }
  check(deriv, log_alpha, "deriv");
  auto grad = torch::empty_like(log_alpha);
  auto g_theta = with_theta ? torch::empty_like(log_alpha) : torch::empty({0}, log_alpha.options());
  const float* la = log_alpha.data_ptr<float>();
  const float* m = masked ? mask.data_ptr<float>() : nullptr;
  const float* gg = has_gg ? g_out.data_ptr<float>() : nullptr;
  const float* th = with_theta ? theta.data_ptr<float>() : nullptr;
  const float* kg = with_theta ? gates.data_ptr<float>() : nullptr;
  const float* kd = deriv.data_ptr<float>();
  float* out = grad.data_ptr<float>();
  float* gt = with_theta ? g_theta.data_ptr<float>() : nullptr;
  const HC k{static_cast<float>(beta), static_cast<float>(gamma), static_cast<float>(zeta),
             static_cast<float>(beta * std::log(-gamma / zeta))};
  const float gl = static_cast<float>(g_l0);
  at::parallel_for(0, log_alpha.numel(), GRAIN, [&](int64_t i0, int64_t i1) {
    // without an incoming gradient theta's is 0 and the gate's derivative is not needed
    if (!has_gg) {
      if (masked) hc_backward_chunk<true, false, false>(la, m, gg, th, kg, kd, out, gt, k, gl, i0, i1);
      else hc_backward_chunk<false, false, false>(la, m, gg, th, kg, kd, out, gt, k, gl, i0, i1);
      if (with_theta) std::fill(gt + i0, gt + i1, 0.f);
    } else if (masked && with_theta) hc_backward_chunk<true, true, true>(la, m, gg, th, kg, kd, out, gt, k, gl, i0, i1);
    else if (masked) hc_backward_chunk<true, true, false>(la, m, gg, th, kg, kd, out, gt, k, gl, i0, i1);
    else if (with_theta) hc_backward_chunk<false, true, true>(la, m, gg, th, kg, kd, out, gt, k, gl, i0, i1);
    else hc_backward_chunk<false, true, false>(la, m, gg, th, kg, kd, out, gt, k, gl, i0, i1);
  });
  return {grad, g_theta};
}

// The uniform noise hc_forward draws for this seed (for tests: the ATen formulas on the same noise).
torch::Tensor hc_uniform(int64_t n, int64_t seed) {
  auto u = torch::empty({n}, torch::kFloat32);
  float* p = u.data_ptr<float>();
  const uint32_t s0 = static_cast<uint32_t>(seed), s1 = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
  for (int64_t i = 0; i < n; ++i) p[i] = uniform(s0, s1, i);
  return u;
}
"""

_EXTENSION = Extension("bayes_sparse_vd_", _SOURCE,
                       ["vd_forward", "vd_backward", "hc_forward", "hc_backward", "hc_uniform"],
                       ["-O3", "-march=native", "-fno-math-errno", "-fopenmp"], "using the ATen formulas")
_load = _EXTENSION.load


def available() -> bool:
    """Whether the kernel is built (building it on first call) and not disabled by ``BAYES_SPARSE_NO_CPP=1``."""
    return _load() is not None


_DISABLED = threading.local()


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within this block (this thread) the ATen formulas serve, as under ``torch.compile``.

    Eager L0 on the CPU draws its noise from the kernel's hash and a compiled graph from ``torch.rand_like``:
    the same distribution but other numbers for the same seed. To compare the two step for step, run the
    eager side inside ``disabled()``.
    """
    previous = getattr(_DISABLED, "value", False)
    _DISABLED.value = True
    try:
        yield
    finally:
        _DISABLED.value = previous


def usable(*tensors: Optional[Tensor]) -> bool:
    """Whether the kernel takes these tensors: CPU float32, not under ``torch.compile`` tracing or
    :func:`disabled`, kernel built."""
    if torch.compiler.is_compiling() or getattr(_DISABLED, "value", False):
        return False
    for t in tensors:
        if t is not None and (t.device.type != "cpu" or t.dtype != torch.float32):
            return False
    return available()


def _flat(t: Optional[Tensor]) -> Tensor:
    return torch.empty(0) if t is None else t.detach().contiguous().reshape(-1)


def vd_forward(theta: Tensor, log_sigma2: Tensor, mask: Optional[Tensor], clip: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(alpha theta^2, log alpha, KL summed over mask)``, shaped like ``theta`` (the sum 0-d); no autograd."""
    mod = _load()
    if mod is None:
        raise RuntimeError("the C++ VD kernel is unavailable on this machine")
    var, la, kl = mod.vd_forward(_flat(theta), _flat(log_sigma2), _flat(mask), float(clip))
    return var.view_as(theta), la.view_as(theta), kl


def vd_backward(theta: Tensor, log_sigma2: Tensor, mask: Optional[Tensor], g_var: Optional[Tensor],
                g_kl: float, clip: float) -> tuple[Tensor, Tensor]:
    """Gradients w.r.t. ``(theta, log sigma^2)`` of ``<g_var, alpha theta^2> + g_kl * KL``."""
    mod = _load()
    if mod is None:
        raise RuntimeError("the C++ VD kernel is unavailable on this machine")
    g_theta, g_ls = mod.vd_backward(_flat(theta), _flat(log_sigma2), _flat(mask), _flat(g_var), float(g_kl),
                                    float(clip))
    return g_theta.view_as(theta), g_ls.view_as(theta)


def new_seed() -> int:
    """A 63-bit seed drawn from torch's default generator (so ``torch.manual_seed`` makes the noise reproducible)."""
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64))


def hc_forward(log_alpha: Tensor, mask: Optional[Tensor], seed: int, beta: float, gamma: float,
               zeta: float, theta: Optional[Tensor] = None) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
    """``(gates, expected L0 summed over mask, saved)`` with the uniform noise of ``seed``; no autograd. With
    ``theta`` the first output is the gated weight ``theta * gates`` instead (one pass, no separate
    multiplication). ``saved`` (the gates when ``theta`` is given, and their derivatives w.r.t. log alpha,
    flat) is what :func:`hc_backward` needs besides ``log_alpha`` and ``theta``."""
    mod = _load()
    if mod is None:
        raise RuntimeError("the C++ kernel is unavailable on this machine")
    out, l0, gates, deriv = mod.hc_forward(_flat(log_alpha), _flat(mask), _flat(theta), int(seed), float(beta),
                                           float(gamma), float(zeta))
    return out.view_as(log_alpha), l0, (gates, deriv)


def hc_backward(log_alpha: Tensor, mask: Optional[Tensor], g_gates: Optional[Tensor], g_l0: float,
                saved: tuple[Tensor, Tensor], beta: float, gamma: float, zeta: float,
                theta: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
    """Gradients of ``<g_gates, out> + g_l0 * L0`` (from :func:`hc_forward`'s ``saved``) w.r.t. ``log_alpha``
    and, when ``theta`` is given (``out = theta * gates``), w.r.t. ``theta`` (else ``None``)."""
    mod = _load()
    if mod is None:
        raise RuntimeError("the C++ kernel is unavailable on this machine")
    grad, g_theta = mod.hc_backward(_flat(log_alpha), _flat(mask), _flat(theta), saved[0], saved[1], _flat(g_gates),
                                    float(g_l0), float(beta), float(gamma), float(zeta))
    return grad.view_as(log_alpha), (g_theta.view_as(log_alpha) if theta is not None else None)


def hc_uniform(shape: torch.Size, seed: int) -> Tensor:
    """The uniform noise :func:`hc_forward` uses for ``seed`` (clamped to [1e-6, 1 - 1e-6]), shaped ``shape``."""
    mod = _load()
    if mod is None:
        raise RuntimeError("the C++ kernel is unavailable on this machine")
    return mod.hc_uniform(int(torch.Size(shape).numel()), int(seed)).view(shape)
