// This CPU's ceilings, measured on the engines' threads and independent of any engine:
//
// - peak: a register-resident loop of the one instruction each precision's convolutions are
//   made of (fp32 FMA; int8 u8*s8 dot products as oneDNN issues them: vpmaddubsw + vpmaddwd +
//   vpaddd without VNNI, vpdpbusd with it; bf16 vdpbf16ps). Independent accumulators hide the
//   latency; no memory is touched, so it measures operations per second and needs no clock.
// - achievable: oneDNN's own matmul on a large square problem (what a library reaches).
//
// Each function returns operations per second over all threads (1 multiply-add = 2 ops).
// Instruction sets are chosen per function with target attributes, so the file compiles on any
// x86-64 and the caller picks what this CPU has (ssd_pipeline/engine/peak.py).
#include <immintrin.h>
#include <omp.h>

#include <oneapi/dnnl/dnnl.hpp>
#include <tvm/ffi/error.h>
#include <tvm/ffi/function.h>

#include <chrono>
#include <cstring>
#include <string>
#include <vector>

namespace {

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Wall time of body() run once on each of `threads` OpenMP threads: ops/s over all threads.
template <typename F>
double Parallel(int threads, F body) {
  int sink = 0;  // keeps each loop's result alive
  double t0 = Now();
#pragma omp parallel num_threads(threads) reduction(+ : sink)
  sink += body();
  double secs = Now() - t0;
  return sink < 0 ? -1 : secs;
}

constexpr int kAcc = 12;  // independent chains: > latency x ports of any of these units

__attribute__((target("avx2,fma"))) int FmaAvx2(int64_t iters) {
  __m256 acc[kAcc];
  for (int i = 0; i < kAcc; ++i) acc[i] = _mm256_set1_ps(0.f);
  const __m256 a = _mm256_set1_ps(1e-7f), b = _mm256_set1_ps(1e-7f);
  for (int64_t it = 0; it < iters; ++it)
#pragma GCC unroll 16  // every accumulator in its own register
    for (int i = 0; i < kAcc; ++i) acc[i] = _mm256_fmadd_ps(a, b, acc[i]);
  float out[8];
  __m256 s = acc[0];
  for (int i = 1; i < kAcc; ++i) s = _mm256_add_ps(s, acc[i]);
  _mm256_storeu_ps(out, s);
  return out[0] > 1e30f;
}

__attribute__((target("avx512f"))) int FmaAvx512(int64_t iters) {
  __m512 acc[kAcc];
  for (int i = 0; i < kAcc; ++i) acc[i] = _mm512_set1_ps(0.f);
  const __m512 a = _mm512_set1_ps(1e-7f), b = _mm512_set1_ps(1e-7f);
  for (int64_t it = 0; it < iters; ++it)
#pragma GCC unroll 16  // every accumulator in its own register
    for (int i = 0; i < kAcc; ++i) acc[i] = _mm512_fmadd_ps(a, b, acc[i]);
  return _mm512_reduce_add_ps(acc[0]) > 1e30f;
}

// oneDNN's AVX2 int8 inner step: u8*s8 pairs summed to s16 (vpmaddubsw), pairs of those to s32
// (vpmaddwd with ones), accumulated (vpaddd): 32 multiply-adds per 256-bit step.
__attribute__((target("avx2"))) int Int8Avx2(int64_t iters) {
  __m256i acc[kAcc];
  for (int i = 0; i < kAcc; ++i) acc[i] = _mm256_setzero_si256();
  const __m256i u = _mm256_set1_epi8(1), s = _mm256_set1_epi8(1);
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t it = 0; it < iters; ++it)
#pragma GCC unroll 16  // every accumulator in its own register
    for (int i = 0; i < kAcc; ++i)
      acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), ones));
  __m256i t = acc[0];
  for (int i = 1; i < kAcc; ++i) t = _mm256_add_epi32(t, acc[i]);
  return _mm256_extract_epi32(t, 0) == 42;
}

__attribute__((target("avx512f,avx512vnni"))) int Int8Vnni512(int64_t iters) {
  __m512i acc[kAcc];
  for (int i = 0; i < kAcc; ++i) acc[i] = _mm512_setzero_si512();
  const __m512i u = _mm512_set1_epi8(1), s = _mm512_set1_epi8(1);
  for (int64_t it = 0; it < iters; ++it)
#pragma GCC unroll 16  // every accumulator in its own register
    for (int i = 0; i < kAcc; ++i) acc[i] = _mm512_dpbusd_epi32(acc[i], u, s);
  return _mm512_reduce_add_epi32(acc[0]) == 42;
}

