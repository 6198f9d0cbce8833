"""Regenerates cpu_stubs/stub_fun_list.h: compiles a source through typecheck.sh's compiler
command, collects the intrinsic names the open Ascend C headers reference but tikicpulib would
declare ("'x' was not declared in this scope"), adds a stub for each, and repeats until no new
name appears. Getters (get_*, bit-count helpers, conversions) return a value; the rest are void.

Usage (typecheck.sh --regen-stubs calls it): python3 typecheck_autostub.py CMD_FILE SOURCE...
CMD_FILE holds the compiler command line (one argument per line) without the source.
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
LIST = HERE / "cpu_stubs" / "stub_fun_list.h"
VALUE = re.compile(r"^(get_|sbitset|sff|sfl|conv_|clz|bcnt)")
# Names reported as undeclared only as a consequence of an earlier error.
NOT_INTRINSICS = {"dst", "src", "inc", "dec", "mask", "srcReg0", "srcReg1", "dstReg", "memT",
                  "eventID", "assert", "std", "value", "block_idx", "sub_block_idx", "block_num",
                  "g_taskRation", "mem_dsb_t", "addr_cal_mode_t"}


def names_in(text: str) -> set[str]:
    found = set(re.findall(r"there are no arguments to ‘(\w+)’", text))
    found |= set(re.findall(r"‘(\w+)’ was not declared in this scope", text))
    return {n for n in found if n not in NOT_INTRINSICS and (n[0].islower() or n.startswith("AscendC"))}


def main() -> int:
    cmd = [a for a in pathlib.Path(sys.argv[1]).read_text().splitlines() if a]
    known = set(re.findall(r"ASC_STUB_\w+\((\w+)\)", LIST.read_text())) if LIST.exists() else set()
    for _ in range(20):
        new = set()
        for src in sys.argv[2:]:
            out = subprocess.run(cmd + [src], capture_output=True, text=True)
            new |= names_in(out.stderr) - known
        if not new:
            break
        known |= new
        LIST.write_text("".join(f"ASC_STUB_{'VAL' if VALUE.match(n) else 'FN'}({n})\n"
                                for n in sorted(known)))
        print(f"added {len(new)} stubs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
