// Convolution offload for TVM Relax engines on x86 CPUs: oneDNN primitives behind TVM FFI
// functions that Relax calls with R.call_dps_packed (destination-passing style: the output
// tensor is the last argument). This is what IGIE does with -libs=...: the compiler keeps the
// graph and the glue ops, a vendor library runs the convolutions.
//
// Layout contract (ssd_pipeline/compile.py rewrites the graph to it): activations NHWC
// float32, weights OHWI float32 (constants), bias (O) float32. `compute` says how: 0 direct in
// float32, 1 direct in bfloat16 (avx512_bf16 / AMX where present; still reads/writes float32),
// 2 Winograd F(2x2, 3x3) in float32 (3x3, stride 1; see Wino below), 3 the same Winograd with
// its 16 products in bfloat16 (transforms in float32, products accumulated in float32).
// At bfloat16 (compute 1 and 3) src and dst may also be bfloat16 tensors: activations stay
// bfloat16 from one convolution to the next (max pools and L2Norm read them too).
// conv2d_nhwc_add also adds a residual of dst's shape before the ReLU (a residual block's
// conv -> add -> relu as one primitive: a binary post-op), float32 or, at bfloat16, bfloat16.
//
// int8 (conv2d_nhwc_int8): u8 NHWC activations (zero point 0: they follow a ReLU), s8 OHWI
// weights with one scale per output channel, f32 bias; s32 accumulation, the scales, bias and
// ReLU applied inside the primitive; the destination is u8 (requantized with its own scale,
// so the next convolution reads it as is) or f32 (dequantized, for float consumers).
//
// Primitives and reordered weights are cached per (shapes, attributes, weight address); the
// weights' content is fingerprinted so a reused address with other weights is never served a
// stale reorder.
#include <oneapi/dnnl/dnnl.hpp>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/function.h>

#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <vector>

namespace {

using tvm::ffi::TensorView;

dnnl::engine& CpuEngine() {
  static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
}

bool IsDtype(const TensorView& t, DLDataTypeCode code, int bits) {
  return t.dtype().code == code && t.dtype().bits == bits && t.dtype().lanes == 1;
}

bool IsBf16(const TensorView& t) { return IsDtype(t, kDLBfloat, 16); }

// float32, or bfloat16 where `bf16_ok` (an activation of a bfloat16 convolution)
void CheckFloat(const TensorView& t, const char* name, int ndim, bool bf16_ok) {
  TVM_FFI_ICHECK(IsDtype(t, kDLFloat, 32) || (bf16_ok && IsBf16(t)))
      << name << (bf16_ok ? " must be float32 or bfloat16" : " must be float32");
  TVM_FFI_ICHECK(t.ndim() == ndim) << name << " must have " << ndim << " dims, got " << t.ndim();
  TVM_FFI_ICHECK(t.device().device_type == kDLCPU) << name << " must be on the CPU";
  TVM_FFI_ICHECK(t.IsContiguous()) << name << " must be contiguous";
}

void CheckF32(const TensorView& t, const char* name, int ndim) {
  DLDataType f32{kDLFloat, 32, 1};
  TVM_FFI_ICHECK(t.dtype() == f32) << name << " must be float32";
  TVM_FFI_ICHECK(t.ndim() == ndim) << name << " must have " << ndim << " dims, got " << t.ndim();
  TVM_FFI_ICHECK(t.device().device_type == kDLCPU) << name << " must be on the CPU";
  TVM_FFI_ICHECK(t.IsContiguous()) << name << " must be contiguous";
}

// 16 values spread over the tensor: detects other weights behind a reused address. An array,
// not a vector: it is taken on every call, and a heap allocation per call is what it saves.
using Print = std::array<float, 16>;

Print Fingerprint(const float* p, int64_t n) {
  Print fp;
  for (int i = 0; i < 16; ++i) fp[i] = p[(n - 1) * i / 15];
  return fp;
}

// 16 bytes spread over any tensor's data (int8 weights).
Print FingerprintBytes(const void* p, int64_t nbytes) {
  Print fp;
  auto b = static_cast<const unsigned char*>(p);
  for (int i = 0; i < 16; ++i) fp[i] = b[(nbytes - 1) * i / 15];
  return fp;
}

// A cache key: the raw bytes of what is streamed in (integers, doubles, pointers; tags as
// text). Every call builds one: with a std::ostringstream (number formatting, allocations) and
// a fresh stream per call, a trivial convolution call took 6.5-8 us, ~4 us with this key and
// Stream(). Fixed widths also keep (1, 11) and (11, 1) apart, and a double's exact bits (an
// int8 scale) apart from its 6-digit print.
class Key {
 public:
  Key() { bytes_.reserve(256); }
  template <typename T>
  Key& operator<<(const T& v) {
    static_assert(std::is_arithmetic_v<T> || std::is_pointer_v<T>, "numbers and pointers only");
    bytes_.append(reinterpret_cast<const char*>(&v), sizeof(T));
    return *this;
  }
  Key& operator<<(const char* tag) {
    bytes_.append(tag);
    bytes_.push_back('\0');
    return *this;
  }
  const std::string& str() const { return bytes_; }

