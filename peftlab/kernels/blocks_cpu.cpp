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
// cache-cold activations cost far more than their arithmetic. Here each row is read from memory once per
// direction: the forward reads z and writes y, the backward reads z and g and writes ∂z (the low-rank transform
// works on groups of VF rows, read a second time from cache; VF: a vector register's floats, 16 with AVX-512 and
// 8 with AVX2). Threads split the rows; the parameter gradients are summed per thread and added up at the end.
//
// Layouts (checked by the entry points): float32, contiguous; z as rows × d, P and Q as n × b × k, c as n × k, M
// as n × b × b with b = 16, 32, 48 or 64. Any block size for the low-rank transform: a row is read in chunks of
// VF features, the last one masked, and written only up to its end; the last row of the tensor is read from a
// padded copy: nothing outside the tensors is touched.
#include "extension.h"
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "simd.h"

namespace {

using namespace peftlab_simd;  // vf, vd: the CPU's own vector registers of floats and doubles (VF, VD lanes)

typedef int vi __attribute__((vector_size(VF * 4)));  // VF int lanes: permutes and masks of vf
constexpr int64_t W16 = 16;  // floats per cache line; blocks of the dense kernels are multiples of it

inline vi lanes() {  // {0, 1, …, VF − 1}
  vi lane;
  for (int l = 0; l < VF; ++l) lane[l] = l;
  return lane;
}
inline vf keep_first(vf v, int64_t count) {  // lanes ≥ count set to zero
  return lanes() < static_cast<int>(count) ? v : vf{};
}

// -- the low-rank transform, VF rows at a time ---------------------------------------------------------------------
// A block's projections P_iᵀ z_i are sums over its b features. Row by row, every block and vector needs a
// horizontal sum of a register, and blocks that are not multiples of VF leave lanes idle (b = 18: two chunks for
// 18 features); a row-at-a-time kernel was compute-bound, at 3.6× the time of a copy of the same activations in
// the model's training step.
// Here the rows go in groups of VF (a register's lanes: 16 with AVX-512, 8 with AVX2). A group is transposed tile
// by tile (VF rows × VF features), so that one vector holds one feature of the group's rows, and a block's
// projections are plain multiply-adds over its features, for the VF rows at once. The per-block results go back
// to the rows' lanes by a permute: chunk c of a row (features VF·c to VF·c + VF − 1) lies in at most VF
// consecutive blocks from block w_c = VF·c / b, and lane l takes entry (VF·c + l) / b − w_c of the row's values
// from there.
constexpr int64_t GR = VF;  // rows per group: one vector holds one feature of each

// r[0..VF−1], a VF × VF matrix (row t in r[t]), transposed in place. A step interleaves rows i and i + VF/2 into
// rows 2i and 2i + 1, which rotates the bits of an entry's (row, lane) left by one: log2(VF) steps swap row and lane.
inline void transpose(vf* r) {
  constexpr int H = VF / 2;
  for (int step = 1; step < VF; step *= 2) {
    vf t[VF];
    for (int i = 0; i < H; ++i) {
#if PEFTLAB_VF == 16
      t[2 * i] = __builtin_shufflevector(r[i], r[i + H], 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
      t[2 * i + 1] = __builtin_shufflevector(r[i], r[i + H], 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
#elif PEFTLAB_VF == 8
      t[2 * i] = __builtin_shufflevector(r[i], r[i + H], 0, 8, 1, 9, 2, 10, 3, 11);
      t[2 * i + 1] = __builtin_shufflevector(r[i], r[i + H], 4, 12, 5, 13, 6, 14, 7, 15);
#else
      t[2 * i] = __builtin_shufflevector(r[i], r[i + H], 0, 4, 1, 5);
      t[2 * i + 1] = __builtin_shufflevector(r[i], r[i + H], 2, 6, 3, 7);
#endif
    }
    for (int i = 0; i < VF; ++i) r[i] = t[i];
  }
}

// A row of d = n·b features read in chunks of VF (the last holding ``tail``), and each chunk's view of the blocks.
struct LowRankLayout {
  int64_t d, n, b, chunks, tail, padded;  // padded = VF·chunks
  int64_t blocks_v, stride;  // n rounded up to VF; a row's per-block values with VF entries of slack (the windows)
  std::vector<int64_t> window;  // w_c, the block of chunk c's first feature
  std::vector<vi> lane_block;  // (VF·c + l) / b − w_c, past the row's end that of its last block
  LowRankLayout(int64_t d_, int64_t b_)
      : d(d_), n(d_ / b_), b(b_), chunks((d_ + VF - 1) / VF), tail(d_ - (chunks - 1) * VF), padded(chunks * VF),
        blocks_v((n + VF - 1) / VF * VF), stride(blocks_v + VF), window(chunks), lane_block(chunks) {
    for (int64_t c = 0; c < chunks; ++c) {
      window[c] = c * VF / b;
      for (int l = 0; l < VF; ++l) lane_block[c][l] = std::min((c * VF + l) / b, n - 1) - window[c];
    }
  }
  vf read(const float* row, int64_t c) const {  // chunk c of a row, zero past its end
    const vf v = loadf(row + c * VF);
    return c == chunks - 1 ? keep_first(v, tail) : v;
  }
  void write(float* row, int64_t c, vf v) const {  // only the row's own features: the next row is another's
    if (c == chunks - 1 && tail < VF) {
      for (int64_t l = 0; l < tail; ++l) row[c * VF + l] = v[l];
    } else {
      storef(row + c * VF, v);
    }
  }
  // Lanes of chunk c from a row's per-block values (``values`` + ``stride`` floats, zero past the blocks).
  vf spread(const float* values, int64_t c) const { return __builtin_shuffle(loadf(values + window[c]), lane_block[c]); }
};

// P (n × b × k) as k rows of ``padded`` features (P[k][f] = P_i[j][k] for f = i·b + j), zeros past d.
template <int K>
std::vector<float> by_feature(const torch::Tensor& P, const LowRankLayout& L) {
  std::vector<float> out(K * L.padded, 0.f);
  const float* p = P.data_ptr<float>();
  for (int64_t f = 0; f < L.d; ++f) {
    for (int k = 0; k < K; ++k) out[k * L.padded + f] = p[f * K + k];
  }
  return out;
}

// Rows of a (rows × d) tensor in groups of VF: the last row through a copy with a chunk of slack after it (a chunk
// reads VF floats), rows past the end as zeros.
struct Rows {
  const float* data;
  int64_t rows, d;
  std::vector<float> last, zeros;
  Rows(const float* data_, int64_t rows_, int64_t d_)
      : data(data_), rows(rows_), d(d_), last(d_ + VF, 0.f), zeros(d_ + VF, 0.f) {
    if (rows) std::memcpy(last.data(), data + (rows - 1) * d, d * sizeof(float));
  }
  const float* operator[](int64_t t) const { return t < rows - 1 ? data + t * d : t == rows - 1 ? last.data() : zeros.data(); }
  void group(int64_t first, const float* out[GR]) const {
    for (int64_t t = 0; t < GR; ++t) out[t] = (*this)[first + t];
  }
};

// T[f] = feature f of a group's VF rows.
inline void transpose_group(const float* const rows[GR], const LowRankLayout& L, vf* T) {
  for (int64_t c = 0; c < L.chunks; ++c) {
    vf r[GR];
    for (int64_t t = 0; t < GR; ++t) r[t] = L.read(rows[t], c);
    transpose(r);
    for (int64_t l = 0; l < VF; ++l) T[c * VF + l] = r[l];
  }
}

// out[k·blocks_v + i] = Σ_j T[i·b + j] · P[k][i·b + j] − C[i·K + k], block i's projections for the VF rows.
template <int K>
void project(const vf* T, const float* P, const float* C, const LowRankLayout& L, vf* out) {
  constexpr int U = 4 / K;  // independent sums per vector: 4 multiply-adds in flight
  for (int64_t i = 0; i < L.n; ++i) {
    const vf* Ti = T + i * L.b;
    vf acc[K][U] = {};
    int64_t j = 0;
    for (; j + U <= L.b; j += U) {
      for (int u = 0; u < U; ++u) {
        for (int k = 0; k < K; ++k) acc[k][u] += Ti[j + u] * P[k * L.padded + i * L.b + j + u];
      }
    }
    for (; j < L.b; ++j) {
      for (int k = 0; k < K; ++k) acc[k][0] += Ti[j] * P[k * L.padded + i * L.b + j];
    }
    for (int k = 0; k < K; ++k) {
      vf sum = acc[k][0];
      for (int u = 1; u < U; ++u) sum += acc[k][u];
      out[k * L.blocks_v + i] = C ? sum - C[i * K + k] : sum;
    }
  }
}

// values[(t·K + k)·stride + i] = sums[k·blocks_v + i][t]: the group's per-block values row by row (``sums`` is
// zero past n, where no lane's block is).
template <int K>
void rows_of(const vf* sums, const LowRankLayout& L, float* values) {
  for (int k = 0; k < K; ++k) {
    for (int64_t i = 0; i < L.blocks_v; i += VF) {
      vf r[GR];
      for (int64_t t = 0; t < GR; ++t) r[t] = sums[k * L.blocks_v + i + t];
      transpose(r);
      for (int64_t t = 0; t < GR; ++t) storef(values + (t * K + k) * L.stride + i, r[t]);
    }
  }
}

// A group's projections onto one set of vectors (a = Pᵀz − c, or e = Qᵀg), by block (one vector holds the VF
// rows') and by row (what the rows' lanes take them from): per-thread scratch.
template <int K>
struct Projections {
  std::vector<vf> by_block;
  std::vector<float> by_row;
  explicit Projections(const LowRankLayout& L) : by_block(K * L.blocks_v, vf{}), by_row(GR * K * L.stride, 0.f) {}
  void compute(const vf* T, const float* P, const float* C, const LowRankLayout& L) {
    project<K>(T, P, C, L, by_block.data());
    rows_of<K>(by_block.data(), L, by_row.data());
  }
  const float* row(int64_t t, int k, const LowRankLayout& L) const { return by_row.data() + (t * K + k) * L.stride; }
};

template <int K>
torch::Tensor lowrank_forward(torch::Tensor z, torch::Tensor Pb, torch::Tensor Qb, torch::Tensor c) {
  const int64_t M = z.size(0), d = z.size(1), groups = (M + GR - 1) / GR;
  const LowRankLayout L(d, Pb.size(1));
  auto y = torch::empty_like(z);
  const auto Pf = by_feature<K>(Pb, L), Qf = by_feature<K>(Qb, L);
  const float* C = c.numel() ? c.data_ptr<float>() : nullptr;
  const Rows Z(z.data_ptr<float>(), M, d);
  float* Y = y.data_ptr<float>();
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::unique_ptr<vf[]> T(new vf[L.padded]);  // a group transposed
    Projections<K> a(L);
#pragma omp for schedule(static)
    for (int64_t grp = 0; grp < groups; ++grp) {
      const float* rows[GR];
      Z.group(grp * GR, rows);
      transpose_group(rows, L, T.get());
      a.compute(T.get(), Pf.data(), C, L);  // a = Pᵀz − c
      const int64_t count = std::min(GR, M - grp * GR);
      for (int64_t ch = 0; ch < L.chunks; ++ch) {  // y = z + Q a, chunk by chunk down the group
        vf q[K];
        for (int k = 0; k < K; ++k) q[k] = loadf(Qf.data() + k * L.padded + ch * VF);
        for (int64_t t = 0; t < count; ++t) {
          vf out = L.read(rows[t], ch);
          for (int k = 0; k < K; ++k) out += L.spread(a.row(t, k, L), ch) * q[k];
          L.write(Y + (grp * GR + t) * d, ch, out);
        }
      }
    }
  }
  return y;
}

// Returns (∂z or an empty tensor, ∂P, ∂Q, ∂c): ∂z = g + P e with e = Qᵀg, ∂P = Σ z eᵀ, ∂Q = Σ g aᵀ, ∂c = −Σ e.
template <int K>
std::vector<torch::Tensor> lowrank_backward(torch::Tensor grad, torch::Tensor z, torch::Tensor Pb, torch::Tensor Qb,
                                            torch::Tensor c, bool need_z) {
  const int64_t M = z.size(0), d = z.size(1), groups = (M + GR - 1) / GR;
  const LowRankLayout L(d, Pb.size(1));
  const int threads = at::get_num_threads();  // torch.set_num_threads applies here too
  const auto Pf = by_feature<K>(Pb, L), Qf = by_feature<K>(Qb, L);
  const int64_t per_thread = K * L.padded;  // a thread's ∂P (and ∂Q) by feature
  std::vector<float> grad_P(threads * per_thread, 0.f), grad_Q(threads * per_thread, 0.f);
  std::vector<vf> grad_c(threads * K * L.blocks_v, vf{});  // −Σ e per block, the sums over a group's rows in lanes
  auto grad_z = need_z ? torch::empty_like(z) : torch::empty({0}, z.options());
  const float* C = c.numel() ? c.data_ptr<float>() : nullptr;
  const Rows Z(z.data_ptr<float>(), M, d), G(grad.data_ptr<float>(), M, d);
  float* GZ = need_z ? grad_z.data_ptr<float>() : nullptr;
#pragma omp parallel num_threads(threads)
  {
    const int me = omp_get_thread_num();
    float *dP = grad_P.data() + me * per_thread, *dQ = grad_Q.data() + me * per_thread;
    vf* dc = grad_c.data() + me * K * L.blocks_v;
    std::unique_ptr<vf[]> T(new vf[L.padded]);  // a group transposed
    Projections<K> a(L), e(L);
#pragma omp for schedule(static)
    for (int64_t grp = 0; grp < groups; ++grp) {
      const float *zrows[GR], *grows[GR];
      Z.group(grp * GR, zrows);
      G.group(grp * GR, grows);
      transpose_group(zrows, L, T.get());
      a.compute(T.get(), Pf.data(), C, L);  // a = Pᵀz − c
      transpose_group(grows, L, T.get());
      e.compute(T.get(), Qf.data(), nullptr, L);  // e = Qᵀg
      for (int64_t x = 0; x < K * L.blocks_v; ++x) dc[x] -= e.by_block[x];
      const int64_t count = std::min(GR, M - grp * GR);
      for (int64_t ch = 0; ch < L.chunks; ++ch) {  // down the group: ∂P, ∂Q of the chunk's features in registers
        vf p[K], sum_P[K], sum_Q[K];
        for (int k = 0; k < K; ++k) {
          const int64_t at = k * L.padded + ch * VF;
          p[k] = loadf(Pf.data() + at), sum_P[k] = loadf(dP + at), sum_Q[k] = loadf(dQ + at);
        }
        for (int64_t t = 0; t < count; ++t) {
          const vf zc = L.read(zrows[t], ch), gc = L.read(grows[t], ch);
          vf out = gc;
          for (int k = 0; k < K; ++k) {
            const vf ek = L.spread(e.row(t, k, L), ch);
            sum_P[k] += zc * ek;
            sum_Q[k] += gc * L.spread(a.row(t, k, L), ch);
            out += ek * p[k];
          }
          if (GZ) L.write(GZ + (grp * GR + t) * d, ch, out);
        }
        for (int k = 0; k < K; ++k) {
          const int64_t at = k * L.padded + ch * VF;
          storef(dP + at, sum_P[k]), storef(dQ + at, sum_Q[k]);
        }
      }
    }
  }
  // The threads' sums, back to (n × b × k) and (n × k).
  auto dP = torch::empty({L.n, L.b, K}, z.options()), dQ = torch::empty({L.n, L.b, K}, z.options());
  auto dc = torch::empty({L.n, K}, z.options());
  float *oP = dP.data_ptr<float>(), *oQ = dQ.data_ptr<float>(), *oc = dc.data_ptr<float>();
  for (int64_t f = 0; f < d; ++f) {
    for (int k = 0; k < K; ++k) {
      float sp = 0.f, sq = 0.f;
      for (int th = 0; th < threads; ++th) sp += grad_P[th * per_thread + k * L.padded + f], sq += grad_Q[th * per_thread + k * L.padded + f];
      oP[f * K + k] = sp, oQ[f * K + k] = sq;
    }
  }
  for (int64_t i = 0; i < L.n; ++i) {
    for (int k = 0; k < K; ++k) {
      vf s{};
      for (int th = 0; th < threads; ++th) s += grad_c[(th * K + k) * L.blocks_v + i];
      oc[i * K + k] = lane_sum(s);
    }
  }
  return {grad_z, dP, dQ, dc};
}

// out_r (+)= Σ_k a(r, k) · B_k for R rows r at once: a(r, k) = A[r·ar + k·ak] a scalar, B_k the b = 16·NV floats at
// B + k·bs, out_r the b floats at out + r·os. The R·NV sums are independent, so their multiply-adds overlap; one
// row at a time (NV sums) waits on each multiply-add's latency and ran at a fifth of the vector units' rate.
// Each B_k is loaded once for the R rows.
template <int NV, int R, bool ACCUMULATE>
inline void rows_times(const float* A, int64_t ar, int64_t ak, const float* B, int64_t bs, int64_t K, float* out,
                       int64_t os) {
  constexpr int C = NV * W16 / VF;  // registers per row of b floats
  vf acc[R][C];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < C; ++v) acc[r][v] = ACCUMULATE ? loadf(out + r * os + v * VF) : vf{};
  }
  for (int64_t k = 0; k < K; ++k) {
    vf bk[C];
    for (int v = 0; v < C; ++v) bk[v] = loadf(B + k * bs + v * VF);
    for (int r = 0; r < R; ++r) {
      const float a = A[r * ar + k * ak];
      for (int v = 0; v < C; ++v) acc[r][v] += a * bk[v];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < C; ++v) storef(out + r * os + v * VF, acc[r][v]);
  }
}

