"""Run the coarse head stage of ``register`` single-threaded, in its own process.

ANTs' Mattes MI sums its joint histogram across threads in an order that changes from run to run;
ITK reads its thread count only when it starts, so the one-threaded run needs a fresh process.
Usage: ``python -m atlas_curate.normalize._headstage FIXED MOVING OUTPREFIX [INITIAL]``.
"""

from __future__ import annotations

import os
import sys

os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = "1"


def main(argv: list[str]) -> int:
    import ants

    from .register import HEAD_ITERATIONS, _register

    fixed, moving, outprefix = ants.image_read(argv[0]), ants.image_read(argv[1]), argv[2]
    initial = argv[3] if len(argv) > 3 and argv[3] else None
    _register(fixed, moving, initial=initial, shrink=(2, 1), iterations=HEAD_ITERATIONS, outprefix=outprefix,
              metric="Mattes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
