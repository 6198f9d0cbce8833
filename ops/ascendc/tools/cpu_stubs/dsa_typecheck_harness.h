// Force-included by typecheck.sh: what CANN's operator compiler generates around a kernel
// (the tiling-data accessor) and nothing else.
#pragma once
#define GET_TILING_DATA_WITH_STRUCT(tiling_struct, tiling_data, tiling_arg) \
  const tiling_struct tiling_data = *reinterpret_cast<const tiling_struct*>(tiling_arg)