// Rows per call of rows_times: the largest power of two whose sums (``registers`` per row) fill at most half the
// registers: 16/8/4/4 rows for b = 16/32/48/64 with AVX-512, 4/2/1/1 with AVX2. A power of two up to 16 divides
// b, as ∂M's rows need.
constexpr int rows_for(int registers) {
  int r = 1;
  while (2 * r * registers <= REGISTERS / 2) r *= 2;
  return r;
}
template <int NV> constexpr int ROWS = rows_for(NV * W16 / VF);

// Asks for block i's features (b = 16·NV, NV cache lines) of the rows [t0, t1) of X (rows × d) to be brought
// into L2 ahead of their use. A block's lines lie a row (d floats) apart, farther than the hardware's
// prefetchers follow, so activations that have left the cache (a layer's input, read again in the backward)
// would otherwise arrive one miss at a time: cold, the kernels ran at 2-3× their in-cache time.
template <int NV>
inline void prefetch_block(const float* X, int64_t d, int64_t i, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    for (int v = 0; v < NV; ++v) __builtin_prefetch(X + t * d + i * NV * W16 + v * W16, 0, 2);
  }
}

// Y_t,i = Z_t,i M_i for the rows [t0, t1) and every block i (Z_t,i: row t's i-th block of b = 16·NV features);
// the next R rows' blocks are prefetched alongside (up to ``rows``, the end of Z).
template <int NV>
inline void rows_times_blocks(const float* Z, const float* M, float* Y, int64_t t0, int64_t t1, int64_t d, int64_t n,
                              int64_t rows) {
  constexpr int64_t b = NV * W16;
  constexpr int R = ROWS<NV>;
  int64_t t = t0;
  for (; t + R <= t1; t += R) {
    for (int64_t i = 0; i < n; ++i) {
      prefetch_block<NV>(Z, d, i, t + R, std::min(rows, t + 2 * R));  // t + R ≤ t1 ≤ rows
      rows_times<NV, R, false>(Z + t * d + i * b, d, 1, M + i * b * b, b, b, Y + t * d + i * b, d);
    }
  }
  for (; t < t1; ++t) {
    for (int64_t i = 0; i < n; ++i) rows_times<NV, 1, false>(Z + t * d + i * b, d, 1, M + i * b * b, b, b, Y + t * d + i * b, d);
  }
}

