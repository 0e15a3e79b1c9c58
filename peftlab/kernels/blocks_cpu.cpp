// Block-diagonal transforms of activations on CPU, in one pass over the tokens (see peftlab/kernels/__init__.py):
// ETHER's reflections, ETHER+'s rank-2 blocks and OFT's rotations applied to a layer's input or output.
//
// A row z (one token, d = n·b features) is transformed block by block, z_i its i-th block of b features:
//
//   low rank (ETHER k = 1, ETHER+ k = 2)   y_i = z_i + Q_i (P_iᵀ z_i − c_i)        P_i, Q_i: b × k
//   dense (OFT)                            y_i = z_i M_i  (z_i a row)              M_i: b × b
//
// (c_i = P_iᵀ s_i moves an output transform past the bias s: H(z − s) + s = z + Q(Pᵀz − Pᵀs).) With g = ∂L/∂y:
//
//   low rank   ∂z_i = g_i + P_i e_i,  e_i = Q_iᵀ g_i      ∂P_i = Σ z_i e_iᵀ    ∂Q_i = Σ g_i a_iᵀ, a_i = P_iᵀ z_i − c_i
//              ∂c_i = −Σ e_i                                                   (sums over the tokens)
//   dense      ∂z_i = g_i M_iᵀ                            ∂M_i = Σ z_iᵀ g_i
//
// PyTorch runs each of these as several passes over the tokens (products, sums, broadcasts, and for the batched
// products a (blocks, tokens, b) copy of the activations either side); on this CPU those passes over
// cache-cold activations cost far more than their arithmetic. Here each row is read once per direction: the
// forward reads z and writes y, the backward reads z and g and writes ∂z. Threads split the rows; the
// parameter gradients are summed per thread and added up at the end.
//
// Layouts (checked by the entry points): float32, contiguous; z as rows × d, P and Q as n × b × k, c as n × k, M
// as n × b × b with b = 16, 32, 48 or 64. Any block size for the low-rank transform: a block is read in chunks
// of 16 features, the last one masked, against copies of P and Q padded with zeros to whole chunks. A chunk may
// read past its block into the next ones (masked out) and write past it (the next blocks, done later by the
// same thread, write their own values there); a chunk that would pass the row's end writes only its block's
// features, and the last row of the tensor is read from a padded copy: nothing outside the tensors is touched.
#include <torch/extension.h>
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

