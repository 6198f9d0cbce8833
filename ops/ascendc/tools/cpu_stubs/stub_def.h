// Our own minimal stand-ins for the declarations CANN's CPU-debug library (tikicpulib, not
// open) provides to the open Ascend C headers in ASCENDC_CPU_DEBUG builds: attribute macros,
// the pipe/event/mode enums and a few globals, enough for `g++ -fsyntax-only` (typecheck.sh).
// Not an implementation and not CANN's file: enumerator values are arbitrary.
#pragma once
#include <cstdint>
#include <cassert>
#include <cstdio>
#include <cstring>
#include <vector>
#include <set>
#include <map>
#include <string>
#include <sstream>
#include <iostream>
#include <algorithm>
#include <functional>
#include <memory>
#include <type_traits>
#include "kernel_fp16.h"
#include "kernel_bf16.h"
#define __aicore__
#define __global__
#define __gm__
#define __ubuf__
#define __cbuf__
#define __ca__
#define __cb__
#define __cc__
#define __fbuf__
#define __ssbuf__
#define __biasbuf__
#define __local_mem__
#define __simt_gm__
#define __simd_callee__
#define __simd_vf__
#define __simt_callee__
#define __host_aicore__
#define __sync_alias__
#define __sync_noalias__
#define __check_sync_alias__
#define __in_pipe__(...)
#define __out_pipe__(...)
#define __inout_pipe__(...)
#define ASCENDC_HOST_AICORE
#define ASCENDC_HOST
#define ASCENDC_AICORE
#define __BLOCK_LOCAL__
#define __WORKGROUP_LOCAL__

enum pipe_t { PIPE_S = 0, PIPE_V, PIPE_M, PIPE_MTE1, PIPE_MTE2, PIPE_MTE3, PIPE_ALL, PIPE_MTE4,
              PIPE_MTE5, PIPE_V2, PIPE_FIX, VIRTUAL_PIPE_END };
enum event_t { EVENT_ID0 = 0, EVENT_ID1, EVENT_ID2, EVENT_ID3, EVENT_ID4, EVENT_ID5, EVENT_ID6,
               EVENT_ID7 };
enum class QuantMode_t { NoQuant, F322F16, F322BF16, DEQF16, VDEQF16, QF322B8_PRE, VQF322B8_PRE,
  REQ8, VREQ8, DEQS16, VDEQS16, REQ4, VREQ4, QF162B8_PRE, VQF162B8_PRE, QF162S4_PRE, VQF162S4_PRE,
  QF162S16_PRE, VQF162S16_PRE, QS322BF16_PRE, VQS322BF16_PRE, QF322F16_PRE, VQF322F16_PRE,
  QF322BF16_PRE, VQF322BF16_PRE, QF322HIF8_PRE, VQF322HIF8_PRE, QF322HIF8_PRE_HYBRID,
  VQF322HIF8_PRE_HYBRID, QF322FP8_PRE, VQF322FP8_PRE, QF322F32_PRE, VQF322F32_PRE };
enum class Order_t { VALUE_INDEX, INDEX_VALUE, ONLY_VALUE, ONLY_INDEX };
enum class dcci_dst_t { CACHELINE_ALL, CACHELINE_UB, CACHELINE_OUT, CACHELINE_ATOMIC };
enum class cache_line_t { SINGLE_CACHE_LINE, ENTIRE_DATA_CACHE };
enum class pad_t { PAD_NONE, PAD_MODE1, PAD_MODE2, PAD_MODE3, PAD_MODE4, PAD_MODE5, PAD_MODE6,
                   PAD_MODE7, PAD_MODE8 };
enum ub_addr8_t { VA0 = 0, VA1, VA2, VA3, VA4, VA5, VA6, VA7 };
enum atomic_type_t { ATOMIC_NONE, ATOMIC_F32, ATOMIC_F16, ATOMIC_S16, ATOMIC_S32, ATOMIC_S8,
                     ATOMIC_BF16 };
enum atomic_op_t { ATOMIC_SUM, ATOMIC_MAX, ATOMIC_MIN };
enum mem_t { L0A = 0, L0B, L0C, L1, UB, BIAS, FB };
// register types of the 3510 register-level API (declared, never used by our 2201 kernels)
struct vector_address {};
struct vector_align {};
struct vector_bool {};
#define __host__
#define __disable_kernel_type_autoinfer__
enum mem_dsb_t { DSB_ALL = 0, DSB_DDR, DSB_UB, DSB_SEQ };
enum addr_cal_mode_t { inc = 0, dec };
extern int64_t block_idx;
extern int64_t block_num;
extern int64_t sub_block_idx;
extern int64_t g_taskRation;
namespace AscendC {
constexpr int32_t AIC_TYPE = 1;
constexpr int32_t AIV_TYPE = 2;
extern bool g_isVdeq;
}
struct fp8_e8m0_t { uint8_t v; };
struct fp8_e5m2_t { uint8_t v; };
struct fp8_e4m3fn_t { uint8_t v; };
struct fp4x2_e2m1_t { uint8_t v; };
struct fp4x2_e1m2_t { uint8_t v; };
struct hifloat8_t { uint8_t v; };
enum vpart_t { L128 = 0, H128 };
