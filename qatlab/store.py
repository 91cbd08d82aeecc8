"""The run store: never compute the same run twice.

A run's key is a SHA-256 over everything its numbers depend on: the float model (its class, architecture and
weights), the config, the seed, steps and other training arguments, the data (the tensors of each loader's data
set, the batch size, how it shuffles), the device type, and the qatlab source that computes numbers
(:func:`source_hash`; presentation-only modules such as ``plot`` are left out). A stored run is a JSON record
(metrics and history) and, optionally, a ``.pt`` file with the trained model's state, under
``build/runs/<key[:2]>/<key>``. The state is written first and the record last, each atomically, so a run killed
midway leaves no record and is computed again; the record is the commit.

:func:`qatlab.experiments.qat_run` reads and writes it when given ``store=``, or by default when
``QATLAB_STORE=1`` (the notebook runner sets it). ``QATLAB_RECOMPUTE=1`` ignores every stored run (and stores the new ones over them). A change to a number-affecting
qatlab module changes :func:`source_hash`, so every key changes and nothing stale is read; the old entries stay on
disk until ``build/`` is cleaned.

Example:
    >>> import tempfile
    >>> store = RunStore(tempfile.mkdtemp())
    >>> key = store.key("demo", lr=0.1, seed=0)
    >>> store.get(key) is None
    True
    >>> store.put(key, {"acc": 0.9})
    >>> store.get(key)["acc"]
    0.9
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from qatlab.files import build_dir, save_atomic, write_atomic

# modules whose code changes no number a run computes: figures, widgets, the notebook runner and claims, the CLI
# and the doctor (it reads runs, it does not make them); everything else, this module included, is hashed
PRESENTATION = frozenset({"plot", "widgets", "claims", "runner", "cli", "doctor", "__init__"})


def default() -> RunStore | None:
    """The store runs use when none is passed: ``RunStore()`` under ``build/runs`` when ``QATLAB_STORE`` is set
    (``1``, ``true`` or ``yes``; ``make run`` sets it for every notebook), else None."""
    return RunStore() if _env_flag("QATLAB_STORE") else None


def recompute() -> bool:
    """True when ``QATLAB_RECOMPUTE`` asks to ignore stored runs (``1``, ``true`` or ``yes``)."""
    return _env_flag("QATLAB_RECOMPUTE")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes")


@functools.cache
def source_hash(presentation: bool = False) -> str:
    """SHA-256 of the qatlab modules that compute numbers (every ``qatlab/*.py`` but :data:`PRESENTATION`), or
    with ``presentation=True`` of every module (what a rendered notebook depends on: its figures too)."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        if path.stem in PRESENTATION and not presentation:
            continue
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


_TENSOR_DIGESTS: dict[int, tuple[weakref.ref, int, str]] = {}


def _tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of dtype, shape and bytes; remembered per live tensor until it is changed in place (a data set's
    tensors are hashed once per process, not once per run)."""
    memo = _TENSOR_DIGESTS.get(id(t))
    if memo is not None and memo[0]() is t and memo[1] == t._version:
        return memo[2]
    data = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{data.dtype}{tuple(data.shape)}".encode())
    h.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    digest = h.hexdigest()
    if len(_TENSOR_DIGESTS) > 4096:
        _TENSOR_DIGESTS.clear()
    _TENSOR_DIGESTS[id(t)] = (weakref.ref(t), t._version, digest)
    return digest


def fingerprint(obj: Any) -> Any:
    """A JSON-ready description of ``obj`` that changes whenever what it computes could change.

    Tensors by their bytes; modules by class, architecture (``repr``), train flag and state; data loaders by their
    data set (``TensorDataset`` tensors, ``Subset`` indices), batch size, ``drop_last`` and sampler; dataclasses
    (``QATConfig``, ``Distill``) by their fields; functions by module and name (qatlab's code is in
    :func:`source_hash`). Anything else raises ``TypeError``: a key that cannot see an input must not be made.
    """
    from torch.utils.data import DataLoader, Subset, TensorDataset

    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return repr(obj) if not math.isfinite(obj) else obj
    if isinstance(obj, torch.Tensor):
        return {"tensor": _tensor_digest(obj)}
    if isinstance(obj, torch.device):
        return {"device": obj.type}
    if isinstance(obj, Mapping):
        return {str(k): fingerprint(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [fingerprint(v) for v in obj]
    if isinstance(obj, nn.Module):
        state = {k: _tensor_digest(v) for k, v in obj.state_dict().items()}
        return {"module": type(obj).__qualname__, "repr": repr(obj), "training": obj.training, "state": state}
    if hasattr(obj, "to_dict") and dataclasses.is_dataclass(obj):
        return {"config": type(obj).__qualname__, **fingerprint(obj.to_dict())}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {"dataclass": type(obj).__qualname__, **fingerprint(dataclasses.asdict(obj))}
    if isinstance(obj, DataLoader):
        return {"loader": fingerprint(obj.dataset), "batch_size": obj.batch_size, "drop_last": obj.drop_last,
                "sampler": type(obj.sampler).__qualname__}  # fmt: skip
    if isinstance(obj, TensorDataset):
        return {"tensors": [fingerprint(t) for t in obj.tensors]}
    if isinstance(obj, Subset):
        return {
            "subset": fingerprint(obj.dataset),
            "indices": fingerprint(torch.as_tensor(list(obj.indices))),
        }
    if callable(obj) and hasattr(obj, "__qualname__") and "<" not in obj.__qualname__:
        return {
            "function": f"{getattr(obj, '__module__', '?')}.{obj.__qualname__}"
        }  # a module-level function
    raise TypeError(
        f"cannot fingerprint a {type(obj).__name__} for the run store: pass tensors, modules, DataLoaders over a "
        "TensorDataset/Subset, configs, module-level functions (not a lambda or closure: what it captured is "
        "invisible) or plain values; or compute without the store: store=None"
    )


def _frame_json(df: pd.DataFrame) -> dict[str, Any]:
    # Python's json writes floats by repr: they read back bit for bit (pandas' to_json keeps 15 digits)
    return {"columns": [str(c) for c in df.columns], "data": df.to_numpy(dtype=object).tolist()}


def _plain(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy scalars (bool_, int64, float64)
        return obj.item()
    raise TypeError(f"a run record holds a {type(obj).__name__}, which JSON cannot store")


class RunStore:
    """Content-addressed runs under ``root`` (default ``build/runs``): :meth:`key`, :meth:`get`, :meth:`put`."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root) if root is not None else build_dir() / "runs"

    def key(self, kind: str, **inputs: Any) -> str:
        """The key of a run of ``kind`` (e.g. ``"qat_run"``) with these inputs, and the qatlab source hash."""
        payload = {"kind": kind, "source": source_hash(), "inputs": fingerprint(inputs)}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def _paths(self, key: str) -> tuple[Path, Path]:
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"key {key!r} is not a RunStore key (64 hex digits from RunStore.key)")
        folder = self.root / key[:2]
        return folder / f"{key}.json", folder / f"{key}.pt"

    def get(self, key: str, state: bool = False) -> dict[str, Any] | None:
        """The stored record of ``key`` (``history`` as a DataFrame; with ``state=True`` also ``state``, the
        stored state dict), or None: not stored, stored without the state asked for, or ``QATLAB_RECOMPUTE=1``."""
        record_path, state_path = self._paths(key)
        if recompute() or not record_path.exists():
            return None
        record = json.loads(record_path.read_text())
        if isinstance(record.get("history"), dict):
            h = record["history"]
            record["history"] = pd.DataFrame(h["data"], columns=h["columns"]).infer_objects()
        if state:
            if not state_path.exists():
                return None
            record["state"] = torch.load(state_path, map_location="cpu", weights_only=True)
        return record

    def put(
        self, key: str, record: Mapping[str, Any], state: Mapping[str, torch.Tensor] | None = None
    ) -> None:
        """Store ``record`` (JSON-ready values; a ``history`` DataFrame is kept exactly) and an optional state
        dict. The state lands first, the record last: a reader sees a complete run or none."""
        record_path, state_path = self._paths(key)
        record_path.parent.mkdir(parents=True, exist_ok=True)
        body = dict(record)
        if isinstance(body.get("history"), pd.DataFrame):
            body["history"] = _frame_json(body["history"])
        text = json.dumps(body, allow_nan=True, default=_plain)
        if state is not None:
            save_atomic({k: v.detach().cpu() for k, v in state.items()}, state_path)
        write_atomic(record_path, text)

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob("*/*.json")) if self.root.exists() else 0
