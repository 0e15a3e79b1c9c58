// LoRA's rank-r products on CPU, in one pass over the tokens (see peftlab/kernels/__init__.py).
//
// For a frozen layer y = x Wᵀ + b + s·(x Aᵀ) Bᵀ, with x (M tokens × K), A (r × K), B (N × r):
//
//   forward    h = x Aᵀ                       y += s · h Bᵀ
//   backward   g_h = s · g B                   ∂x += g_h A
//              ∂A = g_hᵀ x                     ∂B = s · gᵀ h          (g = ∂L/∂y, M × N)
//
// The layer's own products (x Wᵀ, g W) stay with the BLAS; these rank-r ones are the kernels' work. Each
// is a thin product (one side r columns) that MKL runs at a quarter to half its usual rate, one call per
// product, each reading its M-row operand from memory again. Here a block of rows is read once and all
// the products for it are done while it is in registers or L1: a row's r dot products against A (or Bᵀ)
// side by side, then its rank-r update of y (or ∂x), and the rank-r outer products of ∂A and ∂Bᵀ
// accumulated over RB rows per load and store. Threads split the rows; each accumulates ∂A and ∂Bᵀ
// privately, summed at the end.
//
// Requirements, checked by the caller: float32, contiguous, r one of 8, 16, 32, 64 (compiled for each, so that
// the loops over r unroll and stay in registers), K and N multiples of 16.
#include "extension.h"
#include <omp.h>

#include <algorithm>
#include <tuple>

#include "simd.h"

namespace {

using namespace peftlab_simd;  // vf: VF floats, the CPU's own vector register
constexpr int64_t W16 = 16;     // the widths' required multiple (a cache line of floats)
constexpr int J = REGISTERS / 4;  // dot products side by side: 2 rows × J vector accumulators, half the registers
constexpr int RB = 8;  // rows per block in the outer products

// out_a[j] = scale · ⟨row_a, P_j⟩ for the rows a < 2 (the second only if ``two``) and the R rows of P (R × L).
template <int R>
void dots(const float* row0, const float* row1, bool two, const float* P, int64_t L, float scale, float* out0,
          float* out1) {
  for (int j0 = 0; j0 < R; j0 += J) {
    vf acc0[J] = {}, acc1[J] = {};
    for (int64_t k = 0; k < L; k += VF) {
      const vf a = loadf(row0 + k), b = two ? loadf(row1 + k) : vf{};
      for (int j = 0; j < J; ++j) {
        const vf p = loadf(P + (j0 + j) * L + k);
        acc0[j] += a * p;
        acc1[j] += b * p;
      }
    }
    for (int j = 0; j < J; ++j) {
      out0[j0 + j] = scale * lane_sum(acc0[j]);
      if (two) out1[j0 + j] = scale * lane_sum(acc1[j]);
    }
  }
}

// row += Σ_j c[j] · P_j (P is R × L): the rank-R update of one row of y or ∂x.
template <int R>
void update(float* row, const float* c, const float* P, int64_t L) {
  for (int64_t k = 0; k < L; k += VF) {
    vf v = loadf(row + k);
    for (int j = 0; j < R; ++j) v += c[j] * loadf(P + j * L + k);
    storef(row + k, v);
  }
}

// D_j += Σ_a c[a][j] · rows_a for every j < R (D is R × L): the outer products of RB rows, whose chunks stay
// in registers while each chunk of D_j is loaded and stored once.
template <int R>
void outer(float* D, const float* const* rows, const float (*c)[R], int64_t L) {
  for (int64_t k = 0; k < L; k += VF) {
    vf chunk[RB];
    for (int a = 0; a < RB; ++a) chunk[a] = loadf(rows[a] + k);
    for (int j = 0; j < R; ++j) {
      vf v = loadf(D + j * L + k);
      for (int a = 0; a < RB; ++a) v += c[a][j] * chunk[a];
      storef(D + j * L + k, v);
    }
  }
}

// y += s · (x Aᵀ) Bᵀ in place; returns h = x Aᵀ (M × R). ``Bt`` is Bᵀ, R × N.
template <int R>
torch::Tensor forward(torch::Tensor x, torch::Tensor A, torch::Tensor Bt, torch::Tensor y, float s) {
  const int64_t M = x.size(0), K = x.size(1), N = Bt.size(1);
  auto h = torch::empty({M, R}, x.options());
  const float *X = x.data_ptr<float>(), *Ap = A.data_ptr<float>(), *Bp = Bt.data_ptr<float>();
  float *Y = y.data_ptr<float>(), *H = h.data_ptr<float>();
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t i = 0; i < M; i += 2) {
    dots<R>(X + i * K, X + (i + 1) * K, i + 1 < M, Ap, K, 1.0f, H + i * R, H + (i + 1) * R);
    for (int64_t a = i; a < std::min(i + 2, M); ++a) {
      float c[R];
      for (int j = 0; j < R; ++j) c[j] = s * H[a * R + j];
      update<R>(Y + a * N, c, Bp, N);
    }
  }
  return h;
}

