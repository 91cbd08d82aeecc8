"""Where results go, and how they are written: never half a file.

``build_dir()`` is the one folder every notebook and module writes to (``make run`` sets ``$QATLAB_BUILD``).
Every writer goes through :func:`atomic`: the data lands in ``<name>.tmp`` next to the target and is renamed over
it, so a reader, or a run killed midway, sees the old file or the new one, never a mixture.

Example:
    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "table.csv"
    >>> write_atomic(target, "a,b\\n1,2\\n").read_text()
    'a,b\\n1,2\\n'
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def build_dir() -> Path:
    """Where results go: ``$QATLAB_BUILD`` (set by ``make run``), else ``./build``; created if missing."""
    path = Path(os.environ.get("QATLAB_BUILD", "build"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic(path: str | os.PathLike, save: Callable[[Path], object]) -> Path:
    """Call ``save(tmp)`` on a temporary path beside ``path``, then rename it over ``path``. If ``save`` raises,
    the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        save(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write text (UTF-8) or bytes to ``path`` atomically (see :func:`atomic`)."""
    if isinstance(data, str):
        return atomic(path, lambda tmp: tmp.write_text(data, encoding="utf-8"))
    return atomic(path, lambda tmp: tmp.write_bytes(data))


def save_atomic(obj: object, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` atomically (see :func:`atomic`)."""
    import torch  # here, not at the top: the ablation CLI imports this module and stays torch-free

    return atomic(path, lambda tmp: torch.save(obj, tmp))
