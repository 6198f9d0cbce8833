// DsaLightningIndexer kernel (Atlas A2/A3, MIX 1 AIC : 2 AIV). Contract and layouts: see
// op_host/dsa_lightning_indexer.cpp. NOT RUN ON HARDWARE: type-checked against the open Ascend
// C headers only (ops/ascendc/tools/typecheck.sh).
//
// Work split (host tiling, lightning_indexer_tiling.h): units = (row tile of rowTile query rows
// of one sequence, chunk of key tiles), contiguous unit ranges per AI core.
//   AIC:  q tile [m = rows x N1, D] -> L1 (ND -> NZ) -> L0A once per unit; per key tile: the
//         keys (PA_BSND pages gathered block by block) -> L1 NZ -> L0B (baseN keys at a time),
//         Mmad -> L0C (fp32, or int32 for int8), Fixpipe -> workspace score slot (2 slots).
//   AIV0 / AIV1: keys [0, half) / [half, keyTile) of each tile: scores -> UB, (int8: cast),
//         ReLU, sum over heads weighted by weights (x query_dequant_scale), (int8: x the keys'
//         dequant scale), causal/length mask, Sort (32 per repeat) and MrgSort into a running
//         top-k list per row. A row tile ends with the two AIVs' lists merged (workspace +
//         mode-1 barrier); complete rows are written out, rows whose keys straddle cores leave
//         partial lists that the owning core merges after SyncAll.
// Handshakes (CrossCoreSetFlag/WaitFlag): mode 2 AIC -> AIVs "score slot full", AIVs -> AIC
// "score slot read"; mode 1 between the AIVs. SyncAll's flag ids (11-14) are left alone.
#define DSA_TILING_FN __aicore__ inline
#include "kernel_operator.h"
#include "dsa_tiling_data.h"
#include "dsa_kernel_common.h"

using namespace AscendC;
using namespace dsa_tiling;

namespace dsa_li {

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

constexpr uint16_t kFlagScoreFull = 0;   // AIC -> AIV pair, mode 2
constexpr uint16_t kFlagScoreFree = 1;   // AIV pair -> AIC, mode 2
constexpr uint16_t kFlagPairWritten = 2; // AIV <-> AIV, mode 1
constexpr uint16_t kFlagPairRead = 3;    // AIV <-> AIV, mode 1
constexpr uint32_t kSortRepeat = 32;                     // Sort orders 32 scores per repeat

// Where the sequences' query rows and keys live (the actual_seq_lengths / block_table inputs).
struct Sequences {
  const DsaProblem* p;
  GlobalTensor<int32_t> qLens, kLens, table;

