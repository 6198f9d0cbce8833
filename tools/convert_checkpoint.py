#!/usr/bin/env python3
"""Convert an HF DeepSeek-V3.2-Exp checkpoint (the official FP8 release) to fp8, bf16 or int8
W8A8, optionally split for tensor / expert parallelism; streaming and resumable.

    python tools/convert_checkpoint.py SRC --out DIR --dtype {fp8,bf16,int8} [--tp N] [--ep M]
        [--keep-mtp] [--workers K]
    python tools/convert_checkpoint.py verify DIR

Same as ``dsa-ascend convert`` / ``dsa-ascend verify``; the logic lives in ``dsa_ascend.convert``
so the installed CLI can reach it.
"""

import sys

from dsa_ascend.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main(args if args[:1] == ["verify"] else ["convert", *args]))