namespace {

typedef float v16 __attribute__((vector_size(64)));  // 16 floats: one AVX-512 register, two AVX2 ones
typedef float v16u __attribute__((vector_size(64), aligned(4)));  // the same at any float's address
typedef float v8 __attribute__((vector_size(32)));
typedef int i16 __attribute__((vector_size(64)));
typedef double d8 __attribute__((vector_size(64)));  // 8 doubles
typedef double d8u __attribute__((vector_size(64), aligned(8)));
typedef long long l8 __attribute__((vector_size(64)));
constexpr int64_t W16 = 16;
constexpr int RB = 8;  // rows per step of the dense backward's outer products (∂M loaded and stored once per RB rows)

// Typed vector accesses, not memcpy: a float store then cannot alias the loops' integer bounds, which would
// otherwise be reloaded from memory after every store.
inline v16 load(const float* p) { return *reinterpret_cast<const v16u*>(p); }
inline void store(float* p, v16 v) { *reinterpret_cast<v16u*>(p) = v; }
inline d8 loadd(const double* p) { return *reinterpret_cast<const d8u*>(p); }
inline void stored(double* p, d8 v) { *reinterpret_cast<d8u*>(p) = v; }
inline float hsum(v16 v) {  // a tree of halves: 4 additions where a lane-by-lane sum has 15 in a chain
  const v8 s = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
               __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
}
inline v16 keep_first(v16 v, int64_t count) {  // lanes ≥ count set to zero
  const i16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  return lane < static_cast<int>(count) ? v : v16{};
}

// The blocks' geometry: n blocks of b features, each read as ``chunks`` chunks of 16, the last holding ``tail``.
struct Blocks {
  int64_t n, b, chunks, tail, padded;  // padded = 16·chunks, the stride of the padded copies of P, Q, ∂P, ∂Q
  Blocks(int64_t d, int64_t b_)
      : n(d / b_), b(b_), chunks((b_ + W16 - 1) / W16), tail(b_ - (chunks - 1) * W16), padded(chunks * W16) {}
  v16 read(const float* block, int64_t chunk) const {  // chunk of a block, zero past its end
    const v16 v = load(block + chunk * W16);
    return chunk == chunks - 1 ? keep_first(v, tail) : v;
  }
  // Chunk of block i of a row of d features; where 16 lanes would pass the row's end, only the block's own.
  void write(float* row, int64_t i, int64_t chunk, v16 v, int64_t d) const {
    float* at = row + i * b + chunk * W16;
    if (i * b + (chunk + 1) * W16 > d) {  // only a last chunk can: the others lie inside their block
      for (int64_t l = 0; l < tail; ++l) at[l] = v[l];
    } else {
      store(at, v);
    }
  }
};

// P (n × b × k) → (k × n × padded): the k vectors of each block in chunks of 16, zeros past each block's end.
template <int K>
std::vector<float> padded_copy(const torch::Tensor& P, const Blocks& g) {
  std::vector<float> out(K * g.n * g.padded, 0.f);
  const float* p = P.data_ptr<float>();
  for (int64_t i = 0; i < g.n; ++i) {
    for (int64_t j = 0; j < g.b; ++j) {
      for (int k = 0; k < K; ++k) out[(k * g.n + i) * g.padded + j] = p[(i * g.b + j) * K + k];
    }
  }
  return out;
}

// The threads' padded sums (threads × k × n × padded) → one (n × b × k) gradient.
template <int K>
torch::Tensor unpadded_sum(const std::vector<float>& parts, int threads, const Blocks& g, const torch::Tensor& like) {
  auto out = torch::empty({g.n, g.b, K}, like.options());
  float* o = out.data_ptr<float>();
  const int64_t stride = K * g.n * g.padded;
  for (int64_t i = 0; i < g.n; ++i) {
    for (int64_t j = 0; j < g.b; ++j) {
      for (int k = 0; k < K; ++k) {
        float s = 0.f;
        for (int th = 0; th < threads; ++th) s += parts[th * stride + (k * g.n + i) * g.padded + j];
        o[(i * g.b + j) * K + k] = s;
      }
    }
  }
  return out;
}

// Rows t of a (rows × d) tensor; the last row through a copy with a chunk of slack after it.
struct Rows {
  const float* data;
  int64_t rows, d;
  std::vector<float> last;
  Rows(const float* data_, int64_t rows_, int64_t d_) : data(data_), rows(rows_), d(d_), last(d_ + W16, 0.f) {
    if (rows) std::memcpy(last.data(), data + (rows - 1) * d, d * sizeof(float));
  }
  const float* operator[](int64_t t) const { return t == rows - 1 ? last.data() : data + t * d; }
};

// One row: y = z + Q(Pᵀz − c) blockwise. The geometry comes by value, so that its fields stay in registers.
template <int K>
void lowrank_forward_row(const Blocks g, const float* zr, float* yr, const float* P, const float* Q, const float* C,
                         int64_t d) {
  for (int64_t i = 0; i < g.n; ++i) {
    const float* zi = zr + i * g.b;
    v16 acc[K] = {};
    for (int64_t ch = 0; ch < g.chunks; ++ch) {
      const v16 zc = g.read(zi, ch);
      for (int k = 0; k < K; ++k) acc[k] += zc * load(P + (k * g.n + i) * g.padded + ch * W16);
    }
    float a[K];
    for (int k = 0; k < K; ++k) a[k] = hsum(acc[k]) - (C ? C[i * K + k] : 0.f);
    for (int64_t ch = 0; ch < g.chunks; ++ch) {  // lanes past the block: Q is zero there, z passes through
      v16 v = load(zi + ch * W16);
      for (int k = 0; k < K; ++k) v += a[k] * load(Q + (k * g.n + i) * g.padded + ch * W16);
      g.write(yr, i, ch, v, d);
    }
  }
}

template <int K>
torch::Tensor lowrank_forward(torch::Tensor z, torch::Tensor Pb, torch::Tensor Qb, torch::Tensor c) {
  const int64_t M = z.size(0), d = z.size(1);
  const Blocks g(d, Pb.size(1));
  auto y = torch::empty_like(z);
  const auto Pp = padded_copy<K>(Pb, g), Qp = padded_copy<K>(Qb, g);
  const float *P = Pp.data(), *Q = Qp.data(), *C = c.numel() ? c.data_ptr<float>() : nullptr;
  const Rows Z(z.data_ptr<float>(), M, d);
  float* Y = y.data_ptr<float>();
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t t = 0; t < M; ++t) lowrank_forward_row<K>(g, Z[t], Y + t * d, P, Q, C, d);
  return y;
}