  __aicore__ inline uint32_t QueryLen(uint32_t b) const {
    if (p->layoutQuery == kLayoutTND) {
      const int32_t end = qLens.GetValue(b), start = b == 0 ? 0 : qLens.GetValue(b - 1);
      return static_cast<uint32_t>(end - start);
    }
    return p->hasQueryLens ? static_cast<uint32_t>(qLens.GetValue(b)) : p->querySeq;
  }
  // Flat query row (index into the [rows, N1, D] view) of row r of sequence b.
  __aicore__ inline uint64_t QueryRow(uint32_t b, uint32_t r) const {
    if (p->layoutQuery == kLayoutTND) return (b == 0 ? 0 : static_cast<uint64_t>(qLens.GetValue(b - 1))) + r;
    return static_cast<uint64_t>(b) * p->querySeq + r;
  }
  __aicore__ inline uint32_t KeyLen(uint32_t b) const {
    if (p->layoutKey == kLayoutTND) {
      const int32_t end = kLens.GetValue(b), start = b == 0 ? 0 : kLens.GetValue(b - 1);
      return static_cast<uint32_t>(end - start);
    }
    return p->hasKeyLens ? static_cast<uint32_t>(kLens.GetValue(b)) : p->keySeq;
  }
  // Flat key row of position pos of sequence b, and how many positions from there on are
  // contiguous in memory (the rest of the PA block; everything for BSND / TND).
  __aicore__ inline uint64_t KeyRow(uint32_t b, uint32_t pos, uint32_t& run) const {
    if (p->layoutKey == kLayoutPABSND) {
      const uint32_t bs = p->blockSize;
      run = bs - pos % bs;
      const int32_t block = table.GetValue(static_cast<uint64_t>(b) * p->maxBlocks + pos / bs);
      return static_cast<uint64_t>(block) * bs + pos % bs;
    }
    run = 0xffffffffu;
    if (p->layoutKey == kLayoutTND) return (b == 0 ? 0 : static_cast<uint64_t>(kLens.GetValue(b - 1))) + pos;
    return static_cast<uint64_t>(b) * p->keySeq + pos;
  }
};

struct LensOf {  // adapter for WalkIndexerUnits
  const Sequences* s;
  __aicore__ inline void operator()(uint32_t b, uint32_t& q, uint32_t& kv) const {
    q = s->QueryLen(b);
    kv = s->KeyLen(b);
  }
};

// Collects the units [begin, end) of the linear order, with flags for row tiles cut by the range.
struct UnitRange {
  static constexpr uint32_t kMax = 32;  // units collected per pass of the walk (stack-sized)
  uint64_t begin, end;
  IndexerUnit* out;
  uint32_t count;
  __aicore__ inline bool operator()(const IndexerUnit& u, uint64_t n) {
    if (n < begin) return true;
    if (n >= end || count >= kMax) return false;
    out[count++] = u;
    return true;
  }
};

__aicore__ inline bool SameRowTile(const IndexerUnit& a, const IndexerUnit& b) {
  return a.seq == b.seq && a.rowStart == b.rowStart;
}

struct UnitAt {  // the unit with a given linear index
  uint64_t index;
  IndexerUnit unit;
  bool found;
  __aicore__ inline bool operator()(const IndexerUnit& u, uint64_t n) {
    if (n == index) { unit = u; found = true; return false; }
    return true;
  }
};

template <typename QT, typename WT, typename ST, typename ACC>
class LightningIndexer {
 public:
  __aicore__ inline void Init(GM_ADDR query, GM_ADDR key, GM_ADDR weights, GM_ADDR queryScale,
                              GM_ADDR keyScale, GM_ADDR qLens, GM_ADDR kLens, GM_ADDR table,
                              GM_ADDR indices, GM_ADDR values, GM_ADDR workspace,
                              const LightningIndexerTilingData* tiling) {
    t_ = tiling;
    seqs_.p = &t_->problem;
    if (qLens != nullptr) seqs_.qLens.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(qLens));
    if (kLens != nullptr) seqs_.kLens.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(kLens));
    if (table != nullptr) seqs_.table.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(table));
    queryGm_.SetGlobalBuffer(reinterpret_cast<__gm__ QT*>(query));
    keyGm_.SetGlobalBuffer(reinterpret_cast<__gm__ QT*>(key));
    weightsGm_.SetGlobalBuffer(reinterpret_cast<__gm__ WT*>(weights));
    if (queryScale != nullptr) queryScaleGm_.SetGlobalBuffer(reinterpret_cast<__gm__ ST*>(queryScale));
    if (keyScale != nullptr) keyScaleGm_.SetGlobalBuffer(reinterpret_cast<__gm__ ST*>(keyScale));
    indicesGm_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(indices));
    valuesGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(values));
    valueBitsGm_.SetGlobalBuffer(reinterpret_cast<__gm__ uint32_t*>(values));
    GM_ADDR user = GetUserWorkspace(workspace);
    wsScore_.SetGlobalBuffer(reinterpret_cast<__gm__ ACC*>(user + t_->wsScoreOffset));
    wsPair_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(user + t_->wsPairOffset));
    wsPartial_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(user + t_->wsPartialOffset));
    core_ = ASCEND_IS_AIC ? static_cast<uint32_t>(GetBlockIdx())
                          : static_cast<uint32_t>(GetBlockIdx() / GetTaskRation());
    sub_ = ASCEND_IS_AIV ? static_cast<uint32_t>(GetSubBlockIdx()) : 0u;
    listLen_ = t_->sparseCount + t_->halfKey;  // a running list plus one tile of candidates
  }

  __aicore__ inline void Process() {
    const bool working = core_ < t_->split.usedCores;
    if ASCEND_IS_AIC {
      if (working) RunCube();
      return;
    }
    if ASCEND_IS_AIV {
      InitVectorBuffers();
      if (working) RunVector();
      if (sub_ == 0) WritePaddingRows();
      PipeBarrier<PIPE_ALL>();
      SyncAll<true>();  // every AIV: partial lists are in the workspace
      if (working && sub_ == 0) MergeSplitRowTile();
    }
  }

 private:
  // ------------------------------------------------------------------ the walk over units
  template <class F>
  __aicore__ inline void Walk(F& f) {
    LensOf lens{&seqs_};
    WalkIndexerUnits(t_->problem.batch, t_->sparseMode, t_->rowTile, t_->keyTile, t_->chunkTiles,
                     lens, f);
  }
  __aicore__ inline bool UnitAtIndex(uint64_t n, IndexerUnit& u) {
    UnitAt f{n, {}, false};
    Walk(f);
    u = f.unit;
    return f.found;
  }
  // Calls Unit(u, firstOfRowTile, lastOfRowTile, startedBefore, endsAfter) for this core's units.
  template <class Body>
  __aicore__ inline void ForMyUnits(Body& body) {
    const uint64_t begin = t_->split.coreStart[core_], end = t_->split.coreStart[core_ + 1];
    IndexerUnit buf[UnitRange::kMax];
    IndexerUnit prev{}, next{};
    bool havePrev = begin > 0 && UnitAtIndex(begin - 1, prev);
    for (uint64_t at = begin; at < end;) {
      UnitRange r{at, end, buf, 0};
      Walk(r);
      for (uint32_t i = 0; i < r.count; ++i) {
        const IndexerUnit& u = buf[i];
        const uint64_t n = at + i;
        bool haveNext;
        if (i + 1 < r.count) {
          next = buf[i + 1];
          haveNext = true;
        } else {
          haveNext = UnitAtIndex(n + 1, next);
        }
        const bool first = !(havePrev && SameRowTile(prev, u));
        const bool last = !(haveNext && SameRowTile(next, u));
        const bool startedBefore = n == begin && !first;
        const bool endsAfter = n + 1 == end && !last;
        body(u, first, last, startedBefore, endsAfter);
        prev = u;
        havePrev = true;
      }
      at += r.count;
      if (r.count == 0) break;
    }
  }

  // ------------------------------------------------------------------------------ AIC
  struct CubeBody {
    LightningIndexer* k;
    __aicore__ inline void operator()(const IndexerUnit& u, bool first, bool, bool, bool) {
      k->CubeUnit(u, first);
    }
  };

  __aicore__ inline void RunCube() {
    const uint32_t d = t_->headDim;
    pipe_.InitBuffer(qL1_, 1, t_->mAligned * d * sizeof(QT));
    pipe_.InitBuffer(kL1_, 2, t_->keyTile * d * sizeof(QT));
    pipe_.InitBuffer(aL0_, 1, t_->mAligned * d * sizeof(QT));
    pipe_.InitBuffer(bL0_, 2, t_->baseN * d * sizeof(QT));
    pipe_.InitBuffer(cL0_, 2, t_->mAligned * t_->baseN * sizeof(ACC));
    tilesIssued_ = 0;
    CubeBody body{this};
    ForMyUnits(body);
    // Both AIVs acknowledge every tile: take the acknowledgements still owed so the flag
    // counters end balanced.
    for (uint32_t i = 0; i < Min(tilesIssued_, 2); ++i) CrossCoreWaitFlag(kFlagScoreFree);
    if (qLoaded_) aL0_.FreeTensor(qL0_);
  }

  __aicore__ inline void CubeUnit(const IndexerUnit& u, bool firstOfRowTile) {
    const uint32_t d = t_->headDim, m = (u.rowEnd - u.rowStart) * t_->heads;
    const uint32_t mA = AlignUp(m, kCubeRows);
    constexpr uint32_t c0 = 32 / sizeof(QT);          // elements per 32-byte column block
    constexpr uint32_t frac = kCubeRows * c0;         // elements per 512-byte fractal
    if (firstOfRowTile || !qLoaded_) {
      if (qLoaded_) aL0_.FreeTensor(qL0_);
      // q rows of the tile are consecutive: [rows, N1, D] -> an [m, D] matrix, ND -> NZ.
      LocalTensor<QT> q1 = qL1_.AllocTensor<QT>();
      const Nd2NzParams nd = RowsToNz(m, d, d, mA);
      DataCopy(q1, queryGm_[seqs_.QueryRow(u.seq, u.rowStart) * t_->heads * d], nd);
      qL1_.EnQue(q1);
      q1 = qL1_.DeQue<QT>();
      qL0_ = aL0_.AllocTensor<QT>();
      LoadData2DParams ld;
      ld.repeatTimes = static_cast<uint8_t>(d / c0);
      ld.srcStride = static_cast<uint16_t>(mA / kCubeRows);
      ld.ifTranspose = false;
      for (uint32_t mi = 0; mi < mA / kCubeRows; ++mi)  // L0A: row-major of fractals
        LoadData(qL0_[mi * (d / c0) * frac], q1[mi * frac], ld);
      qL1_.FreeTensor(q1);
      aL0_.EnQue(qL0_);
      qL0_ = aL0_.DeQue<QT>();
      qLoaded_ = true;
    }
    for (uint32_t k0 = u.keyStart; k0 < u.keyEnd; k0 += t_->keyTile) {
      const uint32_t n = Min(t_->keyTile, u.keyEnd - k0);
      const uint32_t nA = AlignUp(n, kCubeRows);
      // keys [k0, k0 + n) of the sequence -> L1 as an [nA, D] NZ matrix, run by run (pages)
      LocalTensor<QT> k1 = kL1_.AllocTensor<QT>();
      for (uint32_t j = 0; j < n;) {
        uint32_t run = 0;
        const uint64_t row = seqs_.KeyRow(u.seq, k0 + j, run);
        const uint32_t len = Min(run, n - j);
        const Nd2NzParams nd = RowsToNz(len, d, d, nA);
        DataCopy(k1[j * c0], keyGm_[row * d], nd);
        j += len;
      }
      kL1_.EnQue(k1);
      k1 = kL1_.DeQue<QT>();
      if (tilesIssued_ >= 2) CrossCoreWaitFlag(kFlagScoreFree);  // the slot is read
      const uint64_t slot = (tilesIssued_ % 2) * static_cast<uint64_t>(t_->mAligned) * t_->keyTile;
      GlobalTensor<ACC> out = wsScore_[core_ * (t_->wsScoreCoreBytes / sizeof(ACC)) + slot];
      for (uint32_t nb = 0; nb < nA; nb += t_->baseN) {
        const uint32_t bn = Min(t_->baseN, nA - nb);
        // K^T in L0B: the NZ [keys, D] fractals are already in L0B's order, per D block
        LocalTensor<QT> b0 = bL0_.AllocTensor<QT>();
        LoadData2DParams ld;
        ld.repeatTimes = static_cast<uint8_t>(bn / kCubeRows);
        ld.srcStride = 1;
        ld.ifTranspose = false;
        for (uint32_t dk = 0; dk < d / c0; ++dk)
          LoadData(b0[dk * (bn / kCubeRows) * frac], k1[(dk * nA + nb) * c0], ld);
        bL0_.EnQue(b0);
        b0 = bL0_.DeQue<QT>();
        LocalTensor<ACC> c = cL0_.AllocTensor<ACC>();
        MmadTile(c, qL0_, b0, mA, bn, d, true);
        bL0_.FreeTensor(b0);
        FixpipeRowsOut(out[nb], cL0_, c, m, bn, mA, t_->keyTile);  // row-major [m, keyTile] slot
      }
      kL1_.FreeTensor(k1);
      CrossCoreSetFlag<2, PIPE_FIX>(kFlagScoreFull);
      ++tilesIssued_;
    }
  }

  // ------------------------------------------------------------------------------ AIV
  __aicore__ inline void InitVectorBuffers() {
    const uint32_t half = t_->halfKey, rowsHeads = t_->rowTile * t_->heads;
    pipe_.InitBuffer(scoreQ_, 2, rowsHeads * half * sizeof(float));
    pipe_.InitBuffer(weightBuf_, t_->ubWeightBuf);
    pipe_.InitBuffer(accBuf_, t_->ubReduceBuf);
    pipe_.InitBuffer(stateBuf_, t_->ubTopkState);
    pipe_.InitBuffer(mergeBuf_, t_->ubMergeTmp);
    pipe_.InitBuffer(sortBuf_, t_->ubSortTmp);
    pipe_.InitBuffer(indexBuf_, t_->ubIndexBuf);
    pipe_.InitBuffer(scaleBuf_, t_->ubScaleBuf);
  }

  struct VectorBody {
    LightningIndexer* k;
    __aicore__ inline void operator()(const IndexerUnit& u, bool first, bool last, bool startedBefore,
                                      bool endsAfter) {
      k->VectorUnit(u, first, last, startedBefore, endsAfter);
    }
  };

  __aicore__ inline void RunVector() {
    VectorBody body{this};
    ForMyUnits(body);
  }

  __aicore__ inline LocalTensor<float> State(uint32_t r) {
    // listLen_ (score, index) pairs per row, rows 32-byte aligned
    return stateBuf_.Get<float>()[r * AlignUp(2 * listLen_, 8)];
  }

  __aicore__ inline void LoadWeights(const IndexerUnit& u) {
    // weights [rows, N1] (x query_dequant_scale for int8) as float32 in UB
    const uint32_t n = (u.rowEnd - u.rowStart) * t_->heads;
    const uint64_t at = seqs_.QueryRow(u.seq, u.rowStart) * t_->heads;
    LocalTensor<float> w = weightBuf_.Get<float>();
    LoadAsFloat(w, weightsGm_, at, n, mergeBuf_.Get<WT>());
    if (t_->quantized) {
      // (merge buffer >= 2 x sparseCount pairs >= 8 KiB: float scales at 1 KiB, staging at 2 KiB)
      LocalTensor<float> qs = mergeBuf_.Get<float>()[256];
      LoadAsFloat(qs, queryScaleGm_, at, n, mergeBuf_.Get<ST>()[2048 / sizeof(ST)]);
      PipeSync<HardEvent::MTE2_V>();
      Mul(w, w, qs, static_cast<int32_t>(n));
    }
    PipeSync<HardEvent::MTE2_S>();
    PipeSync<HardEvent::V_S>();
  }

  // n values of src from element `at` as float32 into dst (32-byte aligned); narrower types go
  // through `stage` (a separate aligned region) and a widening Cast.
  template <typename T>
  __aicore__ inline void LoadAsFloat(const LocalTensor<float>& dst, const GlobalTensor<T>& src, uint64_t at,
                                     uint32_t n, const LocalTensor<T>& stage) {
    DataCopyExtParams cp{1, static_cast<uint32_t>(n * sizeof(T)), 0, 0, 0};
    DataCopyPadExtParams<T> pad{false, 0, 0, 0};
    if constexpr (sizeof(T) == sizeof(float)) {
      DataCopyPad(dst.template ReinterpretCast<T>(), src[at], cp, pad);
    } else {
      DataCopyPad(stage, src[at], cp, pad);
      PipeSync<HardEvent::MTE2_V>();
      Cast(dst, stage, RoundMode::CAST_NONE, n);
    }
  }

  __aicore__ inline void VectorUnit(const IndexerUnit& u, bool firstOfRowTile, bool lastOfRowTile,
                                    bool startedBefore, bool endsAfter) {
    const uint32_t rows = u.rowEnd - u.rowStart, half = t_->halfKey, heads = t_->heads;
    const uint32_t qLen = seqs_.QueryLen(u.seq), kvLen = seqs_.KeyLen(u.seq);
    if (firstOfRowTile || startedBefore) {
      LoadWeights(u);
      for (uint32_t r = 0; r < rows; ++r) rowLen_[r] = 0;
      tileStartedBefore_ = startedBefore;  // remembered until the row tile's last unit here
    }
    LocalTensor<float> w = weightBuf_.Get<float>();
    LocalTensor<float> acc = accBuf_.Get<float>();
    LocalTensor<float> sorted = sortBuf_.Get<float>();
    LocalTensor<float> sortTmp = sorted[2 * half];
    LocalTensor<uint32_t> index = indexBuf_.Get<uint32_t>();
    LocalTensor<float> kScale = scaleBuf_.Get<float>();
    for (uint32_t k0 = u.keyStart; k0 < u.keyEnd; k0 += t_->keyTile) {
      const uint32_t myStart = k0 + sub_ * half;  // this AIV's first key position
      // scores of this AIV's half of the tile: rows x heads lines of `half` values
      CrossCoreWaitFlag(kFlagScoreFull);
      const uint64_t slot = (tilesSeen_ % 2) * static_cast<uint64_t>(t_->mAligned) * t_->keyTile;
      GlobalTensor<ACC> in = wsScore_[core_ * (t_->wsScoreCoreBytes / sizeof(ACC)) + slot + sub_ * half];
      LocalTensor<float> s = scoreQ_.AllocTensor<float>();
      DataCopyExtParams cp{static_cast<uint16_t>(rows * heads), static_cast<uint32_t>(half * sizeof(ACC)),
                           static_cast<uint32_t>((t_->keyTile - half) * sizeof(ACC)), 0, 0};
      DataCopyPadExtParams<ACC> pad{false, 0, 0, 0};
      DataCopyPad(s.template ReinterpretCast<ACC>(), in, cp, pad);
      scoreQ_.EnQue(s);
      s = scoreQ_.DeQue<float>();
      CrossCoreSetFlag<2, PIPE_MTE2>(kFlagScoreFree);  // the slot may be refilled
      ++tilesSeen_;
      if constexpr (Std::is_same<ACC, int32_t>::value) {  // exact int32 dot products -> float32
        Cast(s, s.template ReinterpretCast<int32_t>(), RoundMode::CAST_NONE, rows * heads * half);
      }
      // candidate positions (Sort's index operand) and, for int8, the keys' dequant scales
      CreateVecIndex(index.template ReinterpretCast<int32_t>(), static_cast<int32_t>(myStart), half);
      const uint32_t keysHere = myStart < u.keyEnd ? Min(half, u.keyEnd - myStart) : 0;
      if (t_->quantized) LoadKeyScales(u.seq, myStart, keysHere, kScale);
      for (uint32_t r = 0; r < rows; ++r) {
        Duplicate(acc, 0.0f, static_cast<int32_t>(half));
        for (uint32_t h = 0; h < heads; ++h) {
          LocalTensor<float> line = s[(r * heads + h) * half];
          Relu(line, line, static_cast<int32_t>(half));
          Axpy(acc, line, w.GetValue(r * heads + h), static_cast<int32_t>(half));
        }
        if (t_->quantized) Mul(acc, acc, kScale, static_cast<int32_t>(half));
        // keys past the unit, the sequence or the row's causal limit score below everything
        const uint64_t vis = IndexerVisible(t_->sparseMode, qLen, kvLen, u.rowStart + r);
        const uint64_t limit = vis < u.keyEnd ? vis : u.keyEnd;
        const uint32_t valid = limit > myStart ? Min(half, limit - myStart) : 0;
        if (valid < half) Duplicate(acc[valid], kMaskScore, static_cast<int32_t>(half - valid));
        Sort<float, true>(sorted, acc, index, sortTmp, static_cast<int32_t>(half / kSortRepeat));
        MergeIntoState(r, sorted, half);
      }
      scoreQ_.FreeTensor(s);
    }
    if (!lastOfRowTile && !endsAfter) return;  // the row tile continues with the next unit
    MergeAivPair(rows);
    if (sub_ != 0) return;
    if (tileStartedBefore_ || endsAfter) {
      // cut by this core's range: park the lists for the owner (head slot: started before)
      WriteLists(rows, PartialSlot(core_, tileStartedBefore_ ? 0 : 1));
      if (!tileStartedBefore_) {  // this core holds the row tile's first unit: it merges
        ownedSplit_ = u;
        hasOwnedSplit_ = true;
      }
      return;
    }
    WriteRows(u, rows, qLen, kvLen);
  }

  // The dequant scales of keys [start, start + count) of the sequence. Runs start at PA block
  // boundaries; op_host requires block sizes that are multiples of 16, and this AIV's first key
  // is a multiple of halfKey (>= 32), so every run lands 32-byte aligned in UB.
  __aicore__ inline void LoadKeyScales(uint32_t seq, uint32_t start, uint32_t count,
                                       const LocalTensor<float>& dst) {
    Duplicate(dst, 0.0f, static_cast<int32_t>(t_->halfKey));
    PipeSync<HardEvent::V_MTE2>();
    for (uint32_t j = 0; j < count;) {
      uint32_t run = 0;
      const uint64_t row = seqs_.KeyRow(seq, start + j, run);
      const uint32_t len = Min(run, count - j);
      LoadAsFloat(dst[j], keyScaleGm_, row, len, mergeBuf_.Get<ST>()[2048 / sizeof(ST)]);
      PipeSync<HardEvent::V_MTE2>();  // the staging area is reused by the next run
      j += len;
    }
    PipeSync<HardEvent::MTE2_V>();
    PipeSync<HardEvent::V_V>();
  }

  // state(r) <- top sparseCount of state(r) U sorted candidates (each a descending list).
  __aicore__ inline void MergeIntoState(uint32_t r, const LocalTensor<float>& sorted, uint32_t count) {
    LocalTensor<float> state = State(r);
    const uint32_t k = t_->sparseCount;
    const uint32_t have = rowLen_[r];
    uint32_t now;
    if (have == 0) {
      now = Min(count, k);
      DataCopy(state, sorted, AlignUp(2 * now, 8));
    } else {
      LocalTensor<float> merged = mergeBuf_.Get<float>();
      MrgSortSrcList<float> lists(state, sorted, state, state);
      // On equal scores MrgSort takes the earlier list first: the running list holds lower
      // positions (tiles ascend), so ties go to the lower position as the contract says.
      const uint16_t counts[4] = {static_cast<uint16_t>(have), static_cast<uint16_t>(count), 0, 0};
      uint32_t sortedNum[4];
      MrgSort<float>(merged, lists, counts, sortedNum, 0b11, 1);
      now = Min(have + count, k);
      PipeSync<HardEvent::V_V>();
      DataCopy(state, merged, AlignUp(2 * now, 8));
    }
    PipeSync<HardEvent::V_V>();
    rowLen_[r] = now;
  }

  // AIV1 hands its lists to AIV0 through the workspace; AIV0 merges them into its own.
  __aicore__ inline void MergeAivPair(uint32_t rows) {
    const uint64_t base = core_ * (t_->wsPairCoreBytes / sizeof(float));
    const uint32_t k = t_->sparseCount;
    if (sub_ == 1) {
      for (uint32_t r = 0; r < rows; ++r) {
        DataCopyExtParams cp{1, static_cast<uint32_t>(rowLen_[r] * 8), 0, 0, 0};
        PipeSync<HardEvent::V_MTE3>();
        DataCopyPad(wsPair_[base + static_cast<uint64_t>(r) * 2 * k], State(r), cp);
      }
    }
    CrossCoreSetFlag<1, PIPE_MTE3>(kFlagPairWritten);
    CrossCoreWaitFlag(kFlagPairWritten);
    if (sub_ == 0) {
      // staging for the other list: the idle score buffer (>= 64 rows x halfKey floats, which
      // holds sparseCount pairs)
      LocalTensor<float> theirs = scoreQ_.AllocTensor<float>();
      for (uint32_t r = 0; r < rows; ++r) {
        // AIV1 merged exactly as many candidates as AIV0 did: the same list length
        const uint32_t len = rowLen_[r];
        DataCopyExtParams cp{1, static_cast<uint32_t>(len * 8), 0, 0, 0};
        DataCopyPadExtParams<float> pad{false, 0, 0, 0.0f};
        DataCopyPad(theirs, wsPair_[base + static_cast<uint64_t>(r) * 2 * k], cp, pad);
        PipeSync<HardEvent::MTE2_V>();
        MergeLists(State(r), len, theirs, len);
        rowLen_[r] = Min(2ull * len, k);
      }
      scoreQ_.FreeTensor(theirs);
    }
    CrossCoreSetFlag<1, PIPE_MTE2>(kFlagPairRead);
    CrossCoreWaitFlag(kFlagPairRead);
  }

  // a <- top sparseCount of a (lenA pairs) U b (lenB pairs); MrgSort writes all lenA + lenB
  // pairs, so the merge buffer holds 2 x (sparseCount + halfKey) pairs (tiling: ubMergeTmp).
  __aicore__ inline void MergeLists(const LocalTensor<float>& a, uint32_t lenA, const LocalTensor<float>& b,
                                    uint32_t lenB) {
    LocalTensor<float> merged = mergeBuf_.Get<float>();
    MrgSortSrcList<float> lists(a, b, a, a);
    const uint16_t counts[4] = {static_cast<uint16_t>(lenA), static_cast<uint16_t>(lenB), 0, 0};
    uint32_t sortedNum[4];
    MrgSort<float>(merged, lists, counts, sortedNum, 0b11, 1);
    PipeSync<HardEvent::V_V>();
    DataCopy(a, merged, AlignUp(2 * Min(lenA + lenB, t_->sparseCount), 8));
    PipeSync<HardEvent::V_V>();
  }

  __aicore__ inline uint64_t PartialSlot(uint32_t core, uint32_t which) const {
    return (core * t_->wsPartialCoreBytes + which * (t_->wsPartialCoreBytes / 2)) / sizeof(float);
  }

  __aicore__ inline void WriteLists(uint32_t rows, uint64_t at) {
    const uint32_t k = t_->sparseCount;
    PipeSync<HardEvent::V_MTE3>();
    for (uint32_t r = 0; r < rows; ++r) {
      // pad to sparseCount pairs with masked entries so every partial list has one length
      LocalTensor<float> st = State(r);
      if (rowLen_[r] < k) {
        Duplicate(st[2 * rowLen_[r]], kMaskScore, static_cast<int32_t>(2 * (k - rowLen_[r])));
        PipeSync<HardEvent::V_MTE3>();
      }
      DataCopyExtParams cp{1, static_cast<uint32_t>(k * 8), 0, 0, 0};
      DataCopyPad(wsPartial_[at + static_cast<uint64_t>(r) * 2 * k], st, cp);
    }
  }

  // Final rows: Extract (value, index) from each list, -1 / -inf past the valid count.
  __aicore__ inline void WriteRows(const IndexerUnit& u, uint32_t rows, uint32_t qLen, uint32_t kvLen) {
    const uint32_t k = t_->sparseCount, kA = AlignUp(k, kSortRepeat);
    LocalTensor<float> vals = mergeBuf_.Get<float>();
    LocalTensor<uint32_t> idx = mergeBuf_.Get<uint32_t>()[kA];
    for (uint32_t r = 0; r < rows; ++r) {
      const uint64_t vis = IndexerVisible(t_->sparseMode, qLen, kvLen, u.rowStart + r);
      const uint32_t valid = Min(vis, k);
      Extract(vals, idx, State(r), static_cast<int32_t>(kA / kSortRepeat));
      if (valid < k) {
        Duplicate(idx.template ReinterpretCast<int32_t>()[valid], static_cast<int32_t>(-1),
                  static_cast<int32_t>(k - valid));
        Duplicate(vals.template ReinterpretCast<uint32_t>()[valid], kNegInfBits,
                  static_cast<int32_t>(k - valid));
      }
      PipeSync<HardEvent::V_MTE3>();
      const uint64_t row = seqs_.QueryRow(u.seq, u.rowStart + r);
      DataCopyExtParams cp{1, static_cast<uint32_t>(k * sizeof(int32_t)), 0, 0, 0};
      DataCopyPad(indicesGm_[row * k], idx.template ReinterpretCast<int32_t>(), cp);
      if (t_->returnValue) DataCopyPad(valuesGm_[row * k], vals, cp);
      PipeSync<HardEvent::MTE3_V>();
    }
  }

  // Rows no unit covers: a BSND query's rows past its actual length, and row tiles that see no
  // key at all. Spread over the cores' AIV0s by row.
  __aicore__ inline void WritePaddingRows() {
    const uint32_t k = t_->sparseCount;
    const uint32_t cores = t_->split.usedCores > 0 ? t_->split.usedCores : 1;
    LocalTensor<int32_t> idx = accBuf_.Get<int32_t>();
    LocalTensor<uint32_t> vals = sortBuf_.Get<uint32_t>();
    const uint32_t chunk = Min(t_->halfKey, k);
    Duplicate(idx, static_cast<int32_t>(-1), static_cast<int32_t>(chunk));
    Duplicate(vals, kNegInfBits, static_cast<int32_t>(chunk));
    PipeSync<HardEvent::V_MTE3>();
    uint64_t seen = 0;
    for (uint32_t b = 0; b < t_->problem.batch; ++b) {
      const uint32_t q = seqs_.QueryLen(b), kv = seqs_.KeyLen(b);
      const uint32_t rowsHere = t_->problem.layoutQuery == kLayoutTND ? q : t_->problem.querySeq;
      for (uint32_t r = 0; r < rowsHere; ++r, ++seen) {
        const uint32_t tileEnd = Min((r / t_->rowTile + 1) * t_->rowTile, q);
        const bool covered = r < q && IndexerVisible(t_->sparseMode, q, kv, tileEnd - 1) > 0;
        if (covered || seen % cores != core_) continue;
        const uint64_t row = seqs_.QueryRow(b, r);
        for (uint32_t c = 0; c < k; c += chunk) {
          DataCopyExtParams cp{1, static_cast<uint32_t>(Min(chunk, k - c) * 4), 0, 0, 0};
          DataCopyPad(indicesGm_[row * k + c], idx, cp);
          if (t_->returnValue) DataCopyPad(valueBitsGm_[row * k + c], vals, cp);
        }
      }
    }
  }

  // After SyncAll: the owner of a row tile cut by core ranges merges the following cores' head
  // lists into its own tail lists and writes the rows.
  __aicore__ inline void MergeSplitRowTile() {
    if (!hasOwnedSplit_) return;
    const IndexerUnit& u = ownedSplit_;
    const uint32_t rows = u.rowEnd - u.rowStart, k = t_->sparseCount;
    // own tail lists back into the states
    for (uint32_t r = 0; r < rows; ++r) {
      LoadList(State(r), PartialSlot(core_, 1) + static_cast<uint64_t>(r) * 2 * k);
      rowLen_[r] = k;
    }
    for (uint32_t c = core_ + 1; c < t_->split.usedCores; ++c) {
      IndexerUnit first{}, before{};
      if (!UnitAtIndex(t_->split.coreStart[c], first) || !UnitAtIndex(t_->split.coreStart[c] - 1, before) ||
          !SameRowTile(first, before) || !SameRowTile(first, u))
        break;
      LocalTensor<float> theirs = scoreQ_.AllocTensor<float>();
      for (uint32_t r = 0; r < rows; ++r) {
        LoadList(theirs, PartialSlot(c, 0) + static_cast<uint64_t>(r) * 2 * k);
        MergeLists(State(r), k, theirs, k);
      }
      scoreQ_.FreeTensor(theirs);
    }
    WriteRows(u, rows, seqs_.QueryLen(u.seq), seqs_.KeyLen(u.seq));
  }

  __aicore__ inline void LoadList(const LocalTensor<float>& dst, uint64_t at) {
    DataCopyExtParams cp{1, static_cast<uint32_t>(t_->sparseCount * 8), 0, 0, 0};
    DataCopyPadExtParams<float> pad{false, 0, 0, 0.0f};
    DataCopyPad(dst, wsPartial_[at], cp, pad);
    PipeSync<HardEvent::MTE2_V>();
  }

  const LightningIndexerTilingData* t_ = nullptr;
  Sequences seqs_;
  GlobalTensor<QT> queryGm_, keyGm_;
  GlobalTensor<WT> weightsGm_;
  GlobalTensor<ST> queryScaleGm_, keyScaleGm_;
  GlobalTensor<int32_t> indicesGm_;
  GlobalTensor<float> valuesGm_;
  GlobalTensor<uint32_t> valueBitsGm_;
  GlobalTensor<ACC> wsScore_;
  GlobalTensor<float> wsPair_, wsPartial_;
  uint32_t core_ = 0, sub_ = 0, listLen_ = 0;

  TPipe pipe_;
  // AIC
  TQue<QuePosition::A1, 1> qL1_;
  TQue<QuePosition::B1, 2> kL1_;
  TQue<QuePosition::A2, 1> aL0_;
  TQue<QuePosition::B2, 2> bL0_;
  TQue<QuePosition::CO1, 2> cL0_;
  LocalTensor<QT> qL0_;
  bool qLoaded_ = false;
  uint32_t tilesIssued_ = 0;
  // AIV
  TQue<QuePosition::VECIN, 2> scoreQ_;
  TBuf<QuePosition::VECCALC> weightBuf_, accBuf_, stateBuf_, mergeBuf_, sortBuf_, indexBuf_, scaleBuf_;
  uint32_t tilesSeen_ = 0;
  uint32_t rowLen_[128] = {};
  IndexerUnit ownedSplit_{};
  bool hasOwnedSplit_ = false, tileStartedBefore_ = false;
};

}  // namespace dsa_li