// y_i = z_i M_i for every row (z_i a row of b = 16·NV features).
template <int NV>
torch::Tensor dense_forward(torch::Tensor z, torch::Tensor M) {
  const int64_t rows = z.size(0), d = z.size(1), n = M.size(0);
  auto y = torch::empty_like(z);
  const float *Z = z.data_ptr<float>(), *Mp = M.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  constexpr int64_t CH = 4 * ROWS<NV>;  // rows per task
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t t0 = 0; t0 < rows; t0 += CH) rows_times_blocks<NV>(Z, Mp, Y, t0, std::min(rows, t0 + CH), d, n, rows);
  return y;
}

// ∂M_i = Σ_t z_iᵀ g_i, and where ``GZ`` is given ∂z_i = g_i M_iᵀ (``Mt``: the blocks transposed), in one pass over
// the rows: CH rows at a time, block by block, so that the rows' g_i come from memory once for both. Row j of ∂M_i
// gains Σ_t z_i[j] · g_i: rows_times with the rows of ∂M as its R rows and the tokens as its k.
template <int NV>
torch::Tensor dense_backward(torch::Tensor grad, torch::Tensor z, const float* Mt, float* GZ, int64_t n) {
  constexpr int64_t b = NV * W16;
  constexpr int J = ROWS<NV>;
  constexpr int64_t CH = 64;  // rows per task: ∂M_i is loaded and stored once per CH rows
  constexpr int64_t AHEAD = 4;  // blocks
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
    for (int64_t t0 = 0; t0 < rows; t0 += CH) {
      const int64_t count = std::min<int64_t>(CH, rows - t0);
      for (int64_t i = 0; i < n; ++i) {
        // The block AHEAD blocks on, in this chunk or a later one, while this one is worked on.
        const int64_t later = i + AHEAD, at = t0 + later / n * CH;
        const int64_t from = std::min(rows, at), to = std::min(rows, at + CH);
        prefetch_block<NV>(Z, d, later % n, from, to);
        prefetch_block<NV>(G, d, later % n, from, to);
        for (int64_t j = 0; j < b; j += J) {
          rows_times<NV, J, true>(Z + t0 * d + i * b + j, 1, d, G + t0 * d + i * b, d, count, dM + (i * b + j) * b, b);
        }
      }
      if (GZ) rows_times_blocks<NV>(G, Mt, GZ, t0, t0 + count, d, n, t0 + count);
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
      vf acc[B / VF] = {};
      for (int64_t k = 0; k < B; ++k) {
        for (int v = 0; v < B / VF; ++v) acc[v] += A[i * B + k] * loadf(M + k * B + v * VF);
      }
      for (int v = 0; v < B / VF; ++v) storef(C + i * B + v * VF, acc[v]);
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
    vl lane;
    for (int l = 0; l < VD; ++l) lane[l] = l;
    for (int64_t k = 0; k < b; ++k) {  // Gauss–Jordan in place: A becomes (I + S)⁻¹ (rows past b stay I's)
      const double p = 1.0 / A[k * B + k];
      vd sweep[B / VD];  // row k, scaled, as subtracted from the others (lane k: p + 1); stored with lane k: p
      for (int v = 0; v < B / VD; ++v) {
        const vd e = lane + static_cast<long long>(v * VD) == static_cast<long long>(k) ? vd{} + 1.0 : vd{};
        const vd scaled = loadd(A + k * B + v * VD) * p;  // lane k: 1
        stored(A + k * B + v * VD, scaled + (p - 1.0) * e);
        sweep[v] = scaled + p * e;
      }
      for (int64_t i = 0; i < b; ++i) {  // row i −= A_ik · row k, and A_ik becomes −A_ik p
        if (i == k) continue;
        const double f = A[i * B + k];
        for (int v = 0; v < B / VD; ++v) stored(A + i * B + v * VD, loadd(A + i * B + v * VD) - f * sweep[v]);
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

// Registered as PyTorch operators (torch.ops.<the build's name>).
TORCH_LIBRARY(TORCH_EXTENSION_NAME, m) {
  // y_i = z_i + Q_i (P_iᵀ z_i − c_i) per block, P and Q (n × b × k)
  m.def("lowrank_forward(Tensor z, Tensor P, Tensor Q, Tensor c) -> Tensor");
  // (∂z, ∂P, ∂Q, ∂c) of the low-rank block transform
  m.def("lowrank_backward(Tensor grad, Tensor z, Tensor P, Tensor Q, Tensor c, bool need_z) -> Tensor[]");
  // y_i = z_i M_i per block of b features (b = 16, 32, 48 or 64), M (n × b × b)
  m.def("dense_forward(Tensor z, Tensor M) -> Tensor");
  // (∂z, ∂M) of the dense block transform
  m.def("dense_backward(Tensor grad, Tensor z, Tensor M, bool need_z) -> Tensor[]");
  // block i of leftᵀ right for blocks of b = 16, 32, 48 or 64 features
  m.def("dense_products(Tensor left, Tensor right, int b) -> Tensor");
  // R = (I − S)(I + S)⁻¹ per block, S skew from θ (blocks × b(b−1)/2)
  m.def("cayley_forward(Tensor theta, int b) -> Tensor");
  // ∂θ of the Cayley transform from ∂R and R
  m.def("cayley_backward(Tensor grad, Tensor R) -> Tensor");
}

// The implementations, for CPU tensors (the Python side gives shapes for tracing: kernels/__init__.py).
TORCH_LIBRARY_IMPL(TORCH_EXTENSION_NAME, CPU, m) {
  m.impl("lowrank_forward", &lowrank_fwd);
  m.impl("lowrank_backward", &lowrank_bwd);
  m.impl("dense_forward", &dense_fwd);
  m.impl("dense_backward", &dense_bwd);
  m.impl("dense_products", &dense_products);
  m.impl("cayley_forward", &cayley_fwd);
  m.impl("cayley_backward", &cayley_bwd);
}