 private:
  std::string bytes_;
};

// The calling thread's oneDNN stream: one per thread (engines may run on several threads at
// once), made once instead of on every call.
dnnl::stream& Stream() {
  thread_local dnnl::stream s(CpuEngine());
  return s;
}

struct Conv {
  // convolution_forward, or matmul for a pointwise (1x1) convolution; the glue calls (max
  // pool, layout permute) keep their primitive here too, with src_user and dst_md only
  dnnl::primitive prim;
  dnnl::memory::desc src_user, src_prim, dst_md, bias_md;
  dnnl::memory weights;            // in the primitive's preferred format and type
  Print fingerprint{};  // of the user's weights
  bool src_reorder = false;
  std::unordered_map<int, dnnl::memory> scales;  // int8: DNNL_ARG_ATTR_SCALES | arg -> values
  dnnl::memory::desc residual_md;                 // with a residual add: its input
};

std::mutex g_mu;

// One cache per kind of entry (primitives, Winograd weights), behind g_mu.
template <typename Entry>
std::unordered_map<std::string, std::shared_ptr<Entry>>& CacheOf() {
  static std::unordered_map<std::string, std::shared_ptr<Entry>> cache;
  return cache;
}

// The cached entry for `key`, made by `make` when absent or when other weights now sit at the
// same address (their fingerprint differs).
template <typename Make>
auto Cached(const std::string& key, const Print& fingerprint, Make make)
    -> decltype(make()) {
  auto& cache = CacheOf<typename decltype(make())::element_type>();
  std::lock_guard<std::mutex> lock(g_mu);
  auto it = cache.find(key);
  if (it != cache.end() && it->second->fingerprint == fingerprint) return it->second;
  auto entry = make();
  cache[key] = entry;
  return entry;
}

// Shapes of one NHWC convolution call; a pointwise one runs as a matmul.
struct Geometry {
  int64_t n, h, w, c, o, kh, kw, oh, ow;
  bool pointwise;
};

Geometry GeometryOf(const TensorView& src, const TensorView& weight, const TensorView& dst,
                    int64_t sh, int64_t sw, int64_t pt, int64_t pl, int64_t pb, int64_t pr) {
  Geometry g{src.size(0), src.size(1), src.size(2), src.size(3), weight.size(0),
             weight.size(1), weight.size(2), dst.size(1), dst.size(2), false};
  g.pointwise = g.kh == 1 && g.kw == 1 && sh == 1 && sw == 1 && pt == 0 && pl == 0 &&
                pb == 0 && pr == 0 && g.oh == g.h && g.ow == g.w;
  return g;
}

// Post-ops: a residual add (a tensor of dst's shape) then ReLU, both optional.
dnnl::primitive_attr PostOpsAttr(bool relu, const dnnl::memory::desc* residual = nullptr) {
  dnnl::post_ops ops;
  if (residual != nullptr) ops.append_binary(dnnl::algorithm::binary_add, *residual);
  if (relu) ops.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
  dnnl::primitive_attr attr;
  attr.set_post_ops(ops);
  return attr;
}

std::shared_ptr<Conv> MakeConv(const TensorView& src, const TensorView& weight,
                               const TensorView& dst, int64_t sh, int64_t sw, int64_t pt,
                               int64_t pl, int64_t pb, int64_t pr, int64_t dh, int64_t dw,
                               bool relu, bool bf16, const TensorView* residual) {
  using tag = dnnl::memory::format_tag;
  using dt = dnnl::memory::data_type;
  const auto [n, h, w, c, o, kh, kw, oh, ow, pointwise] =
      GeometryOf(src, weight, dst, sh, sw, pt, pl, pb, pr);
  auto conv = std::make_shared<Conv>();
  const dt compute = bf16 ? dt::bf16 : dt::f32;
  const dt src_dt = IsBf16(src) ? dt::bf16 : dt::f32, dst_dt = IsBf16(dst) ? dt::bf16 : dt::f32;
  if (residual != nullptr) {
    const dt r_dt = IsBf16(*residual) ? dt::bf16 : dt::f32;
    conv->residual_md = pointwise ? dnnl::memory::desc({n * h * w, o}, r_dt, tag::ab)
                                  : dnnl::memory::desc({n, o, oh, ow}, r_dt, tag::nhwc);
  }
  dnnl::primitive_attr attr = PostOpsAttr(relu, residual ? &conv->residual_md : nullptr);
  dnnl::stream& s = Stream();
  if (pointwise) {
    // NHWC 1x1 convolution == (N*H*W x C) . (C x O): oneDNN's matmul, because its AVX2
    // pointwise convolution kernel ran SSD300's 19x19 1024->1024 layer at 36 GOP/s against
    // ~150 GOP/s for the 3x3 layers (ssd-pipeline profile, batch 8)
    const int64_t m = n * h * w;
    conv->src_user = dnnl::memory::desc({m, c}, src_dt, tag::ab);
    conv->src_prim = dnnl::memory::desc({m, c}, compute, tag::ab);
    conv->src_reorder = src_dt != compute;
    conv->dst_md = dnnl::memory::desc({m, o}, dst_dt, tag::ab);
    conv->bias_md = dnnl::memory::desc({1, o}, dt::f32, tag::ab);
    auto pd = dnnl::matmul::primitive_desc(CpuEngine(), conv->src_prim,
                                           dnnl::memory::desc({c, o}, compute, tag::any),
                                           conv->bias_md, conv->dst_md, attr);
    conv->prim = dnnl::matmul(pd);
    // OHWI with H = W = 1 is O x C row-major: the (C x O) matrix stored column-major (ba)
    auto wei_user = dnnl::memory({{c, o}, dt::f32, tag::ba}, CpuEngine(), weight.data_ptr());
    conv->weights = dnnl::memory(pd.weights_desc(), CpuEngine());
    dnnl::reorder(wei_user, conv->weights).execute(s, wei_user, conv->weights);
    s.wait();
    conv->fingerprint = Fingerprint(static_cast<const float*>(weight.data_ptr()),
                                    weight.numel());
    return conv;
  }
  conv->src_user = dnnl::memory::desc({n, c, h, w}, src_dt, tag::nhwc);
  conv->src_prim = dnnl::memory::desc({n, c, h, w}, compute, tag::nhwc);
  conv->src_reorder = src_dt != compute;
  conv->dst_md = dnnl::memory::desc({n, o, oh, ow}, dst_dt, tag::nhwc);
  conv->bias_md = dnnl::memory::desc({o}, dt::f32, tag::a);
  auto wei_any = dnnl::memory::desc({o, c, kh, kw}, compute, tag::any);
  auto pd = dnnl::convolution_forward::primitive_desc(
      CpuEngine(), dnnl::prop_kind::forward_inference, dnnl::algorithm::convolution_direct,
      conv->src_prim, wei_any, conv->bias_md, conv->dst_md, {sh, sw}, {dh - 1, dw - 1},
      {pt, pl}, {pb, pr}, attr);
  conv->prim = dnnl::convolution_forward(pd);
  auto wei_user = dnnl::memory({{o, c, kh, kw}, dt::f32, tag::ohwi}, CpuEngine(),
                               weight.data_ptr());
  conv->weights = dnnl::memory(pd.weights_desc(), CpuEngine());
  dnnl::reorder(wei_user, conv->weights).execute(s, wei_user, conv->weights);
  s.wait();
  conv->fingerprint = Fingerprint(static_cast<const float*>(weight.data_ptr()), weight.numel());
  return conv;
}

// Winograd F(m x m, 3x3), m = 2 or 4, for 3x3 stride-1 float convolutions (Lavin & Gray, 2015):
// each (m + 2)^2 input tile becomes (m + 2)^2 products of (tiles x C) . (C x O) matrices:
// 4 (m = 2) or 2.25 (m = 4) multiplies per output instead of 9. The pip build of oneDNN 3.2 has
// no Winograd convolution (AVX2 or AVX-512: no primitive descriptor), so the shim does the
// transforms (OpenMP, oneDNN's own threads) and oneDNN's matmul does the products, one batched
// call per chunk of tiles (chunk size: see MakeWino; where that matmul would repack the weights
// on every call, some chunks run as one grouped 1x1 convolution instead: see the end of
// MakeWino). Transform matrices:
// m = 2: B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1], G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1],
//        A^T = [1 1 1 0; 0 1 -1 -1];
// m = 4: B^T = [4 0 -5 0 1 0; 0 -4 -4 1 1 0; 0 4 -4 -1 1 0; 0 -2 -1 2 1 0; 0 2 -1 -2 1 0;
//        0 4 0 -5 0 1], G = [1/4 0 0; -1/6 -1/6 -1/6; -1/6 1/6 -1/6; 1/24 1/12 1/6;
//        1/24 -1/12 1/6; 0 0 1], A^T = [1 1 1 1 1 0; 0 1 -1 2 -2 0; 0 1 1 4 4 0; 0 1 -1 8 -8 1].
struct Wino {
  // [P, tc, C] . [P, C, O] -> [P, tc, O], P = (m + 2)^2: a batched matmul, or where `grouped`
  // a 1x1 convolution of P groups over the tile-major [tc][P][C] -> [tc][P][O]
  dnnl::primitive matmul;
  dnnl::memory u;          // G g G^T of every (c, o), in the primitive's weights format
  Print fingerprint{};
  int64_t tc = 0;  // tiles per chunk (the last chunk is padded with unused tiles)
  int64_t vs = 0, ms = 0;  // elements from one tile position to the next in v and m (see
                           // PositionStride; tile-major chunks ignore them)
  int m = 2;       // output tile side
  bool bf16 = false;  // the products in bfloat16: v and u bfloat16, m float32
  int64_t scratch = 0;  // bytes of a per-thread matmul's scratchpad (see RunWinograd)
  bool grouped = false;  // the products as a grouped 1x1 convolution (see the end of MakeWino)
};

// 16 floats (a zmm register in the AVX-512 transforms below), 8 (a ymm register with AVX2,
// else two SSE registers) or 1: the transforms run on whole vectors of channels, then on the
// remainder.
typedef float F16 __attribute__((vector_size(64)));
typedef float F8 __attribute__((vector_size(32)));

// L2Norm is compiled twice, AVX2 and baseline, and picked at load time.
#define VECTOR_CLONES __attribute__((target_clones("avx2", "default")))

// The Winograd transforms are compiled three times, each instruction set with its own vector
// width (target_clones compiles one body, so one width, for every target): AVX-512
// (x86-64-v4, 16 channels a vector), AVX2 (8) and baseline (8, as SSE pairs), and the widest
// this CPU runs is picked once (VectorIsa). 16 channels against 8, both in x86-64-v4 code, on
// SSD300's F(4x4) layers at bs 8: 0.91-0.97 of the time; x86-64-v3 and -v4 code with 8-channel
// vectors had measured the same as AVX2.
#define AVX512_ISA __attribute__((target("arch=x86-64-v4"), noinline))
#define AVX2_ISA __attribute__((target("avx2"), noinline))
#define BASE_ISA __attribute__((noinline))

enum class Isa { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

// the widest of them this CPU runs, within the cap oneDNN reads (ONEDNN_MAX_CPU_ISA, else
// DNNL_MAX_CPU_ISA: SSE41 and AVX give the baseline, AVX2* AVX2; the suite's cpu_flags applies
// the same cap to its own choices), so a capped AVX-512 host runs what an AVX2 one would
Isa CpuVectorIsa() {
  static const Isa isa = [] {
    __builtin_cpu_init();
    Isa widest = Isa::kBase;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512cd"))
      widest = Isa::kAvx512;
    else if (__builtin_cpu_supports("avx2"))
      widest = Isa::kAvx2;
    const char* cap = std::getenv("ONEDNN_MAX_CPU_ISA");
    if (cap == nullptr || *cap == '\0') cap = std::getenv("DNNL_MAX_CPU_ISA");
    std::string c = cap == nullptr ? "" : cap;
    for (char& ch : c) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
    if (c.rfind("AVX2", 0) == 0) return std::min(widest, Isa::kAvx2);
    if (c == "SSE41" || c == "AVX") return Isa::kBase;
    return widest;
  }();
  return isa;
}

// a narrower one, set by vector_isa (tests run every level this CPU has); -1: none
std::atomic<int> g_isa_cap{-1};

Isa VectorIsa() {
  const int cap = g_isa_cap.load(std::memory_order_relaxed);
  return cap >= 0 ? static_cast<Isa>(cap) : CpuVectorIsa();
}

// f(lo, hi) on each OpenMP thread's share of [0, n). The parallel region stays outside the
// functions compiled for an instruction set (VECTOR_CLONES, *_ISA) that it calls: GCC outlines
// an `omp parallel` body into a function of its own, which does not inherit the caller's
// target, so a region inside a clone ran on SSE.
template <typename F>
void ParallelRange(int64_t n, F f) {
#pragma omp parallel
  {
    const int64_t nt = omp_get_num_threads(), id = omp_get_thread_num();
    const int64_t lo = n * id / nt, hi = n * (id + 1) / nt;
    if (lo < hi) f(lo, hi);
  }
}

template <typename T>
__attribute__((always_inline)) inline T Load(const float* p) {
  T x;
  std::memcpy(&x, p, sizeof(T));
  return x;
}

template <typename T>
__attribute__((always_inline)) inline void Store(float* p, T x) {
  std::memcpy(p, &x, sizeof(T));
}

// float32 -> bfloat16, rounded to the nearest even (oneDNN's rounding; the transforms of
// finite inputs are finite, so no NaN case); bfloat16 -> float32 is exact (a shift)
// the bits of a vector of L floats, and of L bfloat16
template <int L>
struct Bits {
  typedef uint32_t U __attribute__((vector_size(4 * L)));
  typedef uint16_t H __attribute__((vector_size(2 * L)));
};

template <typename T>
__attribute__((always_inline)) inline T Load(const uint16_t* p) {
  T x;
  if constexpr (sizeof(T) == sizeof(float)) {
    const uint32_t u = static_cast<uint32_t>(*p) << 16;
    std::memcpy(&x, &u, 4);
  } else {
    using B = Bits<sizeof(T) / 4>;
    typename B::H h;
    std::memcpy(&h, p, sizeof(h));
    const typename B::U u = __builtin_convertvector(h, typename B::U) << 16;
    std::memcpy(&x, &u, sizeof(T));
  }
  return x;
}

template <typename T>
__attribute__((always_inline)) inline void Store(uint16_t* p, T x) {
  if constexpr (sizeof(T) == sizeof(float)) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    *p = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  } else {
    using B = Bits<sizeof(T) / 4>;
    typename B::U u;
    std::memcpy(&u, &x, sizeof(T));
    const typename B::H h =
        __builtin_convertvector((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16, typename B::H);
    std::memcpy(p, &h, sizeof(h));
  }
}

// y = B^T . x over one row or column of an input tile
template <int M, typename T>
__attribute__((always_inline)) inline void InputRow(const T (&x)[M + 2], T (&y)[M + 2]) {
  if constexpr (M == 2) {
    y[0] = x[0] - x[2];
    y[1] = x[1] + x[2];
    y[2] = x[2] - x[1];
    y[3] = x[1] - x[3];
  } else {
    const T a = x[1] + x[2], b = x[1] - x[2], c = x[4] - x[2], d = x[3] - x[1];
    y[0] = x[0] * 4.f - x[2] * 5.f + x[4];
    y[1] = x[3] + x[4] - a * 4.f;
    y[2] = x[4] - x[3] + b * 4.f;
    y[3] = c + d * 2.f;
    y[4] = c - d * 2.f;
    y[5] = x[1] * 4.f - x[3] * 5.f + x[5];
  }
}

// y = A^T . x over one row or column of a tile's products
template <int M, typename T>
__attribute__((always_inline)) inline void OutputRow(const T (&x)[M + 2], T (&y)[M]) {
  if constexpr (M == 2) {
    y[0] = x[0] + x[1] + x[2];
    y[1] = x[1] - x[2] - x[3];
  } else {
    const T a = x[1] + x[2], b = x[1] - x[2], c = x[3] + x[4], d = x[3] - x[4];
    y[0] = x[0] + a + c;
    y[1] = b + d * 2.f;
    y[2] = a + c * 4.f;
    y[3] = b + d * 8.f + x[5];
  }
}

// The fixed-trip loops of the transforms are unrolled by pragma: at -O2 GCC kept some as
// loops and copied each tile's source vectors through the stack before using them. Unrolled,
// SSD300's layers at bs 8 took 0.84-0.99 of the time (fp32 F(4x4)) and 0.76-0.87 (bf16 F(2x2)).

// channels [k, k + lanes) of one tile: v[a * (M + 2) + b] = (B^T . d . B)[a][b], stored as S
// (float, or bfloat16 bits)
template <typename T, int M, typename Src, typename S>
__attribute__((always_inline)) inline void InputTile(const Src* const (&d)[M + 2][M + 2], S* v,
                                                     int64_t stride, int64_t k) {
  constexpr int A = M + 2;
  T r[A][A];
  #pragma GCC unroll 8
  for (int i = 0; i < A; ++i) {  // rows: d . B
    T x[A];
    #pragma GCC unroll 8
    for (int j = 0; j < A; ++j) x[j] = Load<T>(d[i][j] + k);
    InputRow<M>(x, r[i]);
  }
  #pragma GCC unroll 8
  for (int j = 0; j < A; ++j) {  // columns: B^T . (d . B)
    T x[A], y[A];
    #pragma GCC unroll 8
    for (int i = 0; i < A; ++i) x[i] = r[i][j];
    InputRow<M>(x, y);
    #pragma GCC unroll 8
    for (int i = 0; i < A; ++i) Store<T>(v + (i * A + j) * stride + k, y[i]);
  }
}

// s = A^T . m over channels [k, k + lanes) of one tile's products (the first half of the
// output transform)
template <typename T, int M>
__attribute__((always_inline)) inline void OutputColumns(const float* m, int64_t stride,
                                                         int64_t k, T (&s)[M][M + 2]) {
  constexpr int A = M + 2;
  #pragma GCC unroll 8
  for (int j = 0; j < A; ++j) {
    T x[A], z[M];
    #pragma GCC unroll 8
    for (int i = 0; i < A; ++i) x[i] = Load<T>(m + (i * A + j) * stride + k);
    OutputRow<M>(x, z);
    #pragma GCC unroll 8
    for (int p = 0; p < M; ++p) s[p][j] = z[p];
  }
}

// channels [k, k + lanes) of one tile's products m -> its M x M outputs (A^T . m . A), + bias
// (+ residual R: float or bfloat16 bits), at least `lo` (0 for a ReLU); outputs past dst's
// edge are not stored
template <typename T, int M, typename R, typename D>
__attribute__((always_inline)) inline void OutputTile(const float* m, int64_t stride,
                                                      const float* bias, T lo,
                                                      D* const (&y)[M][M],
                                                      const R* const (&r)[M][M],
                                                      const bool (&keep)[M][M], int64_t k) {
  constexpr int A = M + 2;
  T s[M][A];
  OutputColumns<T, M>(m, stride, k, s);  // A^T . m
  const T b = Load<T>(bias + k);
  #pragma GCC unroll 8
  for (int p = 0; p < M; ++p) {  // (A^T . m) . A
    T z[M];
    OutputRow<M>(s[p], z);
    #pragma GCC unroll 8
    for (int q = 0; q < M; ++q) {
      T out = z[q] + b;
      if (r[p][q] != nullptr) out += Load<T>(r[p][q] + k);  // a residual block's add
      if (keep[p][q]) Store<T>(y[p][q] + k, out > lo ? out : lo);
    }
  }
}

// OutputTile with a ReLU and then a 2x2 max pool of stride 2 (a pooled layer's convolution
// writes only the pooled map: SSD300's three largest pools read back 4x what they write). M is
// even, so a pool window never straddles two tiles: y[p][q] is the tile's pooled output (p, q).
// A window's outputs past the convolution's edge (`in`) are left out, as ceil_mode pools do;
// pooled outputs past dst's edge (`keep`) are not stored. Equal to the pool of OutputTile's
// outputs bit for bit: max is exact, and rounding to bfloat16 is monotone.
template <typename T, int M, typename D>
__attribute__((always_inline)) inline void OutputTilePool(const float* m, int64_t stride,
                                                          const float* bias, T lo,
                                                          D* const (&y)[M / 2][M / 2],
                                                          const bool (&in)[M][M],
                                                          const bool (&keep)[M / 2][M / 2],
                                                          int64_t k) {
  constexpr int A = M + 2, P = M / 2;
  T s[M][A];
  OutputColumns<T, M>(m, stride, k, s);  // A^T . m
  const T b = Load<T>(bias + k);
  T pooled[P][P];
  #pragma GCC unroll 8
  for (int p = 0; p < M; ++p) {  // (A^T . m) . A, ReLU, max over each window's outputs
    T z[M];
    OutputRow<M>(s[p], z);
    #pragma GCC unroll 8
    for (int q = 0; q < M; ++q) {
      T out = z[q] + b;
      out = out > lo ? out : lo;
      T& acc = pooled[p / 2][q / 2];
      // a window's first output is in wherever the window is stored
      if (p % 2 == 0 && q % 2 == 0) acc = out;
      else if (in[p][q]) acc = acc > out ? acc : out;
    }
  }
  #pragma GCC unroll 8
  for (int p = 0; p < P; ++p)
    #pragma GCC unroll 8
    for (int q = 0; q < P; ++q)
      if (keep[p][q]) Store<T>(y[p][q] + k, pooled[p][q]);
}

// Where tile t lies: its image n and its first output (oy, ox); its outputs are
// (oy + dil p, ox + dil q) and its inputs (oy + dil i - pt, ox + dil j - pl). A convolution
// dilated by dil is dil x dil undilated ones, one per phase (the outputs py + dil Y,
// px + dil X), each covered by th x tw tiles: tiles run over (n, phase, tile row, tile column).
// dil = 1 is the one phase.
struct TilePos {
  int64_t n, oy, ox;
};
__attribute__((always_inline)) inline TilePos TileAt(int64_t t, int64_t th, int64_t tw,
                                                     int64_t dil, int m) {
  const int64_t per = th * tw, phase = t / per % (dil * dil), ty = t / tw % th, tx = t % tw;
  return {t / (per * dil * dil), phase / dil + dil * m * ty, phase % dil + dil * m * tx};
}

// Input tiles t0 + [lo, hi) of src (NHWC, N x H x W x C) into v[(M + 2)^2][tc][C], its
// positions vs elements apart, or v[tc][(M + 2)^2][C] where `tile_major` (see Wino::grouped);
// tiles past the last (the padded end of the last chunk) read zeros.
template <int M, int W, typename Src, typename S>
__attribute__((always_inline)) inline void WinoInputTiles(
    const Src* src, S* v, const Src* zeros, int64_t t0, int64_t vs, int64_t tiles,
    int64_t th, int64_t tw, int64_t h, int64_t w, int64_t c, int64_t pt, int64_t pl,
    int64_t dil, bool tile_major, int64_t lo, int64_t hi) {
  constexpr int A = M + 2;
  // elements from one tile to the next (ts), and from one of a tile's products to the next (ps)
  const int64_t ts = tile_major ? A * A * c : c, ps = tile_major ? c : vs;
  // tile t's input (i, j): its pixel, or zeros outside the image and past the last tile
  auto input = [&](int64_t t, const TilePos& p, int i, int j) -> const Src* {
    const int64_t y = p.oy + dil * i - pt, x = p.ox + dil * j - pl;
    return (t < tiles && y >= 0 && y < h && x >= 0 && x < w)
               ? src + ((p.n * h + y) * w + x) * c : zeros;
  };
  for (int64_t tl = lo; tl < hi; ++tl) {
    const int64_t t = t0 + tl;
    const TilePos at = TileAt(t, th, tw, dil, M);
    const Src* d[A][A];
    #pragma GCC unroll 8
    for (int i = 0; i < A; ++i)
      #pragma GCC unroll 8
      for (int j = 0; j < A; ++j) d[i][j] = input(t, at, i, j);
    // The next tile's inputs, its columns 2 to M + 1 (its first two are this tile's last two),
    // prefetched a cache line ahead of this tile's channels: the source of SSD300's large
    // layers streams from memory, 36 short runs a tile that the hardware prefetchers do not
    // follow. On a Zen 3, SSD300 fp32 at bs 8 took 0.957 (0.909-0.975) of the time, its input
    // transforms 132 ms against 186 (conv1_2 29 against 47).
    const Src* next[A][A - 2];
    const TilePos after = TileAt(t + 1, th, tw, dil, M);
    #pragma GCC unroll 8
    for (int i = 0; i < A; ++i)
      #pragma GCC unroll 8
      for (int j = 2; j < A; ++j) next[i][j - 2] = input(t + 1, after, i, j);
    auto prefetch = [&](int64_t k) {
      if (k % (64 / sizeof(Src)) != 0) return;
      #pragma GCC unroll 8
      for (int i = 0; i < A; ++i)
        #pragma GCC unroll 8
        for (int j = 0; j < A - 2; ++j) __builtin_prefetch(next[i][j] + k, 0, 3);
    };
    int64_t k = 0;
    if constexpr (W == 16)
      for (; k + 16 <= c; k += 16) {
        prefetch(k);
        InputTile<F16, M>(d, v + tl * ts, ps, k);
      }
    for (; k + 8 <= c; k += 8) {
      prefetch(k);
      InputTile<F8, M>(d, v + tl * ts, ps, k);
    }
    for (; k < c; ++k) InputTile<float, M>(d, v + tl * ts, ps, k);
  }
}

// Input tiles [lo, hi) of one chunk, W channels a vector (16, or 8)
template <int W, typename Src, typename S>
__attribute__((always_inline)) inline void WinoInputAny(
    const Src* src, S* v, const Src* zeros, int64_t t0, int64_t vs, int64_t tiles, int64_t th,
    int64_t tw, int64_t h, int64_t w, int64_t c, int64_t pt, int64_t pl, int64_t dil, int m,
    bool tile_major, int64_t lo, int64_t hi) {
  if (m == 4)
    WinoInputTiles<4, W>(src, v, zeros, t0, vs, tiles, th, tw, h, w, c, pt, pl, dil, tile_major,
                         lo, hi);
  else
    WinoInputTiles<2, W>(src, v, zeros, t0, vs, tiles, th, tw, h, w, c, pt, pl, dil, tile_major,
                         lo, hi);
}

#define WINO_INPUT_T template <typename Src, typename S>
#define WINO_INPUT_ARGS                                                                      \
  const Src *src, S *v, const Src *zeros, int64_t t0, int64_t vs, int64_t tiles, int64_t th, \
      int64_t tw, int64_t h, int64_t w, int64_t c, int64_t pt, int64_t pl, int64_t dil,      \
      int m, bool tile_major, int64_t lo, int64_t hi
#define WINO_INPUT_PASS \
  src, v, zeros, t0, vs, tiles, th, tw, h, w, c, pt, pl, dil, m, tile_major, lo, hi

// NAME(ARGS): NAME##Any<W>(PASS) built for each instruction set with its vector width, and the
// widest this CPU runs called (TEMPLATE, ARGS, PASS: macros, so their commas pass through)
#define PER_ISA(NAME, TEMPLATE, ARGS, PASS)                                           \
  TEMPLATE AVX512_ISA void NAME##Avx512(ARGS) { NAME##Any<16>(PASS); }              \
  TEMPLATE AVX2_ISA void NAME##Avx2(ARGS) { NAME##Any<8>(PASS); }                   \
  TEMPLATE BASE_ISA void NAME##Base(ARGS) { NAME##Any<8>(PASS); }                   \
  TEMPLATE void NAME(ARGS) {                                                          \
    switch (VectorIsa()) {                                                            \
      case Isa::kAvx512: return NAME##Avx512(PASS);                                   \
      case Isa::kAvx2: return NAME##Avx2(PASS);                                       \
      default: return NAME##Base(PASS);                                               \
    }                                                                                 \
  }

// WinoInput: tiles t0 + [lo, hi) of src (float, or bfloat16 bits) into v (float, or bfloat16
// bits)
PER_ISA(WinoInput, WINO_INPUT_T, WINO_INPUT_ARGS, WINO_INPUT_PASS)

// m[(M + 2)^2][tc][O], its positions ms elements apart (or m[tc][(M + 2)^2][O] where
// `tile_major`) of tiles t0 + [t_lo, t_hi)
// -> their M x M outputs in dst (NHWC, D: float or bfloat16 bits), + bias (+ residual, of dst's
// shape), ReLU; dil: see TileAt. With POOL (a ReLU, no residual, dil 1), their 2x2 max pools of
// stride 2 instead: dst is ph x pw, the pool of the oh x ow outputs.
template <int M, int W, bool POOL, typename R, typename D>
__attribute__((always_inline)) inline void WinoOutputTiles(
    const float* m, const float* bias, const R* residual, D* dst, int64_t t0, int64_t ms,
    int64_t tiles, int64_t th, int64_t tw, int64_t oh, int64_t ow, int64_t ph, int64_t pw,
    int64_t o, int64_t dil, bool relu, bool tile_major, int64_t t_lo, int64_t t_hi) {
  const float lo = relu ? 0.f : -INFINITY;
  const int64_t ts = tile_major ? (M + 2) * (M + 2) * o : o, ps = tile_major ? o : ms;
  // where output (yy, xx) of image n, and pooled output (yy, xx), lie in dst; clamped, so a
  // tile's outputs past the edge have an address (their stores are masked by `keep`)
  auto out = [&](int64_t n, int64_t yy, int64_t xx) {
    return ((n * oh + std::min(yy, oh - 1)) * ow + std::min(xx, ow - 1)) * o;
  };
  auto pooled = [&](int64_t n, int64_t yy, int64_t xx) {
    return ((n * ph + std::min(yy, ph - 1)) * pw + std::min(xx, pw - 1)) * o;
  };
  for (int64_t tl = t_lo; tl < t_hi; ++tl) {
    const int64_t t = t0 + tl;
    const auto [n, oy, ox] = TileAt(t, th, tw, dil, M);
    constexpr int P = M / 2;
    // The next tile's outputs, prefetched for writing a cache line ahead of this tile's
    // channels (see WinoInputTiles): SSD300's 150x150 64->128 layer at bs 8 took 0.70 of the
    // output transform's time.
    D* next[M * M];
    int count = 0;
    if (t + 1 < tiles) {
      const auto [nn, noy, nox] = TileAt(t + 1, th, tw, dil, M);
      if constexpr (POOL)
        for (int p = 0; p < P; ++p)
          for (int q = 0; q < P; ++q)
            next[count++] = dst + pooled(nn, noy / 2 + p, nox / 2 + q);
      else
        for (int p = 0; p < M; ++p)
          for (int q = 0; q < M; ++q)
            next[count++] = dst + out(nn, noy + dil * p, nox + dil * q);
    }
    auto prefetch = [&](int64_t k) {
      if (k % (64 / sizeof(D)) != 0) return;
      for (int i = 0; i < count; ++i) __builtin_prefetch(next[i] + k, 1, 3);
    };
    if constexpr (POOL) {  // dil is 1: the tile's outputs are oy + [0, M), ox + [0, M)
      D* y[P][P];
      bool in[M][M], keep[P][P];
      #pragma GCC unroll 8
      for (int p = 0; p < M; ++p)
        #pragma GCC unroll 8
        for (int q = 0; q < M; ++q) in[p][q] = oy + p < oh && ox + q < ow;
      #pragma GCC unroll 8
      for (int p = 0; p < P; ++p)
        #pragma GCC unroll 8
        for (int q = 0; q < P; ++q) {
          const int64_t yy = oy / 2 + p, xx = ox / 2 + q;
          keep[p][q] = yy < ph && xx < pw;
          y[p][q] = dst + pooled(n, yy, xx);
        }
      int64_t k = 0;
      if constexpr (W == 16)
        for (; k + 16 <= o; k += 16) {
          prefetch(k);
          OutputTilePool<F16, M>(m + tl * ts, ps, bias, F16{} + lo, y, in, keep, k);
        }
      for (; k + 8 <= o; k += 8) {
        prefetch(k);
        OutputTilePool<F8, M>(m + tl * ts, ps, bias, F8{} + lo, y, in, keep, k);
      }
      for (; k < o; ++k) OutputTilePool<float, M>(m + tl * ts, ps, bias, lo, y, in, keep, k);
      continue;
    }
    D* y[M][M];
    const R* r[M][M];
    bool keep[M][M];
    #pragma GCC unroll 8
    for (int p = 0; p < M; ++p)
      #pragma GCC unroll 8
      for (int q = 0; q < M; ++q) {
        const int64_t yy = oy + dil * p, xx = ox + dil * q;
        keep[p][q] = yy < oh && xx < ow;
        const int64_t at = out(n, yy, xx);
        y[p][q] = dst + at;
        r[p][q] = residual != nullptr ? residual + at : nullptr;
      }
    int64_t k = 0;
    if constexpr (W == 16)
      for (; k + 16 <= o; k += 16) {
        prefetch(k);
        OutputTile<F16, M>(m + tl * ts, ps, bias, F16{} + lo, y, r, keep, k);
      }
    for (; k + 8 <= o; k += 8) {
      prefetch(k);
      OutputTile<F8, M>(m + tl * ts, ps, bias, F8{} + lo, y, r, keep, k);
    }
    for (; k < o; ++k) OutputTile<float, M>(m + tl * ts, ps, bias, lo, y, r, keep, k);
  }
}

// Output tiles [lo, hi) of one chunk, W channels a vector (16, or 8)
// (pool: see WinoOutputTiles)
template <int W, typename R, typename D>
__attribute__((always_inline)) inline void WinoOutputAny(
    const float* m, const float* bias, const R* residual, D* dst, int64_t t0, int64_t ms,
    int64_t tiles, int64_t th, int64_t tw, int64_t oh, int64_t ow, int64_t ph, int64_t pw,
    int64_t o, int64_t dil, bool relu, bool pool, int mt, bool tile_major, int64_t lo,
    int64_t hi) {
#define WINO_OUTPUT_TILES(M, POOL)                                                         \
  WinoOutputTiles<M, W, POOL>(m, bias, residual, dst, t0, ms, tiles, th, tw, oh, ow, ph, pw, \
                              o, dil, relu, tile_major, lo, hi)
  if (mt == 4 && pool) WINO_OUTPUT_TILES(4, true);
  else if (mt == 4) WINO_OUTPUT_TILES(4, false);
  else if (pool) WINO_OUTPUT_TILES(2, true);
  else WINO_OUTPUT_TILES(2, false);
#undef WINO_OUTPUT_TILES
}

#define WINO_OUTPUT_T template <typename R, typename D>
#define WINO_OUTPUT_ARGS                                                                    \
  const float *m, const float *bias, const R *residual, D *dst, int64_t t0, int64_t ms,     \
      int64_t tiles, int64_t th, int64_t tw, int64_t oh, int64_t ow, int64_t ph, int64_t pw, \
      int64_t o, int64_t dil, bool relu, bool pool, int mt, bool tile_major, int64_t lo,    \
      int64_t hi
#define WINO_OUTPUT_PASS                                                                     \
  m, bias, residual, dst, t0, ms, tiles, th, tw, oh, ow, ph, pw, o, dil, relu, pool, mt,     \
      tile_major, lo, hi

// WinoOutput: products m of tiles t0 + [lo, hi) into dst (float, or bfloat16 bits), + bias
// (+ residual, float or bfloat16 bits), ReLU (and the 2x2 max pool)
PER_ISA(WinoOutput, WINO_OUTPUT_T, WINO_OUTPUT_ARGS, WINO_OUTPUT_PASS)

// Profiling (winograd_timing): each Winograd call times its three phases, and the calling
// thread keeps the last call's (input transform, products, output transform), in seconds of
// wall time; per thread (below), the mean of the threads' own. Off, a call reads one flag.
std::atomic<bool> g_phase_timing{false};
thread_local std::array<double, 3> t_last_phases{-1.0, -1.0, -1.0};
thread_local int t_last_products = -1;  // 1 its products a matmul, 2 a grouped convolution

// Bytes of the transformed weights u = G g G^T of an F(m x m, 3x3) convolution, c -> o, and
// the most that counts as small: a quarter of a Zen 4 L3, so that it stays cached between chunks
int64_t UBytes(int m, int64_t c, int64_t o, bool bf16) {
  return (m + 2) * (m + 2) * c * o * (bf16 ? 2 : 4);
}
constexpr int64_t kSmallU = 8 << 20;

// Bytes of transformed tiles per chunk where u is small: twice the L2, within the sizes that
// measured best (2 MB on a Zen 4's 1 MB L2; on a Zen 3's 512 KB, 1 MB chunks took 0.96-0.99 of
// 2 MB's time in SSD300's fp32 engine at bs 8 and 1, 4 MB 1.01); 2 MB where it is not reported
int64_t SmallUChunk() {
  static const int64_t bytes = [] {
    const int64_t l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return l2 > 0 ? std::clamp<int64_t>(2 * l2, 1 << 20, 2 << 20) : int64_t{2} << 20;
  }();
  return bytes;
}

// Elements from one of a position-major chunk's (m + 2)^2 tile positions to the next: tc x n
// (n = C in v, O in m) of `bytes` each, rounded up to a whole number of cache lines, and to an
// odd one. The transforms write (v) and read (m) all positions of a tile together, (m + 2)^2
// streams this far apart; where tc x n x bytes was a multiple of 4 KB (tc even at C = 512,
// a multiple of 4 at 256: SSD300's 150x150, 75x75 and 38x38 layers at bs 8) they all fell in
// one set of the L1 and L2 caches, and a transform took 2.3x as long (75x75 256->256, 64 tiles a chunk
// against 65: 9.9 against 4.3 us a tile). An odd number of lines puts them in distinct sets.
// oneDNN's matmul reads and writes such batch strides at the dense layout's speed.
int64_t PositionStride(int64_t tc, int64_t n, int64_t bytes) {
  int64_t lines = (tc * n * bytes + 63) / 64;
  if (lines % 2 == 0) ++lines;
  return lines * 64 / bytes;
}

// y = G . x over three taps of a 3x3 kernel (double: the m = 4 constants are not exact in float)
void FilterRow(int m, const double (&x)[3], double* y) {
  if (m == 2) {
    y[0] = x[0];
    y[1] = 0.5 * (x[0] + x[1] + x[2]);
    y[2] = 0.5 * (x[0] - x[1] + x[2]);
    y[3] = x[2];
  } else {
    y[0] = x[0] / 4;
    y[1] = -(x[0] + x[1] + x[2]) / 6;
    y[2] = -(x[0] - x[1] + x[2]) / 6;
    y[3] = x[0] / 24 + x[1] / 12 + x[2] / 6;
    y[4] = x[0] / 24 - x[1] / 12 + x[2] / 6;
    y[5] = x[2];
  }
}

// How shared-chunk float32 Winograd products run (winograd_products): 0 a grouped 1x1
// convolution where the end of MakeWino says, 1 always the batched matmul, 2 the grouped
// convolution wherever oneDNN makes one
std::atomic<int> g_products_mode{0};

// The most tiles a chunk has where its products run as a grouped convolution (see MakeWino)
constexpr int64_t kGroupedMaxTiles = 400;

std::shared_ptr<Wino> MakeWino(const TensorView& weight, int64_t tiles, bool bf16, int m,
                               int64_t threads, bool per_thread, int mode) {
  using tag = dnnl::memory::format_tag;
  using dt = dnnl::memory::data_type;
  const int64_t o = weight.size(0), c = weight.size(3);
  const int a = m + 2, np = a * a;  // input tile side, products per tile
  auto wino = std::make_shared<Wino>();
  // Chunk size. Each chunk's matmul streams all of the transformed weights u once. Where u is
  // small (<= kSmallU) it stays cached, and chunks of 1-2 MB (SmallUChunk) keep the tiles and
  // products in cache between the transforms and the matmul (SSD300 150x150 128->128 F(4x4)
  // bs 8, Zen 4: 0.68 of the time with 32 MB chunks; 1 MB: 0.72). A larger u is read from
  // memory once per chunk, so 32 MB chunks (38x38 512->512, u 38 MB: 2 MB chunks 1.17x the
  // time; on AVX2 8 MB chunks ran the matmul at ~100 GOP/s against ~140). Per thread (see
  // RunWinograd), a chunk is one thread's. Below AVX-512, 64 MB: on a native Zen 3 (512 KB
  // L2, oneDNN's gemm:jit matmul) the large-u layers' products ran at ~86 GOP/s against the
  // matmul's 139, and with u read once per call at bs 8 (38x38 512->512: 800 tiles, one
  // chunk) SSD300's fp32 engine took 0.92 (0.90-0.94) of the time (128 MB: 0.91); on AVX-512
  // 16 to 64 MB measured even (0.97-1.03).
  const int64_t big = VectorIsa() == Isa::kAvx512 ? (32 << 20) : (int64_t{64} << 20);
  const int64_t chunk = UBytes(m, c, o, bf16) <= kSmallU ? SmallUChunk() : big;
  const int64_t own = per_thread ? (tiles + threads - 1) / threads : tiles;
  const int64_t budget = std::max<int64_t>(64, chunk / (np * 4 * std::max(c, o)));
  const int64_t chunks = (own + budget - 1) / budget;
  wino->tc = (own + chunks - 1) / chunks;
  wino->vs = PositionStride(wino->tc, c, bf16 ? 2 : 4);
  wino->ms = PositionStride(wino->tc, o, 4);
  wino->m = m;
  wino->bf16 = bf16;
  const dt products = bf16 ? dt::bf16 : dt::f32;
  dnnl::primitive_attr attr;
  // per thread: a matmul made for one thread, with a scratchpad each thread passes its own of
  if (per_thread) attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  const int before = omp_get_max_threads();
  if (per_thread) omp_set_num_threads(1);
  auto pd = dnnl::matmul::primitive_desc(
      CpuEngine(), dnnl::memory::desc({np, wino->tc, c}, products, {wino->vs, c, 1}),
      dnnl::memory::desc({np, c, o}, products, tag::any),
      dnnl::memory::desc({np, wino->tc, o}, dt::f32, {wino->ms, o, 1}), attr);
  if (per_thread) omp_set_num_threads(before);
  wino->matmul = dnnl::matmul(pd);
  wino->scratch = per_thread ? static_cast<int64_t>(pd.scratchpad_desc().get_size()) : 0;
  // U = G g G^T for every (c, o): [P][C][O]
  const float* g = static_cast<const float*>(weight.data_ptr());  // OHWI, 3x3
  dnnl::memory u_user({{np, c, o}, dt::f32, tag::abc}, CpuEngine());
  float* u = static_cast<float*>(u_user.get_data_handle());
  for (int64_t oo = 0; oo < o; ++oo)
    for (int64_t cc = 0; cc < c; ++cc) {
      double gk[6][3];  // G . k
      for (int j = 0; j < 3; ++j) {
        const double col[3] = {g[((oo * 3 + 0) * 3 + j) * c + cc],
                               g[((oo * 3 + 1) * 3 + j) * c + cc],
                               g[((oo * 3 + 2) * 3 + j) * c + cc]};
        double y[6];
        FilterRow(m, col, y);
        for (int i = 0; i < a; ++i) gk[i][j] = y[i];
      }
      for (int i = 0; i < a; ++i) {  // (G . k) . G^T
        double row[6];
        FilterRow(m, gk[i], row);
        for (int j = 0; j < a; ++j) u[((i * a + j) * c + cc) * o + oo] = static_cast<float>(row[j]);
      }
    }
  dnnl::stream& s = Stream();
  wino->fingerprint = Fingerprint(g, weight.numel());
  // Shared float32 chunks of at most kGroupedMaxTiles tiles, where the matmul is oneDNN's
  // packing GEMM (gemm:jit: AVX2 hosts, and AVX-512 ones capped to AVX2), run as one 1x1
  // convolution of P groups instead, over the tiles stored tile-major: oneDNN's brgemm
  // convolution packs u once, where that GEMM copies it on every call and, with the batch
  // spread over the threads, runs each product on one thread, where it took the same time for
  // M = 72 to 400 rows (38-39 GOP/s, K = N = 512) and 66 GOP/s at 800. On a Zen 3, timed inside
  // SSD300's engines, matmul against convolution: 41-44 against 27-31 ms (tc = 200, 512->512),
  // 89 against 63 (200, 1024->512), 20 against 15 (100, 512->512), 12.2-12.9 against 12.1-13.4
  // (361, 256->256), but 110-112 against 116-119 (800, 512->512) and 52 against 62 (800,
  // 256->512). Per-thread chunks keep the matmul: on one thread, at their sizes, it ran
  // 1.0-1.2x as fast.
  if (!per_thread && !bf16 && mode != 1 && (mode == 2 || wino->tc <= kGroupedMaxTiles)) {
    const bool gemm = std::string(pd.impl_info_str()).rfind("gemm", 0) == 0;
    auto pd_g = dnnl::convolution_forward::primitive_desc(
        CpuEngine(), dnnl::prop_kind::forward_inference, dnnl::algorithm::convolution_direct,
        dnnl::memory::desc({1, np * c, wino->tc, 1}, dt::f32, tag::nhwc),
        dnnl::memory::desc({np, o, c, 1, 1}, dt::f32, tag::any),
        dnnl::memory::desc({1, np * o, wino->tc, 1}, dt::f32, tag::nhwc), {1, 1}, {0, 0},
        {0, 0}, dnnl::primitive_attr(), true);
    const bool brgemm = pd_g && std::string(pd_g.impl_info_str()).rfind("brgconv", 0) == 0;
    if (mode == 2 ? static_cast<bool>(pd_g) : gemm && brgemm) {
      wino->matmul = dnnl::convolution_forward(pd_g);
      wino->grouped = true;
      // u_user [P][C][O] read as P groups of O x C (goihw)
      dnnl::memory u_view({{np, o, c, 1, 1}, dt::f32, {c * o, 1, o, 1, 1}}, CpuEngine(), u);
      wino->u = dnnl::memory(pd_g.weights_desc(), CpuEngine());
      dnnl::reorder(u_view, wino->u).execute(s, u_view, wino->u);
      s.wait();
      return wino;
    }
  }
  wino->u = dnnl::memory(pd.weights_desc(), CpuEngine());
  dnnl::reorder(u_user, wino->u).execute(s, u_user, wino->u);
  s.wait();
  return wino;
}

// A buffer that starts on a cache line and grows, zeroed when it grows and keeping nothing
// (its users overwrite it; zeros, as std::vector gave, so that the rows a last chunk leaves
// unwritten hold finite values for the matmul). std::vector's storage starts 16 bytes into a
// line, so every 64-byte vector of the Winograd tiles and products straddled two lines;
// aligned, SSD300's fp32 and bf16 engines took 0.97-0.98 of the time.
template <typename T>
class LineBuffer {
 public:
  T* data() const { return p_.get(); }
  void Grow(int64_t n) {
    if (n <= n_) return;
    p_.reset(static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{64})));
    std::memset(p_.get(), 0, n * sizeof(T));
    n_ = n;
  }

