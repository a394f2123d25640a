// Convolution offload for TVM Relax engines on x86 CPUs: oneDNN primitives behind TVM FFI
// functions that Relax calls with R.call_dps_packed (destination-passing style: the output
// tensor is the last argument). This is what IGIE does with -libs=...: the compiler keeps the
// graph and the glue ops, a vendor library runs the convolutions.
//
// Layout contract (ssd_pipeline/compile.py rewrites the graph to it): activations NHWC
// float32, weights OHWI float32 (constants), bias (O) float32. With bf16=1 the convolution
// computes in bfloat16 (avx512_bf16 / AMX where present) and still reads/writes float32.
// conv2d_nhwc_add also adds a float32 residual of dst's shape before the ReLU (a residual
// block's conv -> add -> relu as one primitive: a binary post-op).
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

#include <algorithm>
#include <cstring>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

using tvm::ffi::TensorView;

dnnl::engine& CpuEngine() {
  static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
}

void CheckF32(const TensorView& t, const char* name, int ndim) {
  DLDataType f32{kDLFloat, 32, 1};
  TVM_FFI_ICHECK(t.dtype() == f32) << name << " must be float32";
  TVM_FFI_ICHECK(t.ndim() == ndim) << name << " must have " << ndim << " dims, got " << t.ndim();
  TVM_FFI_ICHECK(t.device().device_type == kDLCPU) << name << " must be on the CPU";
  TVM_FFI_ICHECK(t.IsContiguous()) << name << " must be contiguous";
}

// 16 values spread over the tensor: detects other weights behind a reused address.
std::vector<float> Fingerprint(const float* p, int64_t n) {
  std::vector<float> fp(16);
  for (int i = 0; i < 16; ++i) fp[i] = p[(n - 1) * i / 15];
  return fp;
}

// 16 bytes spread over any tensor's data (int8 weights).
std::vector<float> FingerprintBytes(const void* p, int64_t nbytes) {
  std::vector<float> fp(16);
  auto b = static_cast<const unsigned char*>(p);
  for (int i = 0; i < 16; ++i) fp[i] = b[(nbytes - 1) * i / 15];
  return fp;
}

struct Conv {
  // convolution_forward, or matmul for a pointwise (1x1) convolution; the glue calls (max
  // pool, layout permute) keep their primitive here too, with src_user and dst_md only
  dnnl::primitive prim;
  dnnl::memory::desc src_user, src_prim, dst_md, bias_md;
  dnnl::memory weights;            // in the primitive's preferred format and type
  std::vector<float> fingerprint;  // of the user's weights
  bool src_reorder = false;
  std::unordered_map<int, dnnl::memory> scales;  // int8: DNNL_ARG_ATTR_SCALES | arg -> values
  dnnl::memory::desc residual_md;                 // with a residual add: its input
};

std::mutex g_mu;
std::unordered_map<std::string, std::shared_ptr<Conv>> g_cache;