// One row of the backward: ∂z = g + P e (written where ``gz``), ∂P += z eᵀ, ∂Q += g aᵀ, ∂c −= e, blockwise.
template <int K>
void lowrank_backward_row(const Blocks g, const float* zr, const float* gr, float* gz, const float* P, const float* Q,
                          const float* C, float* dP, float* dQ, float* dc, int64_t d) {
  for (int64_t i = 0; i < g.n; ++i) {
    const float *zi = zr + i * g.b, *gi = gr + i * g.b;
    v16 acc_a[K] = {}, acc_e[K] = {};
    for (int64_t ch = 0; ch < g.chunks; ++ch) {
      const v16 zc = g.read(zi, ch), gc = g.read(gi, ch);
      for (int k = 0; k < K; ++k) {
        const int64_t at = (k * g.n + i) * g.padded + ch * W16;
        acc_a[k] += zc * load(P + at);
        acc_e[k] += gc * load(Q + at);
      }
    }
    float a[K], e[K];
    for (int k = 0; k < K; ++k) {
      a[k] = hsum(acc_a[k]) - (C ? C[i * K + k] : 0.f);
      e[k] = hsum(acc_e[k]);
      dc[i * K + k] -= e[k];
    }
    for (int64_t ch = 0; ch < g.chunks; ++ch) {  // past the block: ∂P and ∂Q's padding (dropped), P's zeros
      const v16 zc = load(zi + ch * W16), gc = load(gi + ch * W16);
      v16 out = gc;
      for (int k = 0; k < K; ++k) {
        const int64_t at = (k * g.n + i) * g.padded + ch * W16;
        store(dP + at, load(dP + at) + e[k] * zc);
        store(dQ + at, load(dQ + at) + a[k] * gc);
        out += e[k] * load(P + at);
      }
      if (gz) g.write(gz, i, ch, out, d);
    }
  }
}