 private:
  struct Free {
    void operator()(T* p) const { ::operator delete(p, std::align_val_t{64}); }
  };
  std::unique_ptr<T, Free> p_;
  int64_t n_ = 0;
};

// One thread's Winograd buffers: tiles v (float32, or bfloat16 bits in vb), products m, a
// channel of zeros for padding, and the one-thread matmul's scratchpad
struct WinoBuffers {
  LineBuffer<float> v, m;
  LineBuffer<uint16_t> vb;
  LineBuffer<uint8_t> scratch;
  std::vector<float> zeros;
  std::vector<uint16_t> zeros_b;  // bfloat16 zero is 0
  // [P][tc][C] and [P][tc][O], their positions vs and ms elements apart (PositionStride)
  dnnl::memory Tiles(int64_t np, int64_t tc, int64_t c, int64_t vs, bool bf16) {
    return dnnl::memory({{np, tc, c}, bf16 ? dnnl::memory::data_type::bf16
                                           : dnnl::memory::data_type::f32, {vs, c, 1}},
                        CpuEngine(), bf16 ? static_cast<void*>(vb.data()) : v.data());
  }
  dnnl::memory Products(int64_t np, int64_t tc, int64_t o, int64_t ms) {
    return dnnl::memory({{np, tc, o}, dnnl::memory::data_type::f32, {ms, o, 1}}, CpuEngine(),
                        m.data());
  }
};

