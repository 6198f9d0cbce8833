// DsaSparseFlashAttention kernel (Atlas A2/A3, MIX 1 AIC : 2 AIV), MLA-absorbed sparse
// attention. Contract and layouts: op_host/dsa_sparse_flash_attention.cpp. NOT RUN ON
// HARDWARE: type-checked against the open Ascend C headers only (ops/ascendc/tools/typecheck.sh).
//
// Work split (host tiling, sparse_mla_tiling.h): units = (token, group of gTile heads, chunk of
// the token's index list), contiguous unit ranges per AI core. Per kv tile of kvTile indices:
//   AIC:  gathers the selected cache rows (one DMA per row: page = block_table[pos / bs]) into
//         L1 as an NZ matrix [kv, 576]; S = Q . K^T over D in baseK slices (L0A/L0B, Mmad
//         accumulating in L0C) -> workspace; then P (from the AIVs) . V with V = the same rows'
//         first 512 channels (LoadData with transpose), Dv in dvChunk slices -> workspace.
//   AIV0 / AIV1: half of the group's heads each: scale, mask (-1 terminates the list; sparse
//         mode 3 drops positions past the causal limit), online softmax (running max / sum),
//         P in the query dtype -> workspace; the P.V tile rescales and accumulates in UB.
// A group whose index list straddles cores (decode: few tokens) leaves (O, max, sum) partials;
// after SyncAll the owning core's AIVs combine them (flash-decoding).
// Handshake per tile, mode 2: AIC "S ready" -> AIV "P ready" -> AIC "O ready"; each waits for
// the previous step, so one workspace slot per stage suffices.
#define DSA_TILING_FN __aicore__ inline
#include "kernel_operator.h"
#include "dsa_tiling_data.h"
#include "dsa_kernel_common.h"

using namespace AscendC;
using namespace dsa_tiling;

