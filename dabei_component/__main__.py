"""`python -m dabei_component demo --servers 3`: the whole flow on this machine (see demo.py)."""

import sys

from .demo import main


def _run() -> int:
    if len(sys.argv) < 2 or sys.argv[1] != "demo":
        print("usage: python -m dabei_component demo [--servers N] [--ssh-port PORT] [--work-dir DIR]", file=sys.stderr)
        return 2
    try:
        return main(sys.argv[2:])
    except Exception as exc:  # one clear line instead of a traceback through the engine
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1


sys.exit(_run())