// The calling thread's buffers, grown to fit w's chunks (c channels in)
WinoBuffers& Buffers(const Wino& w, int64_t c, int64_t scratch) {
  thread_local WinoBuffers b;
  const int64_t np = (w.m + 2) * (w.m + 2);
  // np strides: a position-major chunk, and no less than a tile-major one (np x tc x n)
  if (w.bf16) b.vb.Grow(np * w.vs);
  else b.v.Grow(np * w.vs);
  b.m.Grow(np * w.ms);
  b.scratch.Grow(std::max<int64_t>(scratch, 1));
  if (static_cast<int64_t>(b.zeros.size()) < c) b.zeros.assign(c, 0.f);
  if (static_cast<int64_t>(b.zeros_b.size()) < c) b.zeros_b.assign(c, 0);
  return b;
}

// The Winograd path of conv2d_nhwc(_add): 3x3 kernels, stride 1, dilation dil (both sides),
// pads 0 to dil; shapes were checked by RunF32. A dilated convolution runs as dil x dil
// undilated ones (see TileAt). pool (dil 1): dst is the 2x2 stride-2 max pool (ceil or floor
// mode, by dst's size) of the ReLU'd output.
void RunWinograd(const TensorView& src, const TensorView& weight, const TensorView& bias,
                 const TensorView* residual, int64_t pt, int64_t pl, int64_t pb, int64_t pr,
                 int64_t dil, bool relu, bool pool, bool bf16, int mt, const TensorView& dst) {
  const int64_t n = src.size(0), h = src.size(1), w = src.size(2), c = src.size(3);
  const int64_t o = weight.size(0), oh = h + pt + pb - 2 * dil, ow = w + pl + pr - 2 * dil;
  const int64_t ph = dst.size(1), pw = dst.size(2);
  TVM_FFI_ICHECK(weight.size(1) == 3 && weight.size(2) == 3 && dil >= 1 &&
                 std::max({pt, pl, pb, pr}) <= dil && std::min({pt, pl, pb, pr}) >= 0)
      << "winograd: 3x3 kernels, stride 1, pads from 0 to the dilation only";
  if (pool) {  // braces: the check macro is an if of its own
    TVM_FFI_ICHECK(dil == 1) << "winograd + max pool: dilation 1 only";
    TVM_FFI_ICHECK(relu && residual == nullptr && (ph == oh / 2 || ph == (oh + 1) / 2) &&
                   (pw == ow / 2 || pw == (ow + 1) / 2))
        << "winograd + max pool: a ReLU, no residual, and dst the 2x2 stride-2 pool of the "
        << oh << "x" << ow << " output, got " << ph << "x" << pw;
  } else {
    TVM_FFI_ICHECK(ph == oh && pw == ow) << "dst must be " << oh << "x" << ow << ", got " << ph
                                         << "x" << pw;
  }
  // tiles of each phase (see TileAt): the first phase's rows and columns, the most any has
  const int64_t th = ((oh + dil - 1) / dil + mt - 1) / mt;
  const int64_t tw = ((ow + dil - 1) / dil + mt - 1) / mt;
  const int64_t tiles = n * dil * dil * th * tw;
  const int64_t np = (mt + 2) * (mt + 2);
  const int64_t threads = omp_get_max_threads();
  // each thread on its own tiles where every thread can keep u cached (see below)
  const bool per_thread = threads > 1 && UBytes(mt, c, o, bf16) <= kSmallU;
  const int mode = g_products_mode.load(std::memory_order_relaxed);
  Key key;
  key << n << h << w << c << o << pt << pl << pb << pr << dil << bf16 << mt << weight.data_ptr()
      << threads << per_thread << mode;
  auto wino = Cached(key.str(),
                     Fingerprint(static_cast<const float*>(weight.data_ptr()), weight.numel()),
                     [&] { return MakeWino(weight, tiles, bf16, mt, threads, per_thread, mode); });
  const int64_t tc = wino->tc, vs = wino->vs, ms = wino->ms;
  const bool grouped = wino->grouped;  // tiles and products tile-major
  const bool timed = g_phase_timing.load(std::memory_order_relaxed);
  // a residual in float32 or in bfloat16 (a bfloat16 engine's activation)
  const bool res_bf16 = residual != nullptr && IsBf16(*residual);
  const float* res = residual != nullptr && !res_bf16
                         ? static_cast<const float*>(residual->data_ptr()) : nullptr;
  const uint16_t* res_b = res_bf16 ? static_cast<const uint16_t*>(residual->data_ptr()) : nullptr;
  const float* b = static_cast<const float*>(bias.data_ptr());
  // tiles t0 + [lo, hi) of the chunk into buf's v (float32 or bfloat16 bits); buf's products
  // m of them into dst
  auto input = [&](WinoBuffers& buf, int64_t t0, int64_t lo, int64_t hi) {
    float* vf = buf.v.data();
    uint16_t* vh = buf.vb.data();
    const float* zf = buf.zeros.data();
    const uint16_t* zh = buf.zeros_b.data();
    if (IsBf16(src))  // bfloat16 activations (checked by RunF32: only with bf16 products)
      WinoInput(static_cast<const uint16_t*>(src.data_ptr()), vh, zh, t0, vs, tiles, th, tw, h,
                w, c, pt, pl, dil, mt, grouped, lo, hi);
    else if (bf16)
      WinoInput(static_cast<const float*>(src.data_ptr()), vh, zf, t0, vs, tiles, th, tw, h, w,
                c, pt, pl, dil, mt, grouped, lo, hi);
    else
      WinoInput(static_cast<const float*>(src.data_ptr()), vf, zf, t0, vs, tiles, th, tw, h, w,
                c, pt, pl, dil, mt, grouped, lo, hi);
  };
  auto output = [&](const WinoBuffers& buf, int64_t t0, int64_t lo, int64_t hi) {
    const float* mf = buf.m.data();
    if (res_b != nullptr && IsBf16(dst))
      WinoOutput(mf, b, res_b, static_cast<uint16_t*>(dst.data_ptr()), t0, ms, tiles, th, tw,
                 oh, ow, ph, pw, o, dil, relu, pool, mt, grouped, lo, hi);
    else if (res_b != nullptr)
      WinoOutput(mf, b, res_b, static_cast<float*>(dst.data_ptr()), t0, ms, tiles, th, tw, oh,
                 ow, ph, pw, o, dil, relu, pool, mt, grouped, lo, hi);
    else if (IsBf16(dst))
      WinoOutput(mf, b, res, static_cast<uint16_t*>(dst.data_ptr()), t0, ms, tiles, th, tw, oh,
                 ow, ph, pw, o, dil, relu, pool, mt, grouped, lo, hi);
    else
      WinoOutput(mf, b, res, static_cast<float*>(dst.data_ptr()), t0, ms, tiles, th, tw, oh, ow,
                 ph, pw, o, dil, relu, pool, mt, grouped, lo, hi);
  };
  using dt = dnnl::memory::data_type;
  using tag = dnnl::memory::format_tag;
  auto& eng = CpuEngine();
  if (per_thread) {  // part of the key, so wino was made for it
    // Each thread takes a contiguous share of the tiles and runs all three phases on its own
    // chunks with a one-thread matmul: its tiles and products never move to another core.
    // This host's two vCPUs sometimes sit on separate L3 caches; a 1 MB handoff between them
    // then costs 8-11x a read of one's own, and the shared chunks below (tiles transformed by
    // one thread, multiplied by the other) ran the embedded model's fp32 engine 1.4x slower.
    // Only where u is small: each thread streams all of u per chunk, not its half.
    std::array<double, 3> phases{};  // with timing: the threads' mean per phase
#pragma omp parallel
    {
      const int64_t nt = omp_get_num_threads(), id = omp_get_thread_num();
      const int64_t lo = tiles * id / nt, hi = tiles * (id + 1) / nt;
      WinoBuffers& buf = Buffers(*wino, c, wino->scratch);  // this worker's own
      dnnl::stream& ts = Stream();
      dnnl::memory v_m = buf.Tiles(np, tc, c, vs, bf16), m_m = buf.Products(np, tc, o, ms);
      dnnl::memory s_m({{std::max<int64_t>(wino->scratch, 1)}, dt::u8, tag::a}, eng,
                       buf.scratch.data());
      std::array<double, 4> at{}, mine{};
      for (int64_t t0 = lo; t0 < hi; t0 += tc) {
        const int64_t count = std::min(tc, hi - t0);
        if (timed) at[0] = omp_get_wtime();
        input(buf, t0, 0, count);
        if (timed) at[1] = omp_get_wtime();
        wino->matmul.execute(ts, {{DNNL_ARG_SRC, v_m}, {DNNL_ARG_WEIGHTS, wino->u},
                                  {DNNL_ARG_DST, m_m}, {DNNL_ARG_SCRATCHPAD, s_m}});
        ts.wait();
        if (timed) at[2] = omp_get_wtime();
        output(buf, t0, 0, count);
        if (timed) {
          at[3] = omp_get_wtime();
          for (int i = 0; i < 3; ++i) mine[i] += at[i + 1] - at[i];
        }
      }
      if (timed) {
#pragma omp critical(ssd_wino_phases)
        for (int i = 0; i < 3; ++i) phases[i] += mine[i] / nt;
      }
    }
    if (timed) {
      t_last_phases = phases;
      t_last_products = 1;
    }
    return;
  }
  // the calling thread's buffers (engines may run on several threads at once), bound here:
  // inside the parallel regions below, Buffers() would be each worker's own
  WinoBuffers& buf = Buffers(*wino, c, 0);
  dnnl::stream& s = Stream();
  dnnl::memory v_m = buf.Tiles(np, tc, c, vs, bf16), m_m = buf.Products(np, tc, o, ms);
  if (grouped) {  // the same buffers as 1 x (P C) x tc x 1 and 1 x (P O) x tc x 1, NHWC
    v_m = dnnl::memory({{1, np * c, tc, 1}, dt::f32, tag::nhwc}, eng, buf.v.data());
    m_m = dnnl::memory({{1, np * o, tc, 1}, dt::f32, tag::nhwc}, eng, buf.m.data());
  }
  std::array<double, 4> at{};
  std::array<double, 3> phases{};
  for (int64_t t0 = 0; t0 < tiles; t0 += tc) {
    if (timed) at[0] = omp_get_wtime();
    ParallelRange(tc, [&](int64_t lo, int64_t hi) { input(buf, t0, lo, hi); });
    if (timed) at[1] = omp_get_wtime();
    wino->matmul.execute(s, {{DNNL_ARG_SRC, v_m}, {DNNL_ARG_WEIGHTS, wino->u},
                             {DNNL_ARG_DST, m_m}});
    s.wait();
    if (timed) at[2] = omp_get_wtime();
    ParallelRange(std::min(tc, tiles - t0),
                  [&](int64_t lo, int64_t hi) { output(buf, t0, lo, hi); });
    if (timed) {
      at[3] = omp_get_wtime();
      for (int i = 0; i < 3; ++i) phases[i] += at[i + 1] - at[i];
    }
  }
  if (timed) {
    t_last_phases = phases;
    t_last_products = grouped ? 2 : 1;
  }
}