// Returns (∂z or an empty tensor, ∂P, ∂Q, ∂c).
template <int K>
std::vector<torch::Tensor> lowrank_backward(torch::Tensor grad, torch::Tensor z, torch::Tensor Pb, torch::Tensor Qb,
                                            torch::Tensor c, bool need_z) {
  const int64_t M = z.size(0), d = z.size(1);
  const Blocks g(d, Pb.size(1));
  const int threads = at::get_num_threads();  // torch.set_num_threads applies here too
  const auto Pp = padded_copy<K>(Pb, g), Qp = padded_copy<K>(Qb, g);
  const int64_t stride = K * g.n * g.padded;
  std::vector<float> grad_P(threads * stride, 0.f), grad_Q(threads * stride, 0.f), grad_c(threads * g.n * K, 0.f);
  auto grad_z = need_z ? torch::empty_like(z) : torch::empty({0}, z.options());
  const float *P = Pp.data(), *Q = Qp.data(), *C = c.numel() ? c.data_ptr<float>() : nullptr;
  const Rows Z(z.data_ptr<float>(), M, d), G(grad.data_ptr<float>(), M, d);
  float* GZ = need_z ? grad_z.data_ptr<float>() : nullptr;
#pragma omp parallel num_threads(threads)
  {
    const int me = omp_get_thread_num();
    float *dP = grad_P.data() + me * stride, *dQ = grad_Q.data() + me * stride, *dc = grad_c.data() + me * g.n * K;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < M; ++t) {
      lowrank_backward_row<K>(g, Z[t], G[t], GZ ? GZ + t * d : nullptr, P, Q, C, dP, dQ, dc, d);
    }
  }
  auto sum_c = torch::zeros({g.n, K}, z.options());
  for (int th = 0; th < threads; ++th) {
    for (int64_t x = 0; x < g.n * K; ++x) sum_c.data_ptr<float>()[x] += grad_c[th * g.n * K + x];
  }
  return {grad_z, unpadded_sum<K>(grad_P, threads, g, z), unpadded_sum<K>(grad_Q, threads, g, z), sum_c};
}

// out = zi m for one block: a row zi of b = 16·NV features times the b × b block m, the outputs in registers.
template <int NV>
inline void block_times(const float* zi, const float* m, float* out) {
  constexpr int64_t b = NV * W16;
  v16 acc[NV] = {};
  for (int64_t j = 0; j < b; ++j) {  // out += zi[j] · (row j of m)
    for (int v = 0; v < NV; ++v) acc[v] += zi[j] * load(m + j * b + v * W16);
  }
  for (int v = 0; v < NV; ++v) store(out + v * W16, acc[v]);
}

// y_i = z_i M_i for every row (z_i a row of b = 16·NV features).
template <int NV>
torch::Tensor dense_forward(torch::Tensor z, torch::Tensor M) {
  constexpr int64_t b = NV * W16;
  const int64_t rows = z.size(0), d = z.size(1), n = M.size(0);
  auto y = torch::empty_like(z);
  const float *Z = z.data_ptr<float>(), *Mp = M.data_ptr<float>();
  float* Y = y.data_ptr<float>();
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t t = 0; t < rows; ++t) {
    for (int64_t i = 0; i < n; ++i) block_times<NV>(Z + t * d + i * b, Mp + i * b * b, Y + t * d + i * b);
  }
  return y;
}

// ∂M_i = Σ_t z_iᵀ g_i, and where ``GZ`` is given ∂z_i = g_i M_iᵀ (``Mt``: the blocks transposed), in one pass over
// the rows: RB rows at a time, block by block, so that the rows' g_i are read from memory once for both.
template <int NV>
torch::Tensor dense_backward(torch::Tensor grad, torch::Tensor z, const float* Mt, float* GZ, int64_t n) {
  constexpr int64_t b = NV * W16;
  const int64_t rows = z.size(0), d = z.size(1);
  const int threads = at::get_num_threads();  // torch.set_num_threads applies here too
  auto grad_M = torch::zeros({n, b, b}, z.options());  // the first thread's sum; the others' beside it
  std::vector<float> others((threads - 1) * n * b * b, 0.f);
  const float *G = grad.data_ptr<float>(), *Z = z.data_ptr<float>();
#pragma omp parallel num_threads(threads)
  {
    const int me = omp_get_thread_num();
    float* dM = me == 0 ? grad_M.data_ptr<float>() : others.data() + (me - 1) * n * b * b;
#pragma omp for schedule(static)
    for (int64_t t0 = 0; t0 < rows; t0 += RB) {
      const int64_t count = std::min<int64_t>(RB, rows - t0);
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t j = 0; j < b; ++j) {  // row j of ∂M_i += Σ_t z_i[j] · g_i over the RB rows
          float* dr = dM + (i * b + j) * b;
          v16 acc[NV];
          for (int v = 0; v < NV; ++v) acc[v] = load(dr + v * W16);
          for (int64_t t = t0; t < t0 + count; ++t) {
            const float zj = Z[t * d + i * b + j];
            for (int v = 0; v < NV; ++v) acc[v] += zj * load(G + t * d + i * b + v * W16);
          }
          for (int v = 0; v < NV; ++v) store(dr + v * W16, acc[v]);
        }
        if (!GZ) continue;
        for (int64_t t = t0; t < t0 + count; ++t) {  // ∂z_i = g_i M_iᵀ
          block_times<NV>(G + t * d + i * b, Mt + i * b * b, GZ + t * d + i * b);
        }
      }
    }
  }
  float* sum = grad_M.data_ptr<float>();
  for (int th = 1; th < threads; ++th) {
    for (int64_t x = 0; x < n * b * b; ++x) sum[x] += others[(th - 1) * n * b * b + x];
  }
  return grad_M;
}

