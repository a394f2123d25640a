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

// The loops return the sum over every lane of every accumulator. Returning less lets the
// compiler drop the chains that do not reach the result: an earlier version returned acc[0]
// alone, GCC kept one dependent FMA chain out of 12, and the "peak" it reported was the
// latency-bound rate of one chain counted as 12 (3x the real fp32 peak on Zen 4). Inputs pass
// through an empty asm so that no loop can be folded at compile time either.
template <typename V>
__attribute__((always_inline)) inline void Opaque(V& v) {
  asm volatile("" : "+x"(v));
}

__attribute__((target("avx2,fma"))) double FmaAvx2(int64_t iters) {
  __m256 acc[kAcc];
  for (int i = 0; i < kAcc; ++i) acc[i] = _mm256_set1_ps(0.f);
  __m256 a = _mm256_set1_ps(1.f), b = _mm256_set1_ps(1.f);
  Opaque(a), Opaque(b);
  for (int64_t it = 0; it < iters; ++it)
#pragma GCC unroll 16  // every accumulator in its own register
    for (int i = 0; i < kAcc; ++i) acc[i] = _mm256_fmadd_ps(a, b, acc[i]);
  float out[8];
  double sum = 0;
  for (int i = 0; i < kAcc; ++i) {
    _mm256_storeu_ps(out, acc[i]);
    for (float x : out) sum += x;
  }
  return sum;
}

__attribute__((target("avx512f"))) double FmaAvx512(int64_t iters) {
  __m512 acc[kAcc];
  for (int i = 0; i < kAcc; ++i) acc[i] = _mm512_set1_ps(0.f);
  __m512 a = _mm512_set1_ps(1.f), b = _mm512_set1_ps(1.f);
  Opaque(a), Opaque(b);
  for (int64_t it = 0; it < iters; ++it)
#pragma GCC unroll 16  // every accumulator in its own register
    for (int i = 0; i < kAcc; ++i) acc[i] = _mm512_fmadd_ps(a, b, acc[i]);
  double sum = 0;
  for (int i = 0; i < kAcc; ++i) sum += _mm512_reduce_add_ps(acc[i]);
  return sum;
}

// The sum of every int32 lane of 256-bit accumulators.
__attribute__((target("avx2"))) double SumLanes(const __m256i (&acc)[kAcc]) {
  int32_t out[8];
  double sum = 0;
  for (int i = 0; i < kAcc; ++i) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), acc[i]);
    for (int32_t x : out) sum += x;
  }
  return sum;
}

// oneDNN's AVX2 int8 inner step: u8*s8 pairs summed to s16 (vpmaddubsw), pairs of those to s32
// (vpmaddwd with ones), accumulated (vpaddd): 32 multiply-adds per 256-bit step.
__attribute__((target("avx2"))) double Int8Avx2(int64_t iters) {
  __m256i acc[kAcc];
  for (int i = 0; i < kAcc; ++i) acc[i] = _mm256_setzero_si256();
  __m256i u = _mm256_set1_epi8(1), s = _mm256_set1_epi8(1), ones = _mm256_set1_epi16(1);
  Opaque(u), Opaque(s), Opaque(ones);
  for (int64_t it = 0; it < iters; ++it)
#pragma GCC unroll 16  // every accumulator in its own register
    for (int i = 0; i < kAcc; ++i)
      acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), ones));
  return SumLanes(acc);
}

__attribute__((target("avx512f,avx512vnni"))) double Int8Vnni512(int64_t iters) {
  __m512i acc[kAcc];
  for (int i = 0; i < kAcc; ++i) acc[i] = _mm512_setzero_si512();
  __m512i u = _mm512_set1_epi8(1), s = _mm512_set1_epi8(1);
  Opaque(u), Opaque(s);
  for (int64_t it = 0; it < iters; ++it)
#pragma GCC unroll 16  // every accumulator in its own register
    for (int i = 0; i < kAcc; ++i) acc[i] = _mm512_dpbusd_epi32(acc[i], u, s);
  double sum = 0;
  for (int i = 0; i < kAcc; ++i) sum += _mm512_reduce_add_epi32(acc[i]);
  return sum;
}

__attribute__((target("avx2,avxvnni"))) double Int8AvxVnni(int64_t iters) {
  __m256i acc[kAcc];
  for (int i = 0; i < kAcc; ++i) acc[i] = _mm256_setzero_si256();
  __m256i u = _mm256_set1_epi8(1), s = _mm256_set1_epi8(1);
  Opaque(u), Opaque(s);
  for (int64_t it = 0; it < iters; ++it)
#pragma GCC unroll 16  // every accumulator in its own register
    for (int i = 0; i < kAcc; ++i) acc[i] = _mm256_dpbusd_avx_epi32(acc[i], u, s);
  return SumLanes(acc);
}

__attribute__((target("avx512f,avx512bf16"))) double Bf16Avx512(int64_t iters) {
  __m512 acc[kAcc];
  for (int i = 0; i < kAcc; ++i) acc[i] = _mm512_set1_ps(0.f);
  __m512bh a = (__m512bh)_mm512_set1_epi16(0x3f80);  // 1.0 in bf16
  Opaque(a);
  for (int64_t it = 0; it < iters; ++it)
#pragma GCC unroll 16  // every accumulator in its own register
    for (int i = 0; i < kAcc; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], a, a);
  double sum = 0;
  for (int i = 0; i < kAcc; ++i) sum += _mm512_reduce_add_ps(acc[i]);
  return sum;
}

struct Loop {
  double (*fn)(int64_t);
  double ops_per_step;  // per accumulator per iteration (1 multiply-add = 2 ops)
};

Loop LoopOf(const std::string& kind) {
  if (kind == "fma_avx2") return {FmaAvx2, 8 * 2};
  if (kind == "fma_avx512") return {FmaAvx512, 16 * 2};
  if (kind == "int8_avx2") return {Int8Avx2, 32 * 2};
  if (kind == "int8_avx512_vnni") return {Int8Vnni512, 64 * 2};
  if (kind == "int8_avx_vnni") return {Int8AvxVnni, 32 * 2};
  if (kind == "bf16_avx512") return {Bf16Avx512, 32 * 2};
  TVM_FFI_THROW(ValueError) << "unknown peak kernel " << kind;
}

// peak(kind, threads, iters): ops/s of the register-resident loop `kind`.
double Peak(std::string kind, int64_t threads, int64_t iters) {
  const Loop loop = LoopOf(kind);
  double secs = Parallel(static_cast<int>(threads), [&] { return loop.fn(iters) < 0; });
  return loop.ops_per_step * kAcc * static_cast<double>(iters) * threads / secs;
}

// peak_check(kind, iters): what one thread's loop computed against what Peak counts for it.
// Every multiply-add of these loops adds 1 x 1 to an accumulator, so the sum of all of them is
// the number of multiply-adds run; Peak counts ops = 2 x that. Exact while a lane stays below
// 2^24 (float) / 2^31 (int32).
double PeakCheck(std::string kind, int64_t iters) {
  const Loop loop = LoopOf(kind);
  return loop.fn(iters) * 2 / (loop.ops_per_step * kAcc * static_cast<double>(iters));
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
TVM_FFI_DLL_EXPORT_TYPED_FUNC(peak_check, PeakCheck);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(matmul, Matmul);