// conv2d_nhwc(src NHWC, weight OHWI, bias (O), strides, pads (top, left, bottom, right),
//             dilations, relu, compute, dst NHWC); compute: 0 float32, 1 bfloat16, 2 float32
//             Winograd F(2x2, 3x3) (3x3, stride 1, dilation 1, pads 0 or 1), 3 the same with
//             bfloat16 products, 4 float32 Winograd F(4x4, 3x3) (its transforms' constants,
//             up to 8 and 5, make bfloat16 products ~6e-2 off: not offered); relu: 0 none,
//             1 ReLU, 2 (Winograd, no residual) ReLU and then a 2x2 stride-2 max pool, dst
//             the pooled map (ceil or floor mode, by its size)
// conv2d_nhwc_add: the same with a residual of dst's shape added before the ReLU (a residual
// block's conv -> add -> relu in one pass over dst), the argument before dst: float32, or
// bfloat16 with bfloat16 compute (1, 3)
void RunF32(TensorView src, TensorView weight, TensorView bias, const TensorView* residual,
            int64_t sh, int64_t sw, int64_t pt, int64_t pl, int64_t pb, int64_t pr, int64_t dh,
            int64_t dw, int64_t relu, int64_t compute, TensorView dst) {
  if (g_phase_timing.load(std::memory_order_relaxed)) {
    t_last_phases = {-1.0, -1.0, -1.0};
    t_last_products = -1;
  }
  const bool bf16_ok = compute == 1 || compute == 3;  // bfloat16 activations in and out
  CheckFloat(src, "src", 4, bf16_ok);
  CheckF32(weight, "weight", 4);
  CheckF32(bias, "bias", 1);
  CheckFloat(dst, "dst", 4, bf16_ok);
  if (residual != nullptr) {
    CheckFloat(*residual, "residual", 4, bf16_ok);
    for (int i = 0; i < 4; ++i)
      TVM_FFI_ICHECK(residual->size(i) == dst.size(i)) << "residual must have dst's shape";
  }
  TVM_FFI_ICHECK(weight.size(3) == src.size(3)) << "weight OHWI input channels "
      << weight.size(3) << " != src channels " << src.size(3) << " (groups are not supported)";
  TVM_FFI_ICHECK(bias.size(0) == weight.size(0) && dst.size(3) == weight.size(0));
  TVM_FFI_ICHECK(compute >= 0 && compute <= 4) << "compute must be 0 (float32), 1 (bfloat16), "
      "2 (float32 Winograd F(2x2, 3x3)), 3 (the same with bfloat16 products) or 4 (float32 "
      "Winograd F(4x4, 3x3)), got " << compute;
  TVM_FFI_ICHECK(relu >= 0 && relu <= 2) << "relu must be 0 (none), 1 (ReLU) or 2 (ReLU, then "
      "a 2x2 stride-2 max pool), got " << relu;
  TVM_FFI_ICHECK(relu < 2 || compute >= 2) << "relu 2 (a fused max pool) needs a Winograd compute";
  if (compute >= 2) {
    TVM_FFI_ICHECK(sh == 1 && sw == 1 && dh == dw && dh >= 1)
        << "winograd: stride 1 and the same dilation on both sides only";
    RunWinograd(src, weight, bias, residual, pt, pl, pb, pr, dh, relu != 0, relu == 2,
                compute == 3, compute == 4 ? 4 : 2, dst);
    return;
  }
  const int64_t bf16 = compute;
  Key key;
  key << "conv" << src.size(0) << src.size(1) << src.size(2) << src.size(3) << weight.size(0)
      << weight.size(1) << weight.size(2) << dst.size(1) << dst.size(2) << sh << sw << pt << pl
      << pb << pr << dh << dw << relu << bf16 << (residual != nullptr)
      << (residual != nullptr && IsBf16(*residual)) << IsBf16(src) << IsBf16(dst)
      << weight.data_ptr();
  auto conv = Cached(
      key.str(), Fingerprint(static_cast<const float*>(weight.data_ptr()), weight.numel()),
      [&] {
        return MakeConv(src, weight, dst, sh, sw, pt, pl, pb, pr, dh, dw, relu != 0, bf16 != 0,
                        residual);
      });
  auto& eng = CpuEngine();
  dnnl::stream& s = Stream();
  dnnl::memory src_m(conv->src_user, eng, src.data_ptr());
  dnnl::memory src_c = src_m;
  if (conv->src_reorder) {
    // the bfloat16 copy of src lives in a buffer kept per calling thread: a fresh one per
    // call (92 MB for SSD300's 300x300x64 at batch 8) cost its page faults every call
    thread_local LineBuffer<char> src_copy;
    src_copy.Grow(static_cast<int64_t>(conv->src_prim.get_size()));
    src_c = dnnl::memory(conv->src_prim, eng, src_copy.data());
    dnnl::reorder(src_m, src_c).execute(s, src_m, src_c);
  }
  std::unordered_map<int, dnnl::memory> args{
      {DNNL_ARG_SRC, src_c},
      {DNNL_ARG_WEIGHTS, conv->weights},
      {DNNL_ARG_BIAS, dnnl::memory(conv->bias_md, eng, bias.data_ptr())},
      {DNNL_ARG_DST, dnnl::memory(conv->dst_md, eng, dst.data_ptr())}};
  if (residual != nullptr)
    args[DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1] =
        dnnl::memory(conv->residual_md, eng, residual->data_ptr());
  conv->prim.execute(s, args);
  s.wait();
}

