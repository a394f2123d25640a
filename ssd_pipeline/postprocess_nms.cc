// Greedy NMS over groups of boxes that cannot overlap one another: the arithmetic of mmcv's
// CPU kernel (nms_cpu), pair by pair, run inside each group only, in one call per image.
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

using tvm::ffi::TensorView;

bool Is(const TensorView& t, DLDataTypeCode code, int bits) {
  return t.dtype().code == code && t.dtype().bits == bits && t.dtype().lanes == 1;
}

// boxes (n, 4) float32 x1 y1 x2 y2, each group contiguous and in NMS order (highest score
// first); bounds (groups + 1,) int64 its edges; keep (n,) uint8 written: 1 kept, 0 suppressed.
void NmsGroups(TensorView boxes, TensorView bounds, double iou_threshold, TensorView keep) {
  TVM_FFI_ICHECK(Is(boxes, kDLFloat, 32) && boxes.ndim() == 2 && boxes.shape()[1] == 4 &&
                 boxes.IsContiguous())
      << "boxes must be a contiguous (n, 4) float32 tensor";
  TVM_FFI_ICHECK(Is(bounds, kDLInt, 64) && bounds.ndim() == 1 && bounds.IsContiguous())
      << "bounds must be a contiguous 1-D int64 tensor";
  const int64_t n = boxes.shape()[0];
  TVM_FFI_ICHECK(Is(keep, kDLUInt, 8) && keep.ndim() == 1 && keep.shape()[0] == n &&
                 keep.IsContiguous())
      << "keep must be a contiguous uint8 tensor of " << n << " elements";
  const float* b = static_cast<const float*>(boxes.data_ptr());
  const int64_t* edge = static_cast<const int64_t*>(bounds.data_ptr());
  const int64_t groups = bounds.shape()[0] - 1;
  TVM_FFI_ICHECK(groups >= 0 && edge[0] == 0 && edge[groups] == n) << "bounds must run 0..n";
  uint8_t* k = static_cast<uint8_t*>(keep.data_ptr());
  const float thr = static_cast<float>(iou_threshold);  // mmcv's kernel takes a float
  // columns, so that the pair loop runs on whole vectors
  std::vector<float> x1(n), y1(n), x2(n), y2(n), area(n);
  for (int64_t i = 0; i < n; ++i) {
    const float* r = b + 4 * i;
    x1[i] = r[0], y1[i] = r[1], x2[i] = r[2], y2[i] = r[3];
    area[i] = (r[2] - r[0] + 0.f) * (r[3] - r[1] + 0.f);  // + offset 0, as mmcv adds it
  }
  std::fill(k, k + n, uint8_t{1});
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t end = edge[g + 1];
    TVM_FFI_ICHECK(edge[g] <= end) << "bounds must not decrease";
    for (int64_t i = edge[g]; i < end; ++i) {
      if (!k[i]) continue;
      const float ix1 = x1[i], iy1 = y1[i], ix2 = x2[i], iy2 = y2[i], ia = area[i];
      // every later box, suppressed or not: suppression only ever clears a flag, so testing
      // a box mmcv skips changes nothing, and the loop has no branch
      for (int64_t j = i + 1; j < end; ++j) {
        const float w = std::max(0.f, std::min(ix2, x2[j]) - std::max(ix1, x1[j]) + 0.f);
        const float h = std::max(0.f, std::min(iy2, y2[j]) - std::max(iy1, y1[j]) + 0.f);
        const float inter = w * h;
        k[j] &= static_cast<uint8_t>(!(inter / (ia + area[j] - inter) > thr));
      }
    }
  }
}

}  // namespace

TVM_FFI_DLL_EXPORT_TYPED_FUNC(nms_groups, NmsGroups);
