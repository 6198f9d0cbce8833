// Device helpers shared by our two AscendC kernels (included after kernel_operator.h).
// NOT RUN ON HARDWARE: type-checked against the open Ascend C headers only.
#ifndef DSA_KERNEL_COMMON_H_
#define DSA_KERNEL_COMMON_H_

namespace dsa_common {

using namespace AscendC;

constexpr float kMaskScore = -3.4028234663852886e38f;  // below every real score
constexpr uint32_t kNegInfBits = 0xff800000u;           // -inf for padded output values
constexpr uint32_t kCubeRows = 16;                       // Cube fractal height

__aicore__ inline uint32_t Min(uint64_t a, uint64_t b) { return static_cast<uint32_t>(a < b ? a : b); }
__aicore__ inline uint32_t AlignUp(uint32_t a, uint32_t b) { return (a + b - 1) / b * b; }

// ND rows [rows, cols] (row stride srcRowStride elements) -> an NZ matrix whose column blocks
// are dstRows rows tall (dstRows: the matrix's rows rounded up to 16).
__aicore__ inline Nd2NzParams RowsToNz(uint32_t rows, uint32_t cols, uint32_t srcRowStride, uint32_t dstRows) {
  Nd2NzParams p;
  p.ndNum = 1;
  p.nValue = static_cast<uint16_t>(rows);
  p.dValue = static_cast<uint16_t>(cols);
  p.srcNdMatrixStride = 0;
  p.srcDValue = static_cast<uint16_t>(srcRowStride);
  p.dstNzC0Stride = static_cast<uint16_t>(dstRows);
  p.dstNzNStride = 1;
  p.dstNzMatrixStride = 0;
  return p;
}

// Set and wait one event of pipe pair E (e.g. MTE2 -> V) on this core.
template <HardEvent E>
__aicore__ inline void PipeSync() {
  const event_t id = static_cast<event_t>(GetTPipePtr()->FetchEventID(E));
  SetFlag<E>(id);
  WaitFlag<E>(id);
}

// C [m, n] (+)= A [m, k] . B [k, n] on the Cube (L0A x L0B -> L0C; m, n, k padded to the
// fractals); init = true starts the sum.
template <typename C, typename A, typename B>
__aicore__ inline void MmadTile(const LocalTensor<C>& c, const LocalTensor<A>& a, const LocalTensor<B>& b,
                                uint32_t m, uint32_t n, uint32_t k, bool init) {
  MmadParams mm;
  mm.m = static_cast<uint16_t>(m);
  mm.n = static_cast<uint16_t>(n);
  mm.k = static_cast<uint16_t>(k);
  mm.cmatrixInitVal = init;
  Mmad(c, a, b, mm);
}

// Hands a finished L0C tile through its queue, writes its first `rows` rows (of srcRows, the
// padded height) x `cols` to dst row-major with dstStride elements between rows, and frees it.
template <typename T, typename Que>
__aicore__ inline void FixpipeRowsOut(const GlobalTensor<T>& dst, Que& que, LocalTensor<T>& c, uint32_t rows,
                                      uint32_t cols, uint32_t srcRows, uint32_t dstStride) {
  que.EnQue(c);
  c = que.template DeQue<T>();
  FixpipeParamsV220 fp;
  fp.nSize = static_cast<uint16_t>(cols);
  fp.mSize = static_cast<uint16_t>(rows);
  fp.srcStride = static_cast<uint16_t>(srcRows);
  fp.dstStride = dstStride;
  fp.ndNum = 1;
  Fixpipe<T, T, CFG_ROW_MAJOR>(dst, c, fp);
  que.FreeTensor(c);
}

}  // namespace dsa_common

#endif  // DSA_KERNEL_COMMON_H_