torch::Tensor dense_dispatch_forward(torch::Tensor z, torch::Tensor M) {
  switch (M.size(1)) {
    case 16: return dense_forward<1>(z, M);
    case 32: return dense_forward<2>(z, M);
    case 48: return dense_forward<3>(z, M);
    case 64: return dense_forward<4>(z, M);
  }
  TORCH_CHECK(false, "peftlab's block kernel takes dense blocks of 16, 32, 48 or 64, not ", M.size(1));
}

// -- OFT's rotations from their parameters, one block at a time in cache -------------------------------------------
// θ_r holds the b(b−1)/2 entries above the diagonal of S_r, row by row (torch.triu_indices(b, b, 1)'s order):
//
//   S_r = triu(θ_r) − triu(θ_r)ᵀ        X_r = (I + S_r)⁻¹        R_r = 2 X_r − I = (I − S_r)(I + S_r)⁻¹
//   ∂S_r = −2 X_rᵀ G_r X_rᵀ = −½ Y_r G_r Y_r,  Y_r = R_rᵀ + I  (as X_r = (R_r + I)/2)
//   ∂θ_r = the entries above the diagonal of ∂S_r − ∂S_rᵀ
//
// with G_r = ∂L/∂R_r, so the backward needs only R. PyTorch runs this as a dozen passes over the stack of every
// layer's blocks (19 MB for OFT on all linear layers of the embedded model); here each block is built, inverted
// and differentiated while it sits in L1. I + S is inverted by Gauss–Jordan elimination without pivoting, which
// is stable here: the symmetric part of I + S is I, that of every Schur complement stays ⪰ I, so no pivot is
// below 1, and no entry grows past what the inverse holds (‖(I + S)x‖² = ‖x‖² + ‖Sx‖²: X's singular values
// are at most 1).

// A block of b ≤ 64 features is worked on as B × B, B = 16·NV ≥ b, in thread-local scratch: S padded with zeros,
// so I + S is blockdiag(I + S, I), its inverse blockdiag(X, I), and G padded with zeros gives ∂S padded with zeros.
template <int NV>
struct CayleyBlock {
  static constexpr int64_t B = NV * W16;
  double A[B * B];                     // forward: I + S, inverted in place
  float Gw[B * B], Y[B * B], T[B * B];  // backward: G padded (then Y G Y), Rᵀ + I, G Y

  // C = A M for the first ``rows`` rows of B × B row-major A and C, one row of C at a time in registers.
  static void product(const float* A, const float* M, float* C, int64_t rows) {
    for (int64_t i = 0; i < rows; ++i) {
      v16 acc[NV] = {};
      for (int64_t k = 0; k < B; ++k) {
        for (int v = 0; v < NV; ++v) acc[v] += A[i * B + k] * load(M + k * B + v * W16);
      }
      for (int v = 0; v < NV; ++v) store(C + i * B + v * W16, acc[v]);
    }
  }

