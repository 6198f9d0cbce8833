#!/usr/bin/env python3
"""Write a deterministic HF-format checkpoint from a preset and a seed.

    python tools/make_tiny_checkpoint.py --out /tmp/tiny [--preset tiny] [--seed 0] [--shards 2]

Same as ``dsa-ascend make-tiny``; the logic lives in ``dsa_ascend.tiny`` so the installed CLI
can reach it.
"""

import sys

from dsa_ascend.cli import main

if __name__ == "__main__":
    sys.exit(main(["make-tiny", *sys.argv[1:]]))
