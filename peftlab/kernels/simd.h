// The CPU's own vector registers for the kernels' inner loops: 16 floats (8 doubles) with AVX-512, 8 floats (4
// doubles) with AVX2, 4 floats otherwise.
//
// Why not one 16-float type everywhere: a GCC vector wider than the build's registers has no machine mode, so
// every variable of that type lives in memory, and each multiply-add goes through the stack in halves. On an AVX2
// machine (AMD EPYC, 2026-12-02) the dense block kernel ran 10× slower than PyTorch's batched product that way.
#pragma once
#include <cstdint>

namespace peftlab_simd {

#if defined(PEFTLAB_VF)  // given as -DPEFTLAB_VF=16: another width's code, to test it on this CPU (slowly)
#elif defined(__AVX512F__)
#define PEFTLAB_VF 16  // also for the preprocessor: shuffles list their lanes
#elif defined(__AVX__)
#define PEFTLAB_VF 8
#else
#define PEFTLAB_VF 4
#endif
constexpr int VF = PEFTLAB_VF;
constexpr int REGISTERS = VF == 16 ? 32 : 16;  // vector registers: AVX-512 has 32, AVX2 and SSE 16
constexpr int VD = VF / 2;  // doubles per register

typedef float vf __attribute__((vector_size(VF * 4)));
typedef float vfu __attribute__((vector_size(VF * 4), aligned(4)));  // the same at any float's address
typedef double vd __attribute__((vector_size(VF * 4)));
typedef double vdu __attribute__((vector_size(VF * 4), aligned(8)));
typedef long long vl __attribute__((vector_size(VF * 4)));  // VD lanes, for comparisons with vd

// Typed vector accesses, not memcpy: a float store then cannot alias the loops' integer bounds, which would
// otherwise be reloaded from memory after every store.
inline vf loadf(const float* p) { return *reinterpret_cast<const vfu*>(p); }
inline void storef(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }
inline vd loadd(const double* p) { return *reinterpret_cast<const vdu*>(p); }
inline void stored(double* p, vd v) { *reinterpret_cast<vdu*>(p) = v; }

inline float lane_sum(vf v) {
  float s = 0.f;
  for (int i = 0; i < VF; ++i) s += v[i];
  return s;
}

}  // namespace peftlab_simd