namespace dsa_sfa {

// The shared helpers (dsa_kernel_common.h); declared here so they shadow same-named ones.
using dsa_common::AlignUp;
using dsa_common::FixpipeRowsOut;
using dsa_common::kCubeRows;
using dsa_common::kMaskScore;
using dsa_common::kNegInfBits;
using dsa_common::Min;
using dsa_common::MmadTile;
using dsa_common::PipeSync;
using dsa_common::RowsToNz;

constexpr uint16_t kFlagScoreFull = 4;  // AIC -> AIVs
constexpr uint16_t kFlagProbFull = 5;   // AIVs -> AIC
constexpr uint16_t kFlagOutFull = 6;    // AIC -> AIVs
constexpr float kMaskLimit = -1.0e38f;  // a running max below this means "nothing seen yet"

// A token's sequence, its row within it and the keys it may see.
struct TokenInfo {
  uint32_t seq, row, qLen, kvLen, limit;  // limit: exclusive end of visible positions
};

template <typename QT>
class SparseFlashAttention {
 public:
  __aicore__ inline void Init(GM_ADDR query, GM_ADDR key, GM_ADDR indices, GM_ADDR table, GM_ADDR qLens,
                              GM_ADDR kvLens, GM_ADDR queryRope, GM_ADDR keyRope, GM_ADDR out,
                              GM_ADDR softmaxMax, GM_ADDR softmaxSum, GM_ADDR workspace,
                              const SparseMlaTilingData* tiling) {
    t_ = tiling;
    queryGm_.SetGlobalBuffer(reinterpret_cast<__gm__ QT*>(query));
    keyGm_.SetGlobalBuffer(reinterpret_cast<__gm__ QT*>(key));
    indicesGm_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(indices));
    if (table != nullptr) tableGm_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(table));
    if (qLens != nullptr) qLensGm_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(qLens));
    if (kvLens != nullptr) kvLensGm_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(kvLens));
    if (queryRope != nullptr) queryRopeGm_.SetGlobalBuffer(reinterpret_cast<__gm__ QT*>(queryRope));
    if (keyRope != nullptr) keyRopeGm_.SetGlobalBuffer(reinterpret_cast<__gm__ QT*>(keyRope));
    outGm_.SetGlobalBuffer(reinterpret_cast<__gm__ QT*>(out));
    maxGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(softmaxMax));
    sumGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(softmaxSum));
    GM_ADDR user = GetUserWorkspace(workspace);
    wsScore_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(user + t_->wsScoreOffset));
    wsProb_.SetGlobalBuffer(reinterpret_cast<__gm__ QT*>(user + t_->wsProbOffset));
    wsOut_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(user + t_->wsOutOffset));
    wsPartial_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(user + t_->wsPartialOffset));
    core_ = ASCEND_IS_AIC ? static_cast<uint32_t>(GetBlockIdx())
                          : static_cast<uint32_t>(GetBlockIdx() / GetTaskRation());
    sub_ = ASCEND_IS_AIV ? static_cast<uint32_t>(GetSubBlockIdx()) : 0u;
    d_ = t_->dNope + t_->dRope;
  }

  __aicore__ inline void Process() {
    if ASCEND_IS_AIC {
      RunCube();
      return;
    }
    if ASCEND_IS_AIV {
      RunVector();
      PipeBarrier<PIPE_ALL>();
      if (t_->chunksPerToken > 1) {
        SyncAll<true>();  // partial (O, max, sum) of split groups are in the workspace
        if (hasOwnedSplit_) CombineSplitGroup();
      }
    }
  }

 private:
  // ---------------------------------------------------------------------- tokens and keys
  __aicore__ inline TokenInfo Token(uint64_t token) const {
    const DsaProblem& p = t_->problem;
    TokenInfo ti{};
    if (p.layoutQuery == kLayoutTND) {
      uint64_t start = 0;
      for (uint32_t b = 0; b < p.batch; ++b) {
        const uint64_t end = static_cast<uint64_t>(qLensGm_.GetValue(b));
        if (token < end) { ti.seq = b; ti.row = static_cast<uint32_t>(token - start); ti.qLen = static_cast<uint32_t>(end - start); break; }
        start = end;
      }
    } else {
      ti.seq = static_cast<uint32_t>(token / p.querySeq);
      ti.row = static_cast<uint32_t>(token % p.querySeq);
      ti.qLen = p.hasQueryLens ? static_cast<uint32_t>(qLensGm_.GetValue(ti.seq)) : p.querySeq;
    }
    if (p.layoutKey == kLayoutTND) {
      const int32_t end = kvLensGm_.GetValue(ti.seq), start = ti.seq == 0 ? 0 : kvLensGm_.GetValue(ti.seq - 1);
      ti.kvLen = static_cast<uint32_t>(end - start);
    } else {
      ti.kvLen = p.hasKeyLens ? static_cast<uint32_t>(kvLensGm_.GetValue(ti.seq)) : p.keySeq;
    }
    if (ti.row >= ti.qLen) {
      ti.limit = 0;  // a BSND row past the sequence's queries: nothing to attend to
    } else if (t_->sparseMode == 3) {
      const int64_t v = static_cast<int64_t>(ti.kvLen) - ti.qLen + 1 + ti.row;
      ti.limit = v < 0 ? 0 : (v > ti.kvLen ? ti.kvLen : static_cast<uint32_t>(v));
    } else {
      ti.limit = ti.kvLen;
    }
    return ti;
  }

  __aicore__ inline uint64_t KeyRow(uint32_t seq, uint32_t pos) const {
    const DsaProblem& p = t_->problem;
    if (p.layoutKey == kLayoutPABSND) {
      const int32_t block = tableGm_.GetValue(static_cast<uint64_t>(seq) * p.maxBlocks + pos / p.blockSize);
      return static_cast<uint64_t>(block) * p.blockSize + pos % p.blockSize;
    }
    if (p.layoutKey == kLayoutTND) return (seq == 0 ? 0 : static_cast<uint64_t>(kvLensGm_.GetValue(seq - 1))) + pos;
    return static_cast<uint64_t>(seq) * p.keySeq + pos;
  }

  // Entries [0, valid) of the token's list are used: up to the first -1 (padding after it,
  // whatever it holds). Positions past the causal limit are masked entry by entry.
  __aicore__ inline uint32_t ValidPrefix(uint64_t token) const {
    const uint64_t base = token * t_->sparseCount;
    uint32_t j = 0;
    while (j < t_->sparseCount && indicesGm_.GetValue(base + j) >= 0) ++j;
    return j;
  }

  __aicore__ inline bool Used(const TokenInfo& ti, uint32_t valid, uint64_t token, uint32_t j, int32_t& pos) const {
    if (j >= valid) return false;
    pos = indicesGm_.GetValue(token * t_->sparseCount + j);
    return static_cast<uint32_t>(pos) < ti.limit;
  }

  // ------------------------------------------------------------------------------ AIC
  __aicore__ inline void RunCube() {
    if (core_ >= t_->split.usedCores) return;
    constexpr uint32_t c0 = 32 / sizeof(QT);
    const uint32_t gA = t_->gAligned, kvA = AlignUp(t_->kvTile, kCubeRows);
    pipe_.InitBuffer(qL1_, 1, gA * d_ * sizeof(QT));
    pipe_.InitBuffer(kvL1_, 2, kvA * d_ * sizeof(QT));
    pipe_.InitBuffer(pL1_, 1, gA * kvA * sizeof(QT));
    const uint32_t aElems = gA * (t_->baseK > kvA ? t_->baseK : kvA);
    pipe_.InitBuffer(aL0_, 2, aElems * sizeof(QT));
    pipe_.InitBuffer(bL0_, 2, kvA * (t_->baseK > t_->dvChunk ? t_->baseK : t_->dvChunk) * sizeof(QT));
    pipe_.InitBuffer(cL0_, 2, gA * (kvA > t_->dvChunk ? kvA : t_->dvChunk) * sizeof(float));
    (void)c0;
    for (uint64_t n = t_->split.coreStart[core_]; n < t_->split.coreStart[core_ + 1]; ++n) {
      MlaUnit u;
      MlaUnitAt(*t_, n, u);
      CubeUnit(u);
    }
  }

  __aicore__ inline void CubeUnit(const MlaUnit& u) {
    constexpr uint32_t c0 = 32 / sizeof(QT);
    const uint32_t g = u.headEnd - u.headStart, gA = t_->gAligned, dn = t_->dNope, dr = t_->dRope;
    const TokenInfo ti = Token(u.token);
    const uint32_t valid = ValidPrefix(u.token);
    // Q [g, D] of the token's heads -> L1 NZ: the nope part in column blocks [0, dn / c0),
    // the rope part after it.
    LocalTensor<QT> q1 = qL1_.AllocTensor<QT>();
    const uint64_t qRow = u.token * t_->heads + u.headStart;
    const Nd2NzParams ndq = RowsToNz(g, dn, dn, gA);
    DataCopy(q1, queryGm_[qRow * dn], ndq);
    if (dr > 0) {
      const Nd2NzParams ndr = RowsToNz(g, dr, dr, gA);
      DataCopy(q1[(dn / c0) * gA * c0], queryRopeGm_[qRow * dr], ndr);
    }
    qL1_.EnQue(q1);
    q1 = qL1_.DeQue<QT>();
    for (uint32_t j0 = u.kvStart; j0 < u.kvEnd; j0 += t_->kvTile) {
      const uint32_t kv = Min(t_->kvTile, u.kvEnd - j0), kvA = AlignUp(kv, kCubeRows);
      LocalTensor<QT> k1 = kvL1_.AllocTensor<QT>();
      GatherRows(k1, ti, valid, u.token, j0, kv, kvA);
      kvL1_.EnQue(k1);
      k1 = kvL1_.DeQue<QT>();
      ScoreTile(q1, k1, g, kvA);
      CrossCoreSetFlag<2, PIPE_FIX>(kFlagScoreFull);
      CrossCoreWaitFlag(kFlagProbFull);
      ValueTile(k1, g, kvA);
      CrossCoreSetFlag<2, PIPE_FIX>(kFlagOutFull);
      kvL1_.FreeTensor(k1);
    }
    qL1_.FreeTensor(q1);
  }

  // Selected rows -> L1 NZ [kvA, D]; unused slots (padding, past the limit, the tile's tail)
  // are zeroed so that their zero probabilities never meet a NaN.
  __aicore__ inline void GatherRows(const LocalTensor<QT>& k1, const TokenInfo& ti, uint32_t valid, uint64_t token,
                                    uint32_t j0, uint32_t kv, uint32_t kvA) {
    constexpr uint32_t c0 = 32 / sizeof(QT);
    const uint32_t dn = t_->dNope, dr = t_->dRope;
    bool zeroed = false;
    for (uint32_t j = 0; j < kvA; ++j) {
      int32_t pos = 0;
      if (j < kv && Used(ti, valid, token, j0 + j, pos)) continue;
      if (!zeroed) {
        InitConstValueParams<QT> zero;
        zero.repeatTimes = 1;
        zero.blockNum = static_cast<uint16_t>(kvA * d_ / c0);
        zero.dstGap = 0;
        zero.initValue = static_cast<QT>(0);
        InitConstValue(k1, zero);  // in order with the row DMAs below (both on MTE2)
        zeroed = true;
      }
    }
    for (uint32_t j = 0; j < kv; ++j) {
      int32_t pos = 0;
      if (!Used(ti, valid, token, j0 + j, pos)) continue;
      const uint64_t row = KeyRow(ti.seq, static_cast<uint32_t>(pos));
      if (t_->keyCombined) {  // [latent | rope] in one cache row
        const Nd2NzParams nd = RowsToNz(1, d_, d_, kvA);
        DataCopy(k1[j * c0], keyGm_[row * t_->keyRowElems], nd);
      } else {
        const Nd2NzParams nd = RowsToNz(1, dn, dn, kvA);
        DataCopy(k1[j * c0], keyGm_[row * t_->keyRowElems], nd);
        if (dr > 0) {
          const Nd2NzParams ndr = RowsToNz(1, dr, dr, kvA);
          DataCopy(k1[((dn / c0) * kvA + j) * c0], keyRopeGm_[row * dr], ndr);
        }
      }
    }
  }

  // S [g, kv] = Q . K^T accumulated over D in baseK slices, then Fixpipe to the score slot.
  __aicore__ inline void ScoreTile(const LocalTensor<QT>& q1, const LocalTensor<QT>& k1, uint32_t g, uint32_t kvA) {
    constexpr uint32_t c0 = 32 / sizeof(QT), frac = kCubeRows * c0;
    const uint32_t gA = t_->gAligned;
    LocalTensor<float> c = cL0_.AllocTensor<float>();
    for (uint32_t k0 = 0; k0 < d_; k0 += t_->baseK) {
      const uint32_t bk = Min(t_->baseK, d_ - k0);
      LocalTensor<QT> a = aL0_.AllocTensor<QT>();
      LoadData2DParams la;
      la.repeatTimes = static_cast<uint8_t>(bk / c0);
      la.srcStride = static_cast<uint16_t>(gA / kCubeRows);
      la.ifTranspose = false;
      for (uint32_t mi = 0; mi < gA / kCubeRows; ++mi)
        LoadData(a[mi * (bk / c0) * frac], q1[((k0 / c0) * gA + mi * kCubeRows) * c0], la);
      LocalTensor<QT> b = bL0_.AllocTensor<QT>();
      LoadData2DParams lb;
      lb.repeatTimes = static_cast<uint8_t>(kvA / kCubeRows);
      lb.srcStride = 1;
      lb.ifTranspose = false;
      for (uint32_t dk = 0; dk < bk / c0; ++dk)
        LoadData(b[dk * (kvA / kCubeRows) * frac], k1[((k0 / c0 + dk) * kvA) * c0], lb);
      aL0_.EnQue(a);
      bL0_.EnQue(b);
      a = aL0_.DeQue<QT>();
      b = bL0_.DeQue<QT>();
      MmadTile(c, a, b, gA, kvA, bk, k0 == 0);  // the first slice starts the sum
      aL0_.FreeTensor(a);
      bL0_.FreeTensor(b);
    }
    FixpipeRowsOut(wsScore_[core_ * (t_->wsScoreCoreBytes / sizeof(float))], cL0_, c, g, kvA, gA, t_->kvTile);
  }

  // O [g, Dv] = P . V with P [g, kv] from the AIVs and V = the gathered rows' first Dv channels.
  __aicore__ inline void ValueTile(const LocalTensor<QT>& k1, uint32_t g, uint32_t kvA) {
    constexpr uint32_t c0 = 32 / sizeof(QT), frac = kCubeRows * c0;
    const uint32_t gA = t_->gAligned;
    LocalTensor<QT> p1 = pL1_.AllocTensor<QT>();
    const Nd2NzParams nd = RowsToNz(g, kvA, t_->kvTile, gA);
    DataCopy(p1, wsProb_[core_ * (t_->wsProbCoreBytes / sizeof(QT))], nd);
    pL1_.EnQue(p1);
    p1 = pL1_.DeQue<QT>();
    LocalTensor<QT> a = aL0_.AllocTensor<QT>();
    LoadData2DParams la;
    la.repeatTimes = static_cast<uint8_t>(kvA / c0);
    la.srcStride = static_cast<uint16_t>(gA / kCubeRows);
    la.ifTranspose = false;
    for (uint32_t mi = 0; mi < gA / kCubeRows; ++mi)
      LoadData(a[mi * (kvA / c0) * frac], p1[mi * kCubeRows * c0], la);
    aL0_.EnQue(a);
    a = aL0_.DeQue<QT>();
    GlobalTensor<float> out = wsOut_[core_ * (t_->wsOutCoreBytes / sizeof(float))];
    for (uint32_t v0 = 0; v0 < t_->dNope; v0 += t_->dvChunk) {
      const uint32_t dv = Min(t_->dvChunk, t_->dNope - v0);
      // V = K[:, v0 : v0 + dv] as the B operand [kv, dv]: transposed fractal loads
      LocalTensor<QT> b = bL0_.AllocTensor<QT>();
      LoadData2DParams lb;
      lb.repeatTimes = static_cast<uint8_t>(dv / kCubeRows);
      lb.srcStride = static_cast<uint16_t>(kvA / kCubeRows);
      lb.ifTranspose = true;
      for (uint32_t ki = 0; ki < kvA / kCubeRows; ++ki)
        LoadData(b[ki * (dv / kCubeRows) * frac], k1[((v0 / c0) * kvA + ki * kCubeRows) * c0], lb);
      bL0_.EnQue(b);
      b = bL0_.DeQue<QT>();
      LocalTensor<float> c = cL0_.AllocTensor<float>();
      MmadTile(c, a, b, gA, dv, kvA, true);
      bL0_.FreeTensor(b);
      FixpipeRowsOut(out[v0], cL0_, c, g, dv, gA, t_->dNope);
    }
    aL0_.FreeTensor(a);
    pL1_.FreeTensor(p1);
  }

  // ------------------------------------------------------------------------------ AIV
  __aicore__ inline void RunVector() {
    const uint32_t rows = t_->rowsPerVec, kv = t_->kvTile;
    pipe_.InitBuffer(scoreBuf_, t_->ubScoreBuf);    // S rows, then P; second half: scratch
    pipe_.InitBuffer(accBuf_, t_->ubOutAcc);        // O accumulator rows x Dv, + a dvChunk tile
    pipe_.InitBuffer(statBuf_, t_->ubStats);        // max, sum, alpha, scratch per row
    pipe_.InitBuffer(indexBuf_, t_->ubIndexBuf);    // the tile's additive mask (0 / -big)
    (void)rows;
    (void)kv;
    if (core_ >= t_->split.usedCores) return;
    const uint64_t begin = t_->split.coreStart[core_], end = t_->split.coreStart[core_ + 1];
    for (uint64_t n = begin; n < end; ++n) {
      MlaUnit u;
      MlaUnitAt(*t_, n, u);
      const bool firstChunk = n == begin || u.chunk == 0;
      const bool lastChunk = n + 1 == end || u.chunk + 1 == t_->chunksPerToken;
      VectorUnit(u, firstChunk, lastChunk, n == begin && u.chunk != 0,
                 n + 1 == end && u.chunk + 1 != t_->chunksPerToken);
    }
  }

  __aicore__ inline void MyRows(const MlaUnit& u, uint32_t& r0, uint32_t& r1) const {
    const uint32_t g = u.headEnd - u.headStart;
    r0 = Min(sub_ * t_->rowsPerVec, g);
    r1 = Min(r0 + t_->rowsPerVec, g);
  }

  __aicore__ inline void VectorUnit(const MlaUnit& u, bool firstChunk, bool lastChunk, bool startedBefore,
                                    bool endsAfter) {
    uint32_t r0, r1;
    MyRows(u, r0, r1);
    const uint32_t rows = r1 - r0, kvTile = t_->kvTile, dvAll = t_->dNope;
    LocalTensor<float> acc = accBuf_.Get<float>();
    LocalTensor<float> oTile = acc[AlignUp(t_->rowsPerVec * dvAll, 8)];
    LocalTensor<float> mRun = statBuf_.Get<float>();
    const uint32_t statStride = AlignUp(t_->rowsPerVec, 8);
    LocalTensor<float> lRun = mRun[statStride], alpha = mRun[2 * statStride], tmp = mRun[3 * statStride];
    if (firstChunk) {
      groupStartedBefore_ = startedBefore;  // remembered until the group's last chunk here
      if (rows > 0) Duplicate(acc, 0.0f, static_cast<int32_t>(rows * dvAll));
      Duplicate(mRun, kMaskScore, static_cast<int32_t>(statStride));
      Duplicate(lRun, 0.0f, static_cast<int32_t>(statStride));
      PipeSync<HardEvent::V_S>();
    }
    const TokenInfo ti = Token(u.token);
    const uint32_t valid = ValidPrefix(u.token);
    LocalTensor<float> s = scoreBuf_.Get<float>();
    LocalTensor<float> work = s[AlignUp(t_->rowsPerVec * kvTile, 8)];
    LocalTensor<float> bias = indexBuf_.Get<float>();
    LocalTensor<float> red = bias[AlignUp(kvTile, 8)];  // aligned destination of the reductions
    for (uint32_t j0 = u.kvStart; j0 < u.kvEnd; j0 += kvTile) {
      const uint32_t kv = Min(kvTile, u.kvEnd - j0);
      // additive mask of the tile: 0 for used entries, far below everything otherwise
      for (uint32_t j = 0; j < kvTile; ++j) {
        int32_t pos = 0;
        bias.SetValue(j, j < kv && Used(ti, valid, u.token, j0 + j, pos) ? 0.0f : kMaskScore);
      }
      CrossCoreWaitFlag(kFlagScoreFull);
      if (rows > 0) {
        DataCopyExtParams cp{static_cast<uint16_t>(rows), static_cast<uint32_t>(kvTile * 4), 0, 0, 0};
        DataCopyPadExtParams<float> pad{false, 0, 0, 0.0f};
        DataCopyPad(s, wsScore_[core_ * (t_->wsScoreCoreBytes / sizeof(float)) + r0 * kvTile], cp, pad);
        PipeSync<HardEvent::MTE2_V>();
        PipeSync<HardEvent::S_V>();
        Muls(s, s, t_->scaleValue, static_cast<int32_t>(rows * kvTile));
        for (uint32_t r = 0; r < rows; ++r) {
          LocalTensor<float> line = s[r * kvTile];
          Add(line, line, bias, static_cast<int32_t>(kvTile));
          ReduceMax(red, line, work, static_cast<int32_t>(kvTile), false);
          PipeSync<HardEvent::V_S>();
          tmp.SetValue(r, red.GetValue(0));
        }
        // running max, the rescale of what came before, probabilities and their sum
        PipeSync<HardEvent::V_S>();
        for (uint32_t r = 0; r < rows; ++r) {
          const float mOld = mRun.GetValue(r), tileMax = tmp.GetValue(r);
          const float mNew = mOld > tileMax ? mOld : tileMax;
          // nothing used so far: shift by 0 so masked entries give exp(-big) = 0, not 1
          const float shift = mNew < kMaskLimit ? 0.0f : mNew;
          mRun.SetValue(r, mNew);
          tmp.SetValue(r, mOld < kMaskLimit ? 0.0f : mOld - shift);  // log of the rescale
          LocalTensor<float> line = s[r * kvTile];
          PipeSync<HardEvent::S_V>();
          Adds(line, line, -shift, static_cast<int32_t>(kvTile));
          Exp(line, line, static_cast<int32_t>(kvTile));
        }
        Exp(alpha, tmp, static_cast<int32_t>(rows));
        for (uint32_t r = 0; r < rows; ++r) {
          ReduceSum(red, s[r * kvTile], work, static_cast<int32_t>(kvTile));
          PipeSync<HardEvent::V_S>();
          tmp.SetValue(r, red.GetValue(0));
        }
        PipeSync<HardEvent::S_V>();
        Mul(lRun, lRun, alpha, static_cast<int32_t>(rows));
        Add(lRun, lRun, tmp, static_cast<int32_t>(rows));
        // P in the query dtype for the cube
        LocalTensor<QT> p = work.template ReinterpretCast<QT>();
        Cast(p, s, RoundMode::CAST_RINT, rows * kvTile);
        PipeSync<HardEvent::V_MTE3>();
        DataCopyExtParams cpo{static_cast<uint16_t>(rows), static_cast<uint32_t>(kvTile * sizeof(QT)), 0, 0, 0};
        DataCopyPad(wsProb_[core_ * (t_->wsProbCoreBytes / sizeof(QT)) + r0 * kvTile], p, cpo);
      }
      CrossCoreSetFlag<2, PIPE_MTE3>(kFlagProbFull);
      CrossCoreWaitFlag(kFlagOutFull);
      if (rows > 0) AccumulateTile(r0, rows, alpha, acc, oTile);
    }
    if (!lastChunk) return;
    if (groupStartedBefore_ || endsAfter) {
      if (rows > 0) WritePartial(groupStartedBefore_ ? 0 : 1, r0, rows, acc, mRun, lRun);
      if (!groupStartedBefore_) {
        ownedSplit_ = u;
        hasOwnedSplit_ = true;
      }
      return;
    }
    if (rows > 0) WriteOutput(u, r0, rows, acc, mRun, lRun);
  }

  // acc = acc * alpha (per row) + the P.V tile, Dv in dvChunk pieces.
  __aicore__ inline void AccumulateTile(uint32_t r0, uint32_t rows, const LocalTensor<float>& alpha,
                                        const LocalTensor<float>& acc, const LocalTensor<float>& oTile) {
    const uint32_t dvAll = t_->dNope, dvc = t_->dvChunk;
    PipeSync<HardEvent::V_S>();
    for (uint32_t r = 0; r < rows; ++r) {
      const float a = alpha.GetValue(r);
      PipeSync<HardEvent::S_V>();
      Muls(acc[r * dvAll], acc[r * dvAll], a, static_cast<int32_t>(dvAll));
    }
    for (uint32_t v0 = 0; v0 < dvAll; v0 += dvc) {
      DataCopyExtParams cp{static_cast<uint16_t>(rows), static_cast<uint32_t>(dvc * 4),
                           static_cast<uint32_t>((dvAll - dvc) * 4), 0, 0};
      DataCopyPadExtParams<float> pad{false, 0, 0, 0.0f};
      PipeSync<HardEvent::V_MTE2>();
      DataCopyPad(oTile, wsOut_[core_ * (t_->wsOutCoreBytes / sizeof(float)) + r0 * dvAll + v0], cp, pad);
      PipeSync<HardEvent::MTE2_V>();
      for (uint32_t r = 0; r < rows; ++r)
        Add(acc[r * dvAll + v0], acc[r * dvAll + v0], oTile[r * dvc], static_cast<int32_t>(dvc));
    }
  }

  __aicore__ inline void WriteOutput(const MlaUnit& u, uint32_t r0, uint32_t rows, const LocalTensor<float>& acc,
                                     const LocalTensor<float>& mRun, const LocalTensor<float>& lRun) {
    const uint32_t dvAll = t_->dNope;
    LocalTensor<QT> outRow = scoreBuf_.Get<QT>();
    PipeSync<HardEvent::V_S>();
    for (uint32_t r = 0; r < rows; ++r) {
      const float l = lRun.GetValue(r);
      PipeSync<HardEvent::S_V>();
      Muls(acc[r * dvAll], acc[r * dvAll], l > 0.0f ? 1.0f / l : 0.0f, static_cast<int32_t>(dvAll));
      Cast(outRow[r * dvAll], acc[r * dvAll], RoundMode::CAST_RINT, dvAll);
    }
    PipeSync<HardEvent::V_MTE3>();
    const uint64_t head0 = u.token * t_->heads + u.headStart + r0;
    DataCopyExtParams cp{static_cast<uint16_t>(rows), static_cast<uint32_t>(dvAll * sizeof(QT)), 0, 0, 0};
    DataCopyPad(outGm_[head0 * dvAll], outRow, cp);
    if (t_->returnLse) {
      // softmax_max: -inf for a row that saw nothing (its sum is 0)
      for (uint32_t r = 0; r < rows; ++r)
        if (mRun.GetValue(r) < kMaskLimit) mRun.template ReinterpretCast<uint32_t>().SetValue(r, kNegInfBits);
      PipeSync<HardEvent::S_MTE3>();
      DataCopyExtParams cs{1, static_cast<uint32_t>(rows * 4), 0, 0, 0};
      DataCopyPad(maxGm_[head0], mRun, cs);
      DataCopyPad(sumGm_[head0], lRun, cs);
    }
    PipeSync<HardEvent::MTE3_V>();
  }

  __aicore__ inline uint64_t PartialSlot(uint32_t core, uint32_t which) const {
    return (core * t_->wsPartialCoreBytes + which * (t_->wsPartialCoreBytes / 2)) / sizeof(float);
  }

  // Partial layout per slot: O [gTile, Dv], then max [gTile], then sum [gTile] (float32).
  __aicore__ inline void WritePartial(uint32_t which, uint32_t r0, uint32_t rows, const LocalTensor<float>& acc,
                                      const LocalTensor<float>& mRun, const LocalTensor<float>& lRun) {
    const uint32_t dvAll = t_->dNope, g = t_->gTile;
    const uint64_t at = PartialSlot(core_, which);
    PipeSync<HardEvent::V_MTE3>();
    DataCopyExtParams co{1, static_cast<uint32_t>(rows * dvAll * 4), 0, 0, 0};
    DataCopyPad(wsPartial_[at + r0 * dvAll], acc, co);
    DataCopyExtParams cs{1, static_cast<uint32_t>(rows * 4), 0, 0, 0};
    DataCopyPad(wsPartial_[at + g * dvAll + r0], mRun, cs);
    DataCopyPad(wsPartial_[at + g * dvAll + g + r0], lRun, cs);
  }

  // After SyncAll: (O, m, l) of the following cores' head slots join this core's tail slot:
  // m = max(m1, m2), w_i = exp(m_i - m), O = w1 O1 + w2 O2, l = w1 l1 + w2 l2.
  __aicore__ inline void CombineSplitGroup() {
    const MlaUnit& u = ownedSplit_;
    uint32_t r0, r1;
    MyRows(u, r0, r1);
    const uint32_t rows = r1 - r0, dvAll = t_->dNope, dvc = t_->dvChunk, g = t_->gTile;
    if (rows == 0) return;
    LocalTensor<float> acc = accBuf_.Get<float>();
    LocalTensor<float> oTile = acc[AlignUp(t_->rowsPerVec * dvAll, 8)];
    LocalTensor<float> mRun = statBuf_.Get<float>();
    const uint32_t statStride = AlignUp(t_->rowsPerVec, 8);
    LocalTensor<float> lRun = mRun[statStride], w1 = mRun[2 * statStride], w2 = mRun[3 * statStride];
    LocalTensor<float> mOther = indexBuf_.Get<float>(), lOther = mOther[statStride];
    uint64_t at = PartialSlot(core_, 1);
    DataCopyPadExtParams<float> pad{false, 0, 0, 0.0f};
    DataCopyExtParams co{1, static_cast<uint32_t>(rows * dvAll * 4), 0, 0, 0};
    DataCopyExtParams cs{1, static_cast<uint32_t>(rows * 4), 0, 0, 0};
    DataCopyPad(acc, wsPartial_[at + r0 * dvAll], co, pad);
    DataCopyPad(mRun, wsPartial_[at + g * dvAll + r0], cs, pad);
    DataCopyPad(lRun, wsPartial_[at + g * dvAll + g + r0], cs, pad);
    for (uint32_t c = core_ + 1; c < t_->split.usedCores; ++c) {
      MlaUnit first;
      MlaUnitAt(*t_, t_->split.coreStart[c], first);
      if (first.chunk == 0 || first.token != u.token || first.headStart != u.headStart) break;
      at = PartialSlot(c, 0);
      DataCopyPad(mOther, wsPartial_[at + g * dvAll + r0], cs, pad);
      DataCopyPad(lOther, wsPartial_[at + g * dvAll + g + r0], cs, pad);
      PipeSync<HardEvent::MTE2_S>();
      for (uint32_t r = 0; r < rows; ++r) {
        const float m1 = mRun.GetValue(r), m2 = mOther.GetValue(r);
        const float m = m1 > m2 ? m1 : m2;
        w1.SetValue(r, m1 < kMaskLimit ? kMaskScore : m1 - m);  // exp(-big) = 0 for an empty side
        w2.SetValue(r, m2 < kMaskLimit ? kMaskScore : m2 - m);
        mRun.SetValue(r, m);
      }
      PipeSync<HardEvent::S_V>();
      Exp(w1, w1, static_cast<int32_t>(rows));
      Exp(w2, w2, static_cast<int32_t>(rows));
      Mul(lRun, lRun, w1, static_cast<int32_t>(rows));
      Mul(lOther, lOther, w2, static_cast<int32_t>(rows));
      Add(lRun, lRun, lOther, static_cast<int32_t>(rows));
      PipeSync<HardEvent::V_S>();
      for (uint32_t v0 = 0; v0 < dvAll; v0 += dvc) {
        DataCopyExtParams cp{static_cast<uint16_t>(rows), static_cast<uint32_t>(dvc * 4),
                             static_cast<uint32_t>((dvAll - dvc) * 4), 0, 0};
        PipeSync<HardEvent::V_MTE2>();
        DataCopyPad(oTile, wsPartial_[at + r0 * dvAll + v0], cp, pad);
        PipeSync<HardEvent::MTE2_V>();
        for (uint32_t r = 0; r < rows; ++r) {
          const float a1 = w1.GetValue(r), a2 = w2.GetValue(r);
          PipeSync<HardEvent::S_V>();
          Muls(acc[r * dvAll + v0], acc[r * dvAll + v0], a1, static_cast<int32_t>(dvc));
          Axpy(acc[r * dvAll + v0], oTile[r * dvc], a2, static_cast<int32_t>(dvc));
        }
      }
    }
    WriteOutput(u, r0, rows, acc, mRun, lRun);
  }

  const SparseMlaTilingData* t_ = nullptr;
  GlobalTensor<QT> queryGm_, keyGm_, queryRopeGm_, keyRopeGm_, outGm_, wsProb_;
  GlobalTensor<int32_t> indicesGm_, tableGm_, qLensGm_, kvLensGm_;
  GlobalTensor<float> maxGm_, sumGm_, wsScore_, wsOut_, wsPartial_;
  uint32_t core_ = 0, sub_ = 0, d_ = 0;

  TPipe pipe_;
  TQue<QuePosition::A1, 1> qL1_, pL1_;
  TQue<QuePosition::B1, 2> kvL1_;
  TQue<QuePosition::A2, 2> aL0_;
  TQue<QuePosition::B2, 2> bL0_;
  TQue<QuePosition::CO1, 2> cL0_;
  TBuf<QuePosition::VECCALC> scoreBuf_, accBuf_, statBuf_, indexBuf_;
  MlaUnit ownedSplit_{};
  bool hasOwnedSplit_ = false, groupStartedBefore_ = false;
};

}  // namespace dsa_sfa