// The cached primitive for `key`, made by `make` when absent or when other weights now sit at
// the same address (their fingerprint differs).
template <typename Make>
std::shared_ptr<Conv> Cached(const std::string& key, const std::vector<float>& fingerprint,
                             Make make) {
  std::lock_guard<std::mutex> lock(g_mu);
  auto it = g_cache.find(key);
  if (it != g_cache.end() && it->second->fingerprint == fingerprint) return it->second;
  auto conv = make();
  g_cache[key] = conv;
  return conv;
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
                               bool relu, bool bf16, bool residual) {
  using tag = dnnl::memory::format_tag;
  using dt = dnnl::memory::data_type;
  const auto [n, h, w, c, o, kh, kw, oh, ow, pointwise] =
      GeometryOf(src, weight, dst, sh, sw, pt, pl, pb, pr);
  auto conv = std::make_shared<Conv>();
  const dt compute = bf16 ? dt::bf16 : dt::f32;
  if (residual)
    conv->residual_md = pointwise ? dnnl::memory::desc({n * h * w, o}, dt::f32, tag::ab)
                                  : dnnl::memory::desc({n, o, oh, ow}, dt::f32, tag::nhwc);
  dnnl::primitive_attr attr = PostOpsAttr(relu, residual ? &conv->residual_md : nullptr);
  dnnl::stream s(CpuEngine());
  if (pointwise) {
    // NHWC 1x1 convolution == (N*H*W x C) . (C x O): oneDNN's matmul, because its AVX2
    // pointwise convolution kernel ran SSD300's 19x19 1024->1024 layer at 36 GOP/s against
    // ~150 GOP/s for the 3x3 layers (ssd-pipeline profile, batch 8)
    const int64_t m = n * h * w;
    conv->src_user = dnnl::memory::desc({m, c}, dt::f32, tag::ab);
    conv->src_prim = dnnl::memory::desc({m, c}, compute, tag::ab);
    conv->src_reorder = bf16;
    conv->dst_md = dnnl::memory::desc({m, o}, dt::f32, tag::ab);
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
  conv->src_user = dnnl::memory::desc({n, c, h, w}, dt::f32, tag::nhwc);
  conv->src_prim = dnnl::memory::desc({n, c, h, w}, compute, tag::nhwc);
  conv->src_reorder = bf16;
  conv->dst_md = dnnl::memory::desc({n, o, oh, ow}, dt::f32, tag::nhwc);
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

// conv2d_nhwc(src NHWC, weight OHWI, bias (O), strides, pads (top, left, bottom, right),
//             dilations, relu, bf16, dst NHWC)
// conv2d_nhwc_add: the same with a float32 residual of dst's shape added before the ReLU (a
// residual block's conv -> add -> relu in one pass over dst), the argument before dst
void RunF32(TensorView src, TensorView weight, TensorView bias, const TensorView* residual,
            int64_t sh, int64_t sw, int64_t pt, int64_t pl, int64_t pb, int64_t pr, int64_t dh,
            int64_t dw, int64_t relu, int64_t bf16, TensorView dst) {
  CheckF32(src, "src", 4);
  CheckF32(weight, "weight", 4);
  CheckF32(bias, "bias", 1);
  CheckF32(dst, "dst", 4);
  if (residual != nullptr) {
    CheckF32(*residual, "residual", 4);
    for (int i = 0; i < 4; ++i)
      TVM_FFI_ICHECK(residual->size(i) == dst.size(i)) << "residual must have dst's shape";
  }
  TVM_FFI_ICHECK(weight.size(3) == src.size(3)) << "weight OHWI input channels "
      << weight.size(3) << " != src channels " << src.size(3) << " (groups are not supported)";
  TVM_FFI_ICHECK(bias.size(0) == weight.size(0) && dst.size(3) == weight.size(0));
  std::ostringstream key;
  key << src.size(0) << ',' << src.size(1) << ',' << src.size(2) << ',' << src.size(3) << ';'
      << weight.size(0) << ',' << weight.size(1) << ',' << weight.size(2) << ';' << dst.size(1)
      << ',' << dst.size(2) << ';' << sh << sw << ';' << pt << ',' << pl << ',' << pb << ','
      << pr << ';' << dh << dw << relu << bf16 << (residual != nullptr) << ';'
      << weight.data_ptr();
  auto conv = Cached(
      key.str(), Fingerprint(static_cast<const float*>(weight.data_ptr()), weight.numel()),
      [&] {
        return MakeConv(src, weight, dst, sh, sw, pt, pl, pb, pr, dh, dw, relu != 0, bf16 != 0,
                        residual != nullptr);
      });
  auto& eng = CpuEngine();
  dnnl::stream s(eng);
  dnnl::memory src_m(conv->src_user, eng, src.data_ptr());
  dnnl::memory src_c = src_m;
  if (conv->src_reorder) {
    src_c = dnnl::memory(conv->src_prim, eng);
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
                int64_t relu, int64_t bf16, TensorView dst) {
  RunF32(src, weight, bias, nullptr, sh, sw, pt, pl, pb, pr, dh, dw, relu, bf16, dst);
}

void Conv2dNHWCAdd(TensorView src, TensorView weight, TensorView bias, int64_t sh, int64_t sw,
                   int64_t pt, int64_t pl, int64_t pb, int64_t pr, int64_t dh, int64_t dw,
                   int64_t relu, int64_t bf16, TensorView residual, TensorView dst) {
  RunF32(src, weight, bias, &residual, sh, sw, pt, pl, pb, pr, dh, dw, relu, bf16, dst);
}

bool IsDtype(const TensorView& t, DLDataTypeCode code, int bits) {
  return t.dtype().code == code && t.dtype().bits == bits && t.dtype().lanes == 1;
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
  dnnl::stream s(CpuEngine());
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
  std::ostringstream key;
  key << "int8;" << src.size(0) << ',' << src.size(1) << ',' << src.size(2) << ','
      << src.size(3) << ';' << weight.size(0) << ',' << weight.size(1) << ',' << weight.size(2)
      << ';' << dst.size(1) << ',' << dst.size(2) << ';' << sh << sw << ';' << pt << ',' << pl
      << ',' << pb << ',' << pr << ';' << dh << dw << relu << ';'
      << (residual == nullptr ? -1 : int(residual->dtype().code)) << ';'
      << int(dst.dtype().code) << ';' << src_scale << ',' << dst_scale << ';'
      << weight.data_ptr() << ',' << wscale.data_ptr();
  auto conv = Cached(key.str(), FingerprintBytes(weight.data_ptr(), weight.numel()), [&] {
    return MakeConvInt8(src, weight, wscale, dst, static_cast<float>(src_scale),
                        static_cast<float>(dst_scale), sh, sw, pt, pl, pb, pr, dh, dw,
                        relu != 0, residual);
  });
  auto& eng = CpuEngine();
  dnnl::stream s(eng);
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
  TVM_FFI_ICHECK((IsDtype(t, kDLUInt, 8) || IsDtype(t, kDLFloat, 32)) && t.ndim() == 4 &&
                 t.IsContiguous() && t.device().device_type == kDLCPU)
      << name << " must be a contiguous uint8 or float32 4-d tensor on the CPU";
  return IsDtype(t, kDLUInt, 8) ? dnnl::memory::data_type::u8 : dnnl::memory::data_type::f32;
}

// Runs a one-input primitive (pooling, or a reorder: its FROM/TO are oneDNN's SRC/DST).
void ExecuteSrcDst(const Conv& p, const TensorView& src, const TensorView& dst) {
  auto& eng = CpuEngine();
  dnnl::stream s(eng);
  p.prim.execute(s, {{DNNL_ARG_SRC, dnnl::memory(p.src_user, eng, src.data_ptr())},
                     {DNNL_ARG_DST, dnnl::memory(p.dst_md, eng, dst.data_ptr())}});
  s.wait();
}

// max_pool2d_nhwc(src NHWC f32|u8, kernel h, w, strides, pads (top, left, bottom, right),
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
  std::ostringstream key;
  key << "maxpool;" << int(type) << ';' << src.size(0) << ',' << src.size(1) << ','
      << src.size(2) << ',' << src.size(3) << ';' << dst.size(1) << ',' << dst.size(2) << ';'
      << kh << kw << sh << sw << ';' << pt << ',' << pl << ',' << pb << ',' << pr;
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

// nhwc_to_nchw(src NHWC f32|u8, dst NCHW): the layout permute in front of a head output, as
// a oneDNN reorder (threaded) instead of TVM's one-thread transpose.
void NHWCToNCHW(TensorView src, TensorView dst) {
  using tag = dnnl::memory::format_tag;
  const auto type = ActivationType(src, "src");
  TVM_FFI_ICHECK(ActivationType(dst, "dst") == type && dst.size(0) == src.size(0) &&
                 dst.size(1) == src.size(3) && dst.size(2) == src.size(1) &&
                 dst.size(3) == src.size(2)) << "dst must be src permuted NHWC -> NCHW";
  std::ostringstream key;
  key << "nchw;" << int(type) << ';' << src.size(0) << ',' << src.size(1) << ','
      << src.size(2) << ',' << src.size(3);
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

int64_t CacheSize() {
  std::lock_guard<std::mutex> lock(g_mu);
  return static_cast<int64_t>(g_cache.size());
}

// oneDNN (GNU OpenMP build) threads for convolutions issued from the calling thread.
void SetNumThreads(int64_t n) { omp_set_num_threads(static_cast<int>(n)); }

// oneDNN's verbose mode (0 off, 1 every execution, 2 also creation), printed to stdout: lets a
// test see which implementation ran each primitive.
void SetVerbose(int64_t level) { dnnl::set_verbose(static_cast<int>(level)); }

void ClearCache() {
  std::lock_guard<std::mutex> lock(g_mu);
  g_cache.clear();
}

}  // namespace

TVM_FFI_DLL_EXPORT_TYPED_FUNC(conv2d_nhwc, Conv2dNHWC);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(conv2d_nhwc_add, Conv2dNHWCAdd);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(conv2d_nhwc_int8, Conv2dNHWCInt8);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(conv2d_nhwc_int8_add, Conv2dNHWCInt8Add);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(max_pool2d_nhwc, MaxPool2dNHWC);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(nhwc_to_nchw, NHWCToNCHW);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(cache_size, CacheSize);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(clear_cache, ClearCache);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(set_num_threads, SetNumThreads);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(set_verbose, SetVerbose);
