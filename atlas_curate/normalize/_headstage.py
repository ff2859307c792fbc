"""Serve the coarse head stage of ``register``: single-threaded, in a long-lived helper process.

ANTs' Mattes MI sums its joint histogram across threads in an order that changes from run to run; ITK
reads its thread count only when it starts, so the one-threaded stage needs its own process. Starting one
per scan costs about 2 s (Python, ANTs), so a worker keeps one helper for all its scans
(``register.HeadStage``).

Protocol: one JSON request per line on stdin, ``{"fixed": PATH, "moving": PATH, "outprefix": PREFIX,
"initial": PATH or null}`` (or ``{"ping": true}``, answered once the helper is ready); one JSON reply per line
on the file descriptor given as the only argument, ``{"ok": true, "seconds": S}`` or
``{"ok": false, "error": TEXT}``. The helper exits when stdin closes (its parent is gone).
Usage: ``python -m atlas_curate.normalize._headstage REPLY_FD``.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = "1"


def main(argv: list[str]) -> int:
    reply = os.fdopen(int(argv[0]), "w", buffering=1)
    # ANTs prints to fd 1 now and then; keep it away from the parent
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    import ants

    from .register import HEAD_ITERATIONS, _register

    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            if request.get("ping"):
                reply.write(json.dumps({"ok": True}) + "\n")
                continue
            start = time.perf_counter()
            fixed, moving = ants.image_read(request["fixed"]), ants.image_read(request["moving"])
            _register(fixed, moving, initial=request.get("initial"), shrink=(2, 1), iterations=HEAD_ITERATIONS,
                      outprefix=request["outprefix"], metric="Mattes")
            answer = {"ok": True, "seconds": round(time.perf_counter() - start, 3)}
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        reply.write(json.dumps(answer) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
