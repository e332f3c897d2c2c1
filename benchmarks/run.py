"""Both benchmarks in one command: ``python -m benchmarks.run [--quick] [--write-docs docs/benchmarks.md]``
(same flags as ``benchmarks.densenet``)."""

from __future__ import annotations

import sys

from benchmarks import delugenet, densenet


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rc = densenet.main(argv)
    return rc or delugenet.main(argv)


if __name__ == "__main__":
    sys.exit(main())