void Conv2dNHWC(TensorView src, TensorView weight, TensorView bias, int64_t sh, int64_t sw,
                int64_t pt, int64_t pl, int64_t pb, int64_t pr, int64_t dh, int64_t dw,
                int64_t relu, int64_t compute, TensorView dst) {
  RunF32(src, weight, bias, nullptr, sh, sw, pt, pl, pb, pr, dh, dw, relu, compute, dst);
}

void Conv2dNHWCAdd(TensorView src, TensorView weight, TensorView bias, int64_t sh, int64_t sw,
                   int64_t pt, int64_t pl, int64_t pb, int64_t pr, int64_t dh, int64_t dw,
                   int64_t relu, int64_t compute, TensorView residual, TensorView dst) {
  RunF32(src, weight, bias, &residual, sh, sw, pt, pl, pb, pr, dh, dw, relu, compute, dst);
}

dnnl::memory ScaleMemory(const float* values, int64_t n) {
  dnnl::memory m({{n}, dnnl::memory::data_type::f32, dnnl::memory::format_tag::a}, CpuEngine());
  std::memcpy(m.get_data_handle(), values, sizeof(float) * n);
  return m;
}

std::shared_ptr<Conv> MakeConvInt8(const TensorView& src, const TensorView& weight,
                                   const TensorView& wscale, const TensorView& dst,
                                   float src_scale, float dst_scale, int64_t sh, int64_t sw,
                                   int64_t pt, int64_t pl, int64_t pb, int64_t pr, int64_t dh,
                                   int64_t dw, bool relu, const TensorView* residual) {
  using tag = dnnl::memory::format_tag;
  using dt = dnnl::memory::data_type;
  const auto [n, h, w, c, o, kh, kw, oh, ow, pointwise] =
      GeometryOf(src, weight, dst, sh, sw, pt, pl, pb, pr);
  const bool dst_u8 = IsDtype(dst, kDLUInt, 8);
  const dt dst_dt = dst_u8 ? dt::u8 : dt::f32;
  auto conv = std::make_shared<Conv>();
  // a residual block's add and its ReLU run inside the primitive, before the u8
  // requantization: no float round trip for the block's output
  if (residual != nullptr) {
    const dt r_dt = IsDtype(*residual, kDLUInt, 8) ? dt::u8 : dt::f32;
    conv->residual_md = pointwise ? dnnl::memory::desc({n * h * w, o}, r_dt, tag::ab)
                                  : dnnl::memory::desc({n, o, oh, ow}, r_dt, tag::nhwc);
  }
  dnnl::primitive_attr attr =
      PostOpsAttr(relu, residual != nullptr ? &conv->residual_md : nullptr);
  // weights' scales: one per output channel, which is dim 0 of OIHW and dim 1 of matmul's KxN
  attr.set_scales_mask(DNNL_ARG_SRC, 0);
  attr.set_scales_mask(DNNL_ARG_WEIGHTS, pointwise ? 1 << 1 : 1 << 0);
  if (dst_u8) attr.set_scales_mask(DNNL_ARG_DST, 0);
  dnnl::stream& s = Stream();
  dnnl::memory wei_user;
  dnnl::memory::desc wei_prim;
  if (pointwise) {  // see MakeConv: oneDNN's matmul is the faster pointwise kernel
    const int64_t m = n * h * w;
    conv->src_user = conv->src_prim = dnnl::memory::desc({m, c}, dt::u8, tag::ab);
    conv->dst_md = dnnl::memory::desc({m, o}, dst_dt, tag::ab);
    conv->bias_md = dnnl::memory::desc({1, o}, dt::f32, tag::ab);
    auto pd = dnnl::matmul::primitive_desc(CpuEngine(), conv->src_prim,
                                           dnnl::memory::desc({c, o}, dt::s8, tag::any),
                                           conv->bias_md, conv->dst_md, attr);
    conv->prim = dnnl::matmul(pd);
    wei_user = dnnl::memory({{c, o}, dt::s8, tag::ba}, CpuEngine(), weight.data_ptr());
    wei_prim = pd.weights_desc();
  } else {
    conv->src_user = conv->src_prim = dnnl::memory::desc({n, c, h, w}, dt::u8, tag::nhwc);
    conv->dst_md = dnnl::memory::desc({n, o, oh, ow}, dst_dt, tag::nhwc);
    conv->bias_md = dnnl::memory::desc({o}, dt::f32, tag::a);
    auto pd = dnnl::convolution_forward::primitive_desc(
        CpuEngine(), dnnl::prop_kind::forward_inference, dnnl::algorithm::convolution_direct,
        conv->src_prim, dnnl::memory::desc({o, c, kh, kw}, dt::s8, tag::any), conv->bias_md,
        conv->dst_md, {sh, sw}, {dh - 1, dw - 1}, {pt, pl}, {pb, pr}, attr);
    conv->prim = dnnl::convolution_forward(pd);
    wei_user = dnnl::memory({{o, c, kh, kw}, dt::s8, tag::ohwi}, CpuEngine(), weight.data_ptr());
    wei_prim = pd.weights_desc();
  }
  conv->weights = dnnl::memory(wei_prim, CpuEngine());
  dnnl::reorder(wei_user, conv->weights).execute(s, wei_user, conv->weights);
  s.wait();
  conv->scales[DNNL_ARG_ATTR_SCALES | DNNL_ARG_SRC] = ScaleMemory(&src_scale, 1);
  conv->scales[DNNL_ARG_ATTR_SCALES | DNNL_ARG_WEIGHTS] =
      ScaleMemory(static_cast<const float*>(wscale.data_ptr()), o);
  if (dst_u8) conv->scales[DNNL_ARG_ATTR_SCALES | DNNL_ARG_DST] = ScaleMemory(&dst_scale, 1);
  conv->fingerprint = FingerprintBytes(weight.data_ptr(), weight.numel());
  return conv;
}

