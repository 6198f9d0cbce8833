// Declarations standing in for the device intrinsics that CANN's tikicpulib defines in CPU-debug
// builds. The open headers implement the Ascend C API on top of them; our kernels never call
// them directly. Each stub accepts any arguments (void, or an int64_t for the getters), so the
// check is about our use of the Ascend C API (names, types, signatures), not the intrinsics.
// stub_fun_list.h is the list of intrinsic names the headers reference, collected from
// compiler errors by typecheck_autostub.py (typecheck.sh --regen-stubs).
#pragma once
#include "stub_def.h"
#define ASC_STUB_FN(name) \
  template <typename... Ts> inline void name(Ts&&...) {}
#define ASC_STUB_VAL(name) \
  template <typename... Ts> inline int64_t name(Ts&&...) { return 0; }
#include "stub_fun_list.h"
ASC_STUB_FN(__sync_all_stub)
ASC_STUB_FN(__ib_set_stub)
ASC_STUB_FN(__ib_wait_stub)