__attribute__((target("avx2,avxvnni"))) int Int8AvxVnni(int64_t iters) {
  __m256i acc[kAcc];
  for (int i = 0; i < kAcc; ++i) acc[i] = _mm256_setzero_si256();
  const __m256i u = _mm256_set1_epi8(1), s = _mm256_set1_epi8(1);
  for (int64_t it = 0; it < iters; ++it)
#pragma GCC unroll 16  // every accumulator in its own register
    for (int i = 0; i < kAcc; ++i) acc[i] = _mm256_dpbusd_avx_epi32(acc[i], u, s);
  return _mm256_extract_epi32(acc[0], 0) == 42;
}

__attribute__((target("avx512f,avx512bf16"))) int Bf16Avx512(int64_t iters) {
  __m512 acc[kAcc];
  for (int i = 0; i < kAcc; ++i) acc[i] = _mm512_set1_ps(0.f);
  const __m512bh a = (__m512bh)_mm512_set1_epi16(0x3c00);  // ~0.0078 in bf16
  for (int64_t it = 0; it < iters; ++it)
#pragma GCC unroll 16  // every accumulator in its own register
    for (int i = 0; i < kAcc; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], a, a);
  return _mm512_reduce_add_ps(acc[0]) > 1e30f;
}

// peak(kind, threads, iters): ops/s of the register-resident loop `kind`.
double Peak(std::string kind, int64_t threads, int64_t iters) {
  double ops_per_step;  // per accumulator per iteration
  int (*fn)(int64_t);
  if (kind == "fma_avx2") {
    fn = FmaAvx2, ops_per_step = 8 * 2;
  } else if (kind == "fma_avx512") {
    fn = FmaAvx512, ops_per_step = 16 * 2;
  } else if (kind == "int8_avx2") {
    fn = Int8Avx2, ops_per_step = 32 * 2;
  } else if (kind == "int8_avx512_vnni") {
    fn = Int8Vnni512, ops_per_step = 64 * 2;
  } else if (kind == "int8_avx_vnni") {
    fn = Int8AvxVnni, ops_per_step = 32 * 2;
  } else if (kind == "bf16_avx512") {
    fn = Bf16Avx512, ops_per_step = 32 * 2;
  } else {
    TVM_FFI_THROW(ValueError) << "unknown peak kernel " << kind;
  }
  double secs = Parallel(static_cast<int>(threads), [&] { return fn(iters); });
  return ops_per_step * kAcc * static_cast<double>(iters) * threads / secs;
}

// matmul(dtype, n, reps, threads): ops/s of oneDNN's n x n x n matmul, best of reps
// ("f32": f32; "bf16": bf16 in, f32 out; "int8": u8 x s8 -> s32).
double Matmul(std::string dtype, int64_t n, int64_t reps, int64_t threads) {
  using dt = dnnl::memory::data_type;
  using tag = dnnl::memory::format_tag;
  omp_set_num_threads(static_cast<int>(threads));
  dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  dnnl::stream s(eng);
  dt a_dt = dt::f32, b_dt = dt::f32, c_dt = dt::f32;
  if (dtype == "bf16") {
    a_dt = b_dt = dt::bf16;
  } else if (dtype == "int8") {
    a_dt = dt::u8, b_dt = dt::s8, c_dt = dt::s32;
  } else if (dtype != "f32") {
    TVM_FFI_THROW(ValueError) << "unknown matmul dtype " << dtype;
  }
  dnnl::memory::desc a_md({n, n}, a_dt, tag::ab), c_md({n, n}, c_dt, tag::ab);
  auto pd = dnnl::matmul::primitive_desc(eng, a_md, dnnl::memory::desc({n, n}, b_dt, tag::any),
                                         c_md);
  dnnl::memory a(a_md, eng), b(pd.weights_desc(), eng), c(c_md, eng);
  std::memset(a.get_data_handle(), 1, a_md.get_size());
  std::memset(b.get_data_handle(), 1, pd.weights_desc().get_size());
  dnnl::matmul mm(pd);
  double best = 1e30;
  for (int64_t r = 0; r < reps + 1; ++r) {  // the first call is a warm-up
    double t0 = Now();
    mm.execute(s, {{DNNL_ARG_SRC, a}, {DNNL_ARG_WEIGHTS, b}, {DNNL_ARG_DST, c}});
    s.wait();
    if (r > 0) best = std::min(best, Now() - t0);
  }
  return 2.0 * n * n * n / best;
}

}  // namespace

TVM_FFI_DLL_EXPORT_TYPED_FUNC(peak, Peak);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(matmul, Matmul);
