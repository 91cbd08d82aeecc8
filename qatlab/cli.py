"""The ``qatlab`` command: ``qatlab ablate GRID_FILE [--out DIR] [--workers N]`` (see :mod:`qatlab.ablate`) and
``qatlab doctor RUN_DIR`` (see :mod:`qatlab.doctor`)."""

from __future__ import annotations

import sys

COMMANDS = {"ablate": "qatlab.ablate", "doctor": "qatlab.doctor"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(
            f"usage: qatlab {{{','.join(COMMANDS)}}} ...  (e.g. qatlab ablate grid.toml, qatlab doctor build/ddp)",
            file=sys.stderr,
        )
        return 2
    import importlib

    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