  // R = 2 (I + S)⁻¹ − I, S from θ, eliminated in float64 and rounded once (in float32 the diagonal, near 1, would
  // collect a rounding per step: 7e-7 from the float64 reference, where the float64 route gives 3e-8).
  void forward(const float* theta, float* R, int64_t b) {
    std::fill(A, A + B * B, 0.0);
    for (int64_t i = 0, at = 0; i < B; ++i) {
      A[i * B + i] = 1.0;
      for (int64_t j = i + 1; j < b; ++j, ++at) {
        A[i * B + j] = theta[at];
        A[j * B + i] = -theta[at];
      }
    }
    const l8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
    for (int64_t k = 0; k < b; ++k) {  // Gauss–Jordan in place: A becomes (I + S)⁻¹ (rows past b stay I's)
      const double p = 1.0 / A[k * B + k];
      d8 sweep[2 * NV];  // row k, scaled, as subtracted from the others (lane k: p + 1); stored with lane k: p
      for (int v = 0; v < 2 * NV; ++v) {
        const d8 e = lane + static_cast<long long>(v * 8) == static_cast<long long>(k) ? d8{} + 1.0 : d8{};
        const d8 scaled = loadd(A + k * B + v * 8) * p;  // lane k: 1
        stored(A + k * B + v * 8, scaled + (p - 1.0) * e);
        sweep[v] = scaled + p * e;
      }
      for (int64_t i = 0; i < b; ++i) {  // row i −= A_ik · row k, and A_ik becomes −A_ik p
        if (i == k) continue;
        const double f = A[i * B + k];
        for (int v = 0; v < 2 * NV; ++v) stored(A + i * B + v * 8, loadd(A + i * B + v * 8) - f * sweep[v]);
      }
    }
    for (int64_t i = 0; i < b; ++i) {
      for (int64_t j = 0; j < b; ++j) R[i * b + j] = static_cast<float>(2.0 * A[i * B + j] - (i == j ? 1.0 : 0.0));
    }
  }

  // ∂θ from G = ∂L/∂R and R.
  void backward(const float* R, const float* G, float* dtheta, int64_t b) {
    std::fill(Y, Y + B * B, 0.f);
    std::fill(Gw, Gw + B * B, 0.f);
    for (int64_t i = 0; i < b; ++i) {
      for (int64_t j = 0; j < b; ++j) {
        Y[i * B + j] = R[j * b + i] + (i == j ? 1.f : 0.f);
        Gw[i * B + j] = G[i * b + j];
      }
    }
    product(Gw, Y, T, B);  // T = G Y (rows past b: zero)
    product(Y, T, Gw, b);  // Gw = Y G Y = −2 ∂S
    for (int64_t i = 0, at = 0; i < b; ++i) {
      for (int64_t j = i + 1; j < b; ++j, ++at) dtheta[at] = -0.5f * (Gw[i * B + j] - Gw[j * B + i]);
    }
  }
};

}  // namespace

static void check(std::initializer_list<torch::Tensor> tensors) {
  for (const auto& t : tensors) {
    TORCH_CHECK(t.numel() == 0 || (t.is_contiguous() && t.scalar_type() == torch::kFloat && t.device().is_cpu()),
                "peftlab's block kernel takes contiguous float32 CPU tensors");
  }
}

static void check_lowrank(const torch::Tensor& z, const torch::Tensor& P, const torch::Tensor& Q,
                          const torch::Tensor& c) {
  check({z, P, Q, c});
  TORCH_CHECK(P.dim() == 3 && P.sizes() == Q.sizes() && (P.size(2) == 1 || P.size(2) == 2),
              "peftlab's block kernel takes P and Q of shape (blocks, b, k), k = 1 or 2");
  TORCH_CHECK(z.dim() == 2 && P.size(0) * P.size(1) == z.size(1), "peftlab's block kernel: the width ", z.size(1),
              " is not the blocks' ", P.size(0), " × ", P.size(1));
  TORCH_CHECK(c.numel() == 0 || (c.dim() == 2 && c.size(0) == P.size(0) && c.size(1) == P.size(2)),
              "peftlab's block kernel takes c of shape (blocks, k)");
}