// conv2d_nhwc_int8(src u8 NHWC, weight s8 OHWI, weight scales f32 (O), bias f32 (O),
//                  src scale, dst scale, strides, pads, dilations, relu, dst u8|f32 NHWC)
// conv2d_nhwc_int8_add: the same with a residual of dst's shape added before the ReLU (a
// residual block's conv -> add -> relu), the argument before dst: float32, or u8 added as is
// (the caller divides the weight scales, bias and dst scale by the residual's scale instead)
void RunInt8(TensorView src, TensorView weight, TensorView wscale, TensorView bias,
             const TensorView* residual, double src_scale, double dst_scale, int64_t sh,
             int64_t sw, int64_t pt, int64_t pl, int64_t pb, int64_t pr, int64_t dh, int64_t dw,
             int64_t relu, TensorView dst) {
  TVM_FFI_ICHECK(IsDtype(src, kDLUInt, 8) && src.ndim() == 4 && src.IsContiguous())
      << "src must be a contiguous uint8 NHWC tensor";
  TVM_FFI_ICHECK(IsDtype(weight, kDLInt, 8) && weight.ndim() == 4 && weight.IsContiguous())
      << "weight must be a contiguous int8 OHWI tensor";
  CheckF32(wscale, "weight scales", 1);
  CheckF32(bias, "bias", 1);
  TVM_FFI_ICHECK((IsDtype(dst, kDLUInt, 8) || IsDtype(dst, kDLFloat, 32)) && dst.ndim() == 4 &&
                 dst.IsContiguous()) << "dst must be a contiguous uint8 or float32 NHWC tensor";
  if (residual != nullptr) {
    TVM_FFI_ICHECK((IsDtype(*residual, kDLUInt, 8) || IsDtype(*residual, kDLFloat, 32)) &&
                   residual->ndim() == 4 && residual->IsContiguous())
        << "residual must be a contiguous uint8 or float32 NHWC tensor";
    for (int i = 0; i < 4; ++i)
      TVM_FFI_ICHECK(residual->size(i) == dst.size(i)) << "residual must have dst's shape";
  }
  TVM_FFI_ICHECK(weight.size(3) == src.size(3)) << "weight OHWI input channels "
      << weight.size(3) << " != src channels " << src.size(3) << " (groups are not supported)";
  TVM_FFI_ICHECK(bias.size(0) == weight.size(0) && wscale.size(0) == weight.size(0) &&
                 dst.size(3) == weight.size(0));
  TVM_FFI_ICHECK(src_scale > 0 && dst_scale > 0) << "scales must be positive";
  Key key;
  key << "int8" << src.size(0) << src.size(1) << src.size(2) << src.size(3) << weight.size(0)
      << weight.size(1) << weight.size(2) << dst.size(1) << dst.size(2) << sh << sw << pt << pl
      << pb << pr << dh << dw << relu << (residual == nullptr ? -1 : int(residual->dtype().code))
      << int(dst.dtype().code) << src_scale << dst_scale << weight.data_ptr() << wscale.data_ptr();
  auto conv = Cached(key.str(), FingerprintBytes(weight.data_ptr(), weight.numel()), [&] {
    return MakeConvInt8(src, weight, wscale, dst, static_cast<float>(src_scale),
                        static_cast<float>(dst_scale), sh, sw, pt, pl, pb, pr, dh, dw,
                        relu != 0, residual);
  });
  auto& eng = CpuEngine();
  dnnl::stream& s = Stream();
  std::unordered_map<int, dnnl::memory> args = conv->scales;
  args[DNNL_ARG_SRC] = dnnl::memory(conv->src_user, eng, src.data_ptr());
  args[DNNL_ARG_WEIGHTS] = conv->weights;
  args[DNNL_ARG_BIAS] = dnnl::memory(conv->bias_md, eng, bias.data_ptr());
  args[DNNL_ARG_DST] = dnnl::memory(conv->dst_md, eng, dst.data_ptr());
  if (residual != nullptr)
    args[DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1] =
        dnnl::memory(conv->residual_md, eng, residual->data_ptr());
  conv->prim.execute(s, args);
  s.wait();
}

void Conv2dNHWCInt8(TensorView src, TensorView weight, TensorView wscale, TensorView bias,
                    double src_scale, double dst_scale, int64_t sh, int64_t sw, int64_t pt,
                    int64_t pl, int64_t pb, int64_t pr, int64_t dh, int64_t dw, int64_t relu,
                    TensorView dst) {
  RunInt8(src, weight, wscale, bias, nullptr, src_scale, dst_scale, sh, sw, pt, pl, pb, pr, dh,
          dw, relu, dst);
}

void Conv2dNHWCInt8Add(TensorView src, TensorView weight, TensorView wscale, TensorView bias,
                       double src_scale, double dst_scale, int64_t sh, int64_t sw, int64_t pt,
                       int64_t pl, int64_t pb, int64_t pr, int64_t dh, int64_t dw, int64_t relu,
                       TensorView residual, TensorView dst) {
  RunInt8(src, weight, wscale, bias, &residual, src_scale, dst_scale, sh, sw, pt, pl, pb, pr,
          dh, dw, relu, dst);
}