// ∂x += g_h A in place (``grad_x`` holds g W; empty where x needs no gradient); returns (∂A, ∂Bᵀ), R × K and
// R × N. The threads split the rows, each summing its rows' ∂A and ∂Bᵀ in a buffer of its own, added up at the
// end (splitting the columns instead measured 10-40 % slower: every thread then reads every row).
template <int R>
std::tuple<torch::Tensor, torch::Tensor> backward(torch::Tensor g, torch::Tensor x, torch::Tensor h,
                                                  torch::Tensor A, torch::Tensor Bt, torch::Tensor grad_x, float s) {
  const int64_t M = x.size(0), K = x.size(1), N = Bt.size(1);
  const float *G = g.data_ptr<float>(), *X = x.data_ptr<float>(), *H = h.data_ptr<float>();
  const float *Ap = A.data_ptr<float>(), *Bp = Bt.data_ptr<float>();
  float* GX = grad_x.numel() ? grad_x.data_ptr<float>() : nullptr;
  const int threads = at::get_num_threads();  // torch.set_num_threads applies here too
  auto grad_A = torch::zeros({threads, R, K}, x.options()), grad_Bt = torch::zeros({threads, R, N}, x.options());
#pragma omp parallel num_threads(threads)
  {
    float* dA = grad_A.data_ptr<float>() + omp_get_thread_num() * R * K;
    float* dBt = grad_Bt.data_ptr<float>() + omp_get_thread_num() * R * N;
    const float *x_rows[RB], *g_rows[RB];
#pragma omp for schedule(static)
    for (int64_t i = 0; i < M; i += RB) {
      float gh[RB][R] = {}, sh[RB][R] = {};  // g_h and s·h of the block's rows; zero past the last row
      for (int a = 0; a < RB && i + a < M; a += 2) {
        dots<R>(G + (i + a) * N, G + (i + a + 1) * N, i + a + 1 < M, Bp, N, s, gh[a], gh[a + 1]);
      }
      for (int a = 0; a < RB; ++a) {
        const int64_t row = std::min(i + a, M - 1);  // past the end: any row, with zero coefficients
        x_rows[a] = X + row * K;
        g_rows[a] = G + row * N;
        if (i + a < M) {
          if (GX) update<R>(GX + row * K, gh[a], Ap, K);
          for (int j = 0; j < R; ++j) sh[a][j] = s * H[row * R + j];
        }
      }
      outer<R>(dA, x_rows, gh, K);
      outer<R>(dBt, g_rows, sh, N);
    }
  }
  return {grad_A.sum(0), grad_Bt.sum(0)};
}

}  // namespace

// The entry points: the functions compiled for the caller's rank, on tensors that meet the requirements.
static void check(std::initializer_list<torch::Tensor> tensors, int64_t K, int64_t N) {
  for (const auto& t : tensors) {
    TORCH_CHECK(t.numel() == 0 || (t.is_contiguous() && t.scalar_type() == torch::kFloat && t.device().is_cpu()),
                "peftlab's LoRA kernel takes contiguous float32 CPU tensors");
  }
  TORCH_CHECK(K % W16 == 0 && N % W16 == 0, "peftlab's LoRA kernel takes widths that are multiples of 16, not ", K,
              " and ", N);
}

torch::Tensor lora_forward(torch::Tensor x, torch::Tensor A, torch::Tensor Bt, torch::Tensor y, double scaling) {
  check({x, A, Bt, y}, x.size(1), Bt.size(1));
  const float s = static_cast<float>(scaling);
  switch (A.size(0)) {
    case 8: return forward<8>(x, A, Bt, y, s);
    case 16: return forward<16>(x, A, Bt, y, s);
    case 32: return forward<32>(x, A, Bt, y, s);
    case 64: return forward<64>(x, A, Bt, y, s);
  }
  TORCH_CHECK(false, "peftlab's LoRA kernel takes r = 8, 16, 32 or 64, not ", A.size(0));
}

std::tuple<torch::Tensor, torch::Tensor> lora_backward(torch::Tensor g, torch::Tensor x, torch::Tensor h,
                                                       torch::Tensor A, torch::Tensor Bt, torch::Tensor grad_x,
                                                       double scaling) {
  check({g, x, h, A, Bt, grad_x}, x.size(1), Bt.size(1));
  const float s = static_cast<float>(scaling);
  switch (A.size(0)) {
    case 8: return backward<8>(g, x, h, A, Bt, grad_x, s);
    case 16: return backward<16>(g, x, h, A, Bt, grad_x, s);
    case 32: return backward<32>(g, x, h, A, Bt, grad_x, s);
    case 64: return backward<64>(g, x, h, A, Bt, grad_x, s);
  }
  TORCH_CHECK(false, "peftlab's LoRA kernel takes r = 8, 16, 32 or 64, not ", A.size(0));
}

// Registered as PyTorch operators (torch.ops.<the build's name>), the schemas marking the tensors written in place.
TORCH_LIBRARY(TORCH_EXTENSION_NAME, m) {
  // y += s·(x Aᵀ) Bᵀ in place; returns h = x Aᵀ
  m.def("forward(Tensor x, Tensor A, Tensor Bt, Tensor(a!) y, float scaling) -> Tensor");
  // ∂x += s·(g B) A in place; returns (∂A, ∂Bᵀ)
  m.def("backward(Tensor g, Tensor x, Tensor h, Tensor A, Tensor Bt, Tensor(a!) grad_x, float scaling) -> (Tensor, Tensor)");
}

// The implementations, for CPU tensors (the Python side gives shapes for tracing: kernels/__init__.py).
TORCH_LIBRARY_IMPL(TORCH_EXTENSION_NAME, CPU, m) {
  m.impl("forward", &lora_forward);
  m.impl("backward", &lora_backward);
}