// One entry point; the tiling key picks the dtype instance:
// 0 bf16, 1 fp16, 2 int8 with float32 weights/scales, 3 int8 with float16 weights/scales.
extern "C" __global__ __aicore__ void dsa_lightning_indexer(
    GM_ADDR query, GM_ADDR key, GM_ADDR weights, GM_ADDR query_dequant_scale, GM_ADDR key_dequant_scale,
    GM_ADDR actual_seq_lengths_query, GM_ADDR actual_seq_lengths_key, GM_ADDR block_table,
    GM_ADDR sparse_indices, GM_ADDR sparse_values, GM_ADDR workspace, GM_ADDR tiling) {
  KERNEL_TASK_TYPE_DEFAULT(KERNEL_TYPE_MIX_AIC_1_2);
  REGISTER_TILING_DEFAULT(dsa_tiling::LightningIndexerTilingData);
  GET_TILING_DATA_WITH_STRUCT(dsa_tiling::LightningIndexerTilingData, tilingData, tiling);
  if (TILING_KEY_IS(0)) {
    dsa_li::LightningIndexer<bfloat16_t, bfloat16_t, float, float> op;
    op.Init(query, key, weights, query_dequant_scale, key_dequant_scale, actual_seq_lengths_query,
            actual_seq_lengths_key, block_table, sparse_indices, sparse_values, workspace, &tilingData);
    op.Process();
  } else if (TILING_KEY_IS(1)) {
    dsa_li::LightningIndexer<half, half, float, float> op;
    op.Init(query, key, weights, query_dequant_scale, key_dequant_scale, actual_seq_lengths_query,
            actual_seq_lengths_key, block_table, sparse_indices, sparse_values, workspace, &tilingData);
    op.Process();
  } else if (TILING_KEY_IS(2)) {
    dsa_li::LightningIndexer<int8_t, float, float, int32_t> op;
    op.Init(query, key, weights, query_dequant_scale, key_dequant_scale, actual_seq_lengths_query,
            actual_seq_lengths_key, block_table, sparse_indices, sparse_values, workspace, &tilingData);
    op.Process();
  } else if (TILING_KEY_IS(3)) {
    dsa_li::LightningIndexer<int8_t, half, half, int32_t> op;
    op.Init(query, key, weights, query_dequant_scale, key_dequant_scale, actual_seq_lengths_query,
            actual_seq_lengths_key, block_table, sparse_indices, sparse_values, workspace, &tilingData);
    op.Process();
  }
}