static void check_dense(const torch::Tensor& z, const torch::Tensor& M) {
  check({z, M});
  TORCH_CHECK(z.dim() == 2 && M.dim() == 3 && M.size(1) == M.size(2) && M.size(0) * M.size(1) == z.size(1),
              "peftlab's block kernel takes blocks of shape (n, b, b) with n·b the width ", z.size(1));
}

torch::Tensor lowrank_fwd(torch::Tensor z, torch::Tensor P, torch::Tensor Q, torch::Tensor c) {
  check_lowrank(z, P, Q, c);
  return P.size(2) == 1 ? lowrank_forward<1>(z, P, Q, c) : lowrank_forward<2>(z, P, Q, c);
}

std::vector<torch::Tensor> lowrank_bwd(torch::Tensor grad, torch::Tensor z, torch::Tensor P, torch::Tensor Q,
                                       torch::Tensor c, bool need_z) {
  check_lowrank(z, P, Q, c);
  check({grad});
  TORCH_CHECK(grad.sizes() == z.sizes(), "peftlab's block kernel: the gradient's shape differs from the input's");
  return P.size(2) == 1 ? lowrank_backward<1>(grad, z, P, Q, c, need_z) : lowrank_backward<2>(grad, z, P, Q, c, need_z);
}

torch::Tensor dense_fwd(torch::Tensor z, torch::Tensor M) {
  check_dense(z, M);
  return dense_dispatch_forward(z, M);
}

std::vector<torch::Tensor> dense_bwd(torch::Tensor grad, torch::Tensor z, torch::Tensor M, bool need_z) {
  check_dense(z, M);
  check({grad});
  TORCH_CHECK(grad.sizes() == z.sizes(), "peftlab's block kernel: the gradient's shape differs from the input's");
  const auto Mt = need_z ? M.transpose(1, 2).contiguous() : M;
  auto grad_z = need_z ? torch::empty_like(z) : torch::empty({0}, z.options());
  const float* mt = Mt.data_ptr<float>();
  float* gz = need_z ? grad_z.data_ptr<float>() : nullptr;
  switch (M.size(1)) {
    case 16: return {grad_z, dense_backward<1>(grad, z, mt, gz, M.size(0))};
    case 32: return {grad_z, dense_backward<2>(grad, z, mt, gz, M.size(0))};
    case 48: return {grad_z, dense_backward<3>(grad, z, mt, gz, M.size(0))};
    case 64: return {grad_z, dense_backward<4>(grad, z, mt, gz, M.size(0))};
  }
  TORCH_CHECK(false, "peftlab's block kernel takes dense blocks of 16, 32, 48 or 64, not ", M.size(1));
}

torch::Tensor dense_products(torch::Tensor left, torch::Tensor right, int64_t b) {
  check({left, right});
  TORCH_CHECK(left.dim() == 2 && left.sizes() == right.sizes() && b > 0 && left.size(1) % b == 0,
              "peftlab's block kernel takes two (tokens, n·b) tensors of the same shape, b = ", b);
  const int64_t n = left.size(1) / b;
  switch (b) {  // block i of leftᵀ right is the dense backward's ∂M_i with z = left, g = right
    case 16: return dense_backward<1>(right, left, nullptr, nullptr, n);
    case 32: return dense_backward<2>(right, left, nullptr, nullptr, n);
    case 48: return dense_backward<3>(right, left, nullptr, nullptr, n);
    case 64: return dense_backward<4>(right, left, nullptr, nullptr, n);
  }
  TORCH_CHECK(false, "peftlab's block kernel takes dense blocks of 16, 32, 48 or 64, not ", b);
}

