"""A real learning check: fine-tune SmolLM2-135M-Instruct on examples/tickets.jsonl and measure the
held-out exact-match accuracy before and after (examples/tickets_val.jsonl, phrasings never trained on).

It is ``bit-axon demo`` with its default settings (LoRA rank 8 on the 4-bit GGUF base, 30 steps of
4 x 256 tokens, learning rate 2e-4), which exits 1 when the accuracy did not rise. About 5-8 minutes
on a 2-core CPU, so it is not part of ``make test``; results in bench/README.md ("The demo").

    python bench/learning.py [--steps N] [-o DIR]
"""

from __future__ import annotations

import sys

# isort: off
import bit_axon  # noqa: F401  (must load the fast BLAS before mlx is imported)

# isort: on
from bit_axon.cli.main import app

if __name__ == "__main__":
    sys.exit(app(["demo", "--no-thermal", "-o", "runs/learning", *sys.argv[1:]]))