dnnl::memory::data_type ActivationType(const TensorView& t, const char* name) {
  using dt = dnnl::memory::data_type;
  TVM_FFI_ICHECK((IsDtype(t, kDLUInt, 8) || IsDtype(t, kDLFloat, 32) || IsBf16(t)) &&
                 t.ndim() == 4 && t.IsContiguous() && t.device().device_type == kDLCPU)
      << name << " must be a contiguous uint8, float32 or bfloat16 4-d tensor on the CPU";
  return IsDtype(t, kDLUInt, 8) ? dt::u8 : IsBf16(t) ? dt::bf16 : dt::f32;
}

// Runs a one-input primitive (pooling, or a reorder: its FROM/TO are oneDNN's SRC/DST).
void ExecuteSrcDst(const Conv& p, const TensorView& src, const TensorView& dst) {
  auto& eng = CpuEngine();
  dnnl::stream& s = Stream();
  p.prim.execute(s, {{DNNL_ARG_SRC, dnnl::memory(p.src_user, eng, src.data_ptr())},
                     {DNNL_ARG_DST, dnnl::memory(p.dst_md, eng, dst.data_ptr())}});
  s.wait();
}

// max_pool2d_nhwc(src NHWC f32|bf16|u8, kernel h, w, strides, pads (top, left, bottom, right),
//                 dst NHWC of src's type): padding never wins the max, as in Relax's op, so
// ceil_mode is more bottom/right padding: read from dst's size. TVM compiles its own pool to
// one thread; this one runs on oneDNN's threads.
void MaxPool2dNHWC(TensorView src, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t pt,
                   int64_t pl, int64_t pb, int64_t pr, TensorView dst) {
  using tag = dnnl::memory::format_tag;
  const auto type = ActivationType(src, "src");
  TVM_FFI_ICHECK(ActivationType(dst, "dst") == type && dst.size(0) == src.size(0) &&
                 dst.size(3) == src.size(3)) << "dst must have src's type, batch and channels";
  // ceil_mode: the last window may run past the padding given; it reads more padding instead
  pb = std::max(pb, (dst.size(1) - 1) * sh + kh - src.size(1) - pt);
  pr = std::max(pr, (dst.size(2) - 1) * sw + kw - src.size(2) - pl);
  Key key;
  key << "maxpool" << int(type) << src.size(0) << src.size(1) << src.size(2) << src.size(3)
      << dst.size(1) << dst.size(2) << kh << kw << sh << sw << pt << pl << pb << pr;
  auto pool = Cached(key.str(), {}, [&] {
    auto p = std::make_shared<Conv>();
    p->src_user = dnnl::memory::desc({src.size(0), src.size(3), src.size(1), src.size(2)},
                                     type, tag::nhwc);
    p->dst_md = dnnl::memory::desc({dst.size(0), dst.size(3), dst.size(1), dst.size(2)}, type,
                                   tag::nhwc);
    p->prim = dnnl::pooling_forward(dnnl::pooling_forward::primitive_desc(
        CpuEngine(), dnnl::prop_kind::forward_inference, dnnl::algorithm::pooling_max,
        p->src_user, p->dst_md, {sh, sw}, {kh, kw}, {0, 0}, {pt, pl}, {pb, pr}));
    return p;
  });
  ExecuteSrcDst(*pool, src, dst);
}

// nhwc_to_nchw(src NHWC f32|bf16|u8, dst NCHW): the layout permute in front of a head output, as
// a oneDNN reorder (threaded) instead of TVM's one-thread transpose.
void NHWCToNCHW(TensorView src, TensorView dst) {
  using tag = dnnl::memory::format_tag;
  const auto type = ActivationType(src, "src");
  TVM_FFI_ICHECK(ActivationType(dst, "dst") == type && dst.size(0) == src.size(0) &&
                 dst.size(1) == src.size(3) && dst.size(2) == src.size(1) &&
                 dst.size(3) == src.size(2)) << "dst must be src permuted NHWC -> NCHW";
  Key key;
  key << "nchw" << int(type) << src.size(0) << src.size(1) << src.size(2) << src.size(3);
  auto r = Cached(key.str(), {}, [&] {
    auto p = std::make_shared<Conv>();
    dnnl::memory::dims dims{src.size(0), src.size(3), src.size(1), src.size(2)};
    p->src_user = dnnl::memory::desc(dims, type, tag::nhwc);
    p->dst_md = dnnl::memory::desc(dims, type, tag::nchw);
    p->prim = dnnl::reorder(dnnl::reorder::primitive_desc(CpuEngine(), p->src_user, CpuEngine(),
                                                          p->dst_md));
    return p;
  });
  ExecuteSrcDst(*r, src, dst);
}

// l2norm_nhwc(src NHWC f32|bf16, weight (C) f32, eps, dst NHWC f32): SSD's L2Norm on the layout
// the convolutions write, dst = weight * src / (sqrt(sum over C of src^2) + eps) per pixel, in
// the ONNX graph's order of operations. Relax's version runs as seven one-thread kernels in NCHW
// between two permutes; this is one pass over the pixels on oneDNN's threads.
template <typename Src>
__attribute__((always_inline)) inline void L2NormRows(const Src* src, const float* w, float eps,
                                                      float* dst, int64_t lo, int64_t hi,
                                                      int64_t c) {
  for (int64_t p = lo; p < hi; ++p) {
    const Src* x = src + p * c;
    float* y = dst + p * c;
    F8 acc = {};
    int64_t k = 0;
    for (; k + 8 <= c; k += 8) {
      const F8 v = Load<F8>(x + k);
      acc += v * v;
    }
    float sum = 0.f;
    for (int i = 0; i < 8; ++i) sum += acc[i];
    for (; k < c; ++k) sum += Load<float>(x + k) * Load<float>(x + k);
    const float n = std::sqrt(sum) + eps;
    k = 0;
    for (; k + 8 <= c; k += 8) Store<F8>(y + k, Load<F8>(w + k) * Load<F8>(x + k) / n);
    for (; k < c; ++k) y[k] = w[k] * Load<float>(x + k) / n;
  }
}

VECTOR_CLONES
void L2NormPixels(const float* src, const float* w, float eps, float* dst, int64_t lo,
                  int64_t hi, int64_t c) {
  L2NormRows(src, w, eps, dst, lo, hi, c);
}

VECTOR_CLONES
void L2NormPixels(const uint16_t* src, const float* w, float eps, float* dst, int64_t lo,
                  int64_t hi, int64_t c) {
  L2NormRows(src, w, eps, dst, lo, hi, c);
}

void L2NormNHWC(TensorView src, TensorView weight, double eps, TensorView dst) {
  CheckFloat(src, "src", 4, true);
  CheckF32(weight, "weight", 1);
  CheckF32(dst, "dst", 4);
  for (int i = 0; i < 4; ++i)
    TVM_FFI_ICHECK(dst.size(i) == src.size(i)) << "dst must have src's shape";
  TVM_FFI_ICHECK(weight.size(0) == src.size(3)) << "weight must have one value per channel ("
                                                << src.size(3) << "), got " << weight.size(0);
  const int64_t pixels = src.size(0) * src.size(1) * src.size(2);
  const float* w = static_cast<const float*>(weight.data_ptr());
  float* y = static_cast<float*>(dst.data_ptr());
  const float e = static_cast<float>(eps);
  const int64_t c = src.size(3);
  ParallelRange(pixels, [&](int64_t lo, int64_t hi) {
    if (IsBf16(src))
      L2NormPixels(static_cast<const uint16_t*>(src.data_ptr()), w, e, y, lo, hi, c);
    else
      L2NormPixels(static_cast<const float*>(src.data_ptr()), w, e, y, lo, hi, c);
  });
}

int64_t CacheSize() {
  std::lock_guard<std::mutex> lock(g_mu);
  return static_cast<int64_t>(CacheOf<Conv>().size() + CacheOf<Wino>().size());
}

// oneDNN (GNU OpenMP build) threads for convolutions issued from the calling thread.
void SetNumThreads(int64_t n) { omp_set_num_threads(static_cast<int>(n)); }

// vector_isa(level): the Winograd transforms' instruction set from now on, 0 baseline, 1 AVX2,
// 2 AVX-512, at most what this CPU runs; -1 goes back to the widest. Returns the one in effect.
int64_t SetVectorIsa(int64_t level) {
  const int64_t cpu = static_cast<int64_t>(CpuVectorIsa());
  TVM_FFI_ICHECK(level >= -1 && level <= cpu)
      << "vector_isa: level -1 (this CPU's widest), or 0 (baseline) to " << cpu
      << " (what this CPU runs), got " << level;
  g_isa_cap.store(static_cast<int>(level), std::memory_order_relaxed);
  return static_cast<int64_t>(VectorIsa());
}

// oneDNN's verbose mode (0 off, 1 every execution, 2 also creation), printed to stdout: lets a
// test see which implementation ran each primitive.
void SetVerbose(int64_t level) { dnnl::set_verbose(static_cast<int>(level)); }

// winograd_timing(on): Winograd calls time their phases from now on (1) or no longer (0)
void SetWinogradTiming(int64_t on) {
  g_phase_timing.store(on != 0, std::memory_order_relaxed);
  t_last_phases = {-1.0, -1.0, -1.0};
  t_last_products = -1;
}

// winograd_phase(i): the calling thread's last float convolution call's phase i (0 input
// transform, 1 products, 2 output transform) in seconds; -1 where that call was not Winograd
// or ran without timing
double WinogradPhase(int64_t i) {
  TVM_FFI_ICHECK(i >= 0 && i < 3) << "phase must be 0, 1 or 2, got " << i;
  return t_last_phases[i];
}

// winograd_products_ran(): what ran that timed call's products: 1 the batched matmul, 2 the
// grouped 1x1 convolution (see the end of MakeWino); -1 as above
int64_t WinogradProductsRan() { return t_last_products; }

// winograd_products(mode): how the shared-chunk float32 Winograd products of the layers made
// from now on run: 0 a grouped 1x1 convolution where MakeWino's rule says (the default), 1
// always the batched matmul, 2 the grouped convolution wherever oneDNN makes one; -1 changes
// nothing. Returns the mode in effect.
int64_t SetWinogradProducts(int64_t mode) {
  TVM_FFI_ICHECK(mode >= -1 && mode <= 2)
      << "winograd_products: mode 0 (the default choice), 1 (matmul), 2 (grouped convolution) "
      << "or -1 (read), got " << mode;
  if (mode >= 0) g_products_mode.store(static_cast<int>(mode), std::memory_order_relaxed);
  return g_products_mode.load(std::memory_order_relaxed);
}

void ClearCache() {
  std::lock_guard<std::mutex> lock(g_mu);
  CacheOf<Conv>().clear();
  CacheOf<Wino>().clear();
}

}  // namespace

TVM_FFI_DLL_EXPORT_TYPED_FUNC(conv2d_nhwc, Conv2dNHWC);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(conv2d_nhwc_add, Conv2dNHWCAdd);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(conv2d_nhwc_int8, Conv2dNHWCInt8);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(conv2d_nhwc_int8_add, Conv2dNHWCInt8Add);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(max_pool2d_nhwc, MaxPool2dNHWC);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(nhwc_to_nchw, NHWCToNCHW);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(l2norm_nhwc, L2NormNHWC);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(cache_size, CacheSize);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(clear_cache, ClearCache);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(set_num_threads, SetNumThreads);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(vector_isa, SetVectorIsa);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(set_verbose, SetVerbose);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(winograd_timing, SetWinogradTiming);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(winograd_phase, WinogradPhase);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(winograd_products_ran, WinogradProductsRan);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(winograd_products, SetWinogradProducts);