// Tiling key: 0 bf16, 1 fp16 (query, key, value, ropes and output share the dtype).
extern "C" __global__ __aicore__ void dsa_sparse_flash_attention(
    GM_ADDR query, GM_ADDR key, GM_ADDR value, GM_ADDR sparse_indices, GM_ADDR block_table,
    GM_ADDR actual_seq_lengths_query, GM_ADDR actual_seq_lengths_kv, GM_ADDR query_rope, GM_ADDR key_rope,
    GM_ADDR attention_out, GM_ADDR softmax_max, GM_ADDR softmax_sum, GM_ADDR workspace, GM_ADDR tiling) {
  KERNEL_TASK_TYPE_DEFAULT(KERNEL_TYPE_MIX_AIC_1_2);
  REGISTER_TILING_DEFAULT(dsa_tiling::SparseMlaTilingData);
  GET_TILING_DATA_WITH_STRUCT(dsa_tiling::SparseMlaTilingData, tilingData, tiling);
  (void)value;  // attention_mode 2: the value is the key's latent part, read through `key`
  if (TILING_KEY_IS(0)) {
    dsa_sfa::SparseFlashAttention<bfloat16_t> op;
    op.Init(query, key, sparse_indices, block_table, actual_seq_lengths_query, actual_seq_lengths_kv, query_rope,
            key_rope, attention_out, softmax_max, softmax_sum, workspace, &tilingData);
    op.Process();
  } else if (TILING_KEY_IS(1)) {
    dsa_sfa::SparseFlashAttention<half> op;
    op.Init(query, key, sparse_indices, block_table, actual_seq_lengths_query, actual_seq_lengths_kv, query_rope,
            key_rope, attention_out, softmax_max, softmax_sum, workspace, &tilingData);
    op.Process();
  }
}