template <int NV>
torch::Tensor cayley_forward(torch::Tensor theta, int64_t b) {
  const int64_t n = theta.size(0), half = theta.size(1);
  auto R = torch::empty({n, b, b}, theta.options());
  const float* Th = theta.data_ptr<float>();
  float* Rp = R.data_ptr<float>();
#pragma omp parallel num_threads(at::get_num_threads())
  {
    auto block = std::make_unique<CayleyBlock<NV>>();
#pragma omp for schedule(static)
    for (int64_t r = 0; r < n; ++r) block->forward(Th + r * half, Rp + r * b * b, b);
  }
  return R;
}

template <int NV>
torch::Tensor cayley_backward(torch::Tensor grad, torch::Tensor R) {
  const int64_t n = R.size(0), b = R.size(1), half = b * (b - 1) / 2;
  auto dtheta = torch::empty({n, half}, R.options());
  const float *Rp = R.data_ptr<float>(), *G = grad.data_ptr<float>();
  float* dT = dtheta.data_ptr<float>();
#pragma omp parallel num_threads(at::get_num_threads())
  {
    auto block = std::make_unique<CayleyBlock<NV>>();
#pragma omp for schedule(static)
    for (int64_t r = 0; r < n; ++r) block->backward(Rp + r * b * b, G + r * b * b, dT + r * half, b);
  }
  return dtheta;
}

torch::Tensor cayley_fwd(torch::Tensor theta, int64_t b) {
  check({theta});
  TORCH_CHECK(b >= 2 && b <= 64, "peftlab's block kernel takes rotation blocks of 2 to 64, not ", b);
  TORCH_CHECK(theta.dim() == 2 && theta.size(1) == b * (b - 1) / 2,
              "peftlab's block kernel takes θ of shape (blocks, b(b−1)/2) for blocks of size b = ", b);
  switch ((b + W16 - 1) / W16) {
    case 1: return cayley_forward<1>(theta, b);
    case 2: return cayley_forward<2>(theta, b);
    case 3: return cayley_forward<3>(theta, b);
    default: return cayley_forward<4>(theta, b);
  }
}

torch::Tensor cayley_bwd(torch::Tensor grad, torch::Tensor R) {
  check({grad, R});
  TORCH_CHECK(R.dim() == 3 && R.size(1) == R.size(2) && R.size(1) >= 2 && R.size(1) <= 64 && grad.sizes() == R.sizes(),
              "peftlab's block kernel takes R and its gradient of shape (blocks, b, b), b = 2 to 64");
  switch ((R.size(1) + W16 - 1) / W16) {
    case 1: return cayley_backward<1>(grad, R);
    case 2: return cayley_backward<2>(grad, R);
    case 3: return cayley_backward<3>(grad, R);
    default: return cayley_backward<4>(grad, R);
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lowrank_forward", &lowrank_fwd, "y_i = z_i + Q_i (P_iᵀ z_i − c_i) per block, P and Q (n × b × k)");
  m.def("lowrank_backward", &lowrank_bwd, "(∂z, ∂P, ∂Q, ∂c) of the low-rank block transform");
  m.def("dense_forward", &dense_fwd, "y_i = z_i M_i per block of b features (b = 16, 32, 48 or 64), M (n × b × b)");
  m.def("dense_backward", &dense_bwd, "(∂z, ∂M) of the dense block transform");
  m.def("dense_products", &dense_products, "block i of leftᵀ right for blocks of b = 16, 32, 48 or 64 features");
  m.def("cayley_forward", &cayley_fwd, "R = (I − S)(I + S)⁻¹ per block, S skew from θ (blocks × b(b−1)/2)");
  m.def("cayley_backward", &cayley_bwd, "∂θ of the Cayley transform from ∂R and R");
}
