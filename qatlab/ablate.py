"""A resumable, parallel ablation runner: a grid of config values x seeds, one tidy row per run.

Each run is ``run_fn(config, seed) -> dict of metrics``, a pure function of its arguments (module level, so a
process pool can pickle it). Every finished run is written atomically to ``out_dir/runs/<key>.json`` the moment it
completes; a sweep killed at any point (Ctrl-C, a crash inside a run, a lost machine) is resumed by calling
:func:`ablate` again: finished runs are read back, not redone, and no file is ever half-written. The table
``out_dir/results.csv`` is rewritten (atomically) at the end of every call.

A record is reused only while its :func:`run_version` holds: the run function's name, the qatlab source that
computes numbers (:func:`qatlab.store.source_hash`) and, for a run function outside qatlab, its module's file.
A change to any of them makes the folder's records stale: they are run again (and ``QATLAB_RECOMPUTE=1`` runs
everything again). Runs go to a local process pool, to any ``concurrent.futures`` executor, or to a Dask cluster
(``scheduler="tcp://host:8786"``); the records are always written here, by this process.

Example:
    >>> from qatlab.ablate import ablate, digits_qat_run
    >>> df = ablate({"bits": [8, 4], "per_channel": [True, False]}, digits_qat_run, "build/ablate/demo",
    ...             seeds=(0, 1))  # doctest: +SKIP

Command line (grid file in JSON, TOML or YAML)::

    qatlab ablate grid.toml               # or: python -m qatlab.ablate grid.toml
    qatlab ablate grid.toml --scheduler tcp://10.0.0.1:8786   # on a Dask cluster (see the README)

    # grid.toml
    run = "qatlab.ablate:digits_qat_run"
    seeds = [0, 1]
    out = "build/ablate/bits"
    [grid]
    bits = [8, 4, 2]
    per_channel = [true, false]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import itertools
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import pandas as pd

from qatlab.config import progress_bar
from qatlab.files import write_atomic

RunFn = Callable[[dict[str, Any], int], Mapping[str, Any]]
RESERVED = ("seed", "seconds", "key")


def grid_runs(
    grid: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Sequence[Any]]], seeds: Iterable[int] = (0,)
) -> list[tuple[dict[str, Any], int]]:
    """The cross product of the grid's values, times the seeds: ``[(config, seed), ...]`` in a stable order.

    ``grid`` may also be a list of grids: the runs of each, in turn (a run listed twice is kept once), so
    sweeps with different knobs share one call, one process pool and one table (absent knobs are empty cells).
    """
    if isinstance(grid, Sequence) and not isinstance(grid, (str, bytes)):
        if not grid:
            raise ValueError(
                "grid is an empty list; give a mapping of name -> list of values, or a list of them"
            )
        runs, seen = [], set()
        for g in grid:
            for config, seed in grid_runs(g, seeds):
                key = run_key(config, seed)
                if key not in seen:
                    seen.add(key)
                    runs.append((config, seed))
        return runs
    if not isinstance(grid, Mapping) or not grid:
        raise ValueError(f"grid must be a non-empty mapping of name -> list of values, got {grid!r}")
    for name, values in grid.items():
        if name in RESERVED:
            raise ValueError(
                f"grid name {name!r} is reserved (the table has a column of that name); rename it"
            )
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
            raise ValueError(f"grid[{name!r}] must be a non-empty list of values, got {values!r}")
    seeds = list(seeds)
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ValueError(f"seeds must be a non-empty list of ints, got {seeds!r}")
    names = list(grid)
    return [
        (dict(zip(names, combo, strict=True)), s)
        for combo in itertools.product(*grid.values())
        for s in seeds
    ]


def run_key(config: Mapping[str, Any], seed: int) -> str:
    """A stable file name for a run: a hash of its config and seed (JSON with sorted keys)."""
    blob = json.dumps({"config": dict(config), "seed": seed}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def run_version(run_fn: RunFn) -> str:
    """What a finished run's numbers depend on besides its config and seed: the run function (module and name),
    the qatlab source that computes numbers, and the file of a run function defined outside qatlab. Records of
    another version are stale: :func:`ablate` runs them again."""
    from qatlab.store import source_hash

    fn = getattr(run_fn, "func", run_fn)  # a functools.partial: its function, and its arguments by repr
    arguments = repr(run_fn) if fn is not run_fn else ""
    h = hashlib.sha256(f"{_run_name(run_fn)}|{source_hash()}|{arguments}".encode())
    module = getattr(fn, "__module__", None) or "?"
    file = getattr(sys.modules.get(module), "__file__", None)
    if file and module.split(".")[0] != "qatlab":
        h.update(Path(file).read_bytes())
    return h.hexdigest()[:16]


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _call(run_fn: RunFn, config: dict[str, Any], seed: int, path: Path | None = None) -> dict[str, Any]:
    """One run, where the executor put it. With ``path`` (the run's record) a current record there is returned
    as it is (a cluster recomputes a result lost with its worker: the run is not done twice), and a new one is
    written there when its folder exists here (a folder shared with the caller; the caller writes it too)."""
    # the version as this worker computes it: one with other qatlab code is caught by the caller
    version = run_version(run_fn)
    if path is not None and _finished(path, version):
        return json.loads(path.read_text())
    start = time.perf_counter()
    metrics = dict(run_fn(dict(config), seed))
    clash = [k for k in metrics if k in config or k in RESERVED]
    if clash:
        raise ValueError(f"run_fn returned metrics named like config columns or reserved names: {clash}")
    rec = {"config": dict(config), "seed": seed, "run": _run_name(run_fn), "metrics": metrics,
           "seconds": time.perf_counter() - start, "version": version}  # fmt: skip
    if path is not None and path.parent.is_dir():
        write_atomic(path, json.dumps(rec, default=float))
    return rec


def load_records(out_dir: str | os.PathLike, run_fn: RunFn | None = None) -> list[dict[str, Any]]:
    """Every finished run under ``out_dir/runs`` as written: ``config``, ``seed``, ``metrics``, ``seconds``,
    ``version``, and ``key`` (its file name), in key order. Given ``run_fn``, only the runs of its current
    :func:`run_version` (the others are stale)."""
    version = run_version(run_fn) if run_fn is not None else None
    records = [
        {**json.loads(f.read_text()), "key": f.stem} for f in sorted((Path(out_dir) / "runs").glob("*.json"))
    ]
    return [r for r in records if version is None or r.get("version") == version]


def load_results(out_dir: str | os.PathLike, run_fn: RunFn | None = None) -> pd.DataFrame:
    """Every finished run under ``out_dir/runs`` as one row: config columns, ``seed``, metrics, ``seconds``,
    ``key``. Given ``run_fn``, only its current runs (:func:`load_records`)."""
    return pd.DataFrame(
        [{**r["config"], "seed": r["seed"], **r["metrics"], "seconds": r["seconds"], "key": r["key"]}
         for r in load_records(out_dir, run_fn)]
    )  # fmt: skip


def _finished(path: Path, version: str) -> bool:
    """A record at ``path`` of this version (``QATLAB_RECOMPUTE=1``: none is)."""
    from qatlab.store import recompute

    if recompute() or not path.exists():
        return False
    try:
        return json.loads(path.read_text()).get("version") == version
    except json.JSONDecodeError:
        return False


def dask_client(scheduler: str, timeout: float = 30.0):
    """A ``distributed.Client`` connected to the Dask scheduler at ``scheduler`` (``"tcp://host:8786"``)."""
    try:
        from distributed import Client
    except ImportError:
        raise ImportError(
            "scheduler= needs Dask's distributed package: pip install distributed (make setup installs it)"
        ) from None
    if not isinstance(scheduler, str) or "://" not in scheduler and ":" not in scheduler:
        raise ValueError(
            f"scheduler must be a Dask scheduler address like 'tcp://10.0.0.1:8786', got {scheduler!r}"
        )
    try:
        return Client(scheduler, timeout=timeout)
    except OSError as exc:
        raise ConnectionError(
            f"no Dask scheduler answered at scheduler={scheduler!r} within {timeout:.0f} s ({exc}); start one with "
            "`dask scheduler` and workers with `dask worker ADDRESS --nthreads 1`"
        ) from exc


def ablate(
    grid: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Sequence[Any]]],
    run_fn: RunFn,
    out_dir: str | os.PathLike,
    seeds: Iterable[int] = (0,),
    executor: Executor | None = None,
    workers: int | None = None,
    threads_per_worker: int | None = None,
    progress: bool = True,
    scheduler: str | None = None,
) -> pd.DataFrame:
    """Run every (config, seed) of the grid not finished yet and return the table of all finished runs.

    Args:
        grid: name -> list of values; the runs are the cross product (:func:`grid_runs`); or a list of such
            grids, whose runs are all done in one call.
        run_fn: ``run_fn(config, seed) -> {metric: value}``; module level for process pools.
        out_dir: where ``runs/<key>.json`` and ``results.csv`` go (created).
        seeds: seeds per config.
        executor: any ``concurrent.futures.Executor`` (e.g. a Dask or Ray executor); by default a process pool
            of ``workers`` processes (default: CPU count) with ``threads_per_worker`` torch threads each
            (default: CPU count / workers). ``workers=1`` runs in this process, one run after the other.
        progress: a progress bar over the pending runs.
        scheduler: a Dask scheduler's address (``"tcp://host:8786"``): the runs go to its workers through
            Dask's ``concurrent.futures`` executor (a worker lost mid-run has its run redone elsewhere), and the
            records are written here. Every worker needs the same qatlab (a run computed by other code fails).

    Raises:
        RuntimeError: when runs failed; the finished ones are saved, and calling again retries only the rest.
    """
    if scheduler is not None and executor is not None:
        raise ValueError("give executor= or scheduler=, not both (scheduler= makes a Dask executor)")
    runs = grid_runs(grid, seeds)
    out = Path(out_dir)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    version = run_version(run_fn)
    pending = [(c, s) for c, s in runs if not _finished(out / "runs" / f"{run_key(c, s)}.json", version)]
    errors: list[str] = []

    def path(config: dict[str, Any], seed: int) -> Path:
        return out / "runs" / f"{run_key(config, seed)}.json"

    def record(config: dict[str, Any], seed: int, rec: dict[str, Any]) -> None:
        if rec["version"] != version:
            raise RuntimeError(
                f"the worker's run version {rec['version']} is not this process's {version}: its qatlab source "
                f"or {_run_name(run_fn)} differs; install the same code on every worker"
            )
        if not _finished(path(config, seed), version):  # a worker that does not share this folder
            write_atomic(path(config, seed), json.dumps(rec, default=float))

    done_before = len(runs) - len(pending)
    bar = progress_bar(
        total=len(pending), desc=f"ablate ({done_before} of {len(runs)} done before)", progress=progress
    )
    cpus = os.cpu_count() or 1
    try:
        if executor is None and (workers == 1 or len(pending) <= 1):
            for config, seed in pending:
                try:
                    record(config, seed, _call(run_fn, config, seed, path(config, seed)))
                except Exception as exc:  # noqa: BLE001 - one failed run must not lose the others
                    errors.append(f"{config} seed {seed}: {type(exc).__name__}: {exc}")
                bar.update(1)
        elif pending:
            own = executor is None
            if scheduler is not None:
                client = dask_client(scheduler)
                executor = client.get_executor(pure=False)
            elif own:
                n = workers or cpus
                threads = threads_per_worker or max(1, cpus // n)
                executor = ProcessPoolExecutor(max_workers=n, initializer=_init_worker, initargs=(threads,))
            try:
                futures: dict[Future, tuple[dict[str, Any], int]] = {
                    executor.submit(_call, run_fn, c, s, path(c, s)): (c, s) for c, s in pending
                }
                for fut in as_completed(futures):
                    config, seed = futures[fut]
                    try:
                        record(config, seed, fut.result())
                    except Exception as exc:  # noqa: BLE001
                        errors.append(f"{config} seed {seed}: {type(exc).__name__}: {exc}")
                    bar.update(1)
            finally:
                if scheduler is not None:
                    executor.shutdown(wait=False)  # cancels what is left on the cluster
                    client.close()
                elif own:
                    executor.shutdown(cancel_futures=True)
    finally:
        bar.close()
        table = load_results(out, run_fn)
        if len(table):  # the grid's order (runs of other grids in the same folder last)
            order = {run_key(c, s): i for i, (c, s) in enumerate(runs)}
            table = table.sort_values("key", key=lambda k: k.map(order).fillna(len(order))).reset_index(
                drop=True
            )
        write_atomic(out / "results.csv", table.to_csv(index=False))
    if errors:
        raise RuntimeError(
            f"{len(errors)} of {len(pending)} runs failed (finished runs are saved in {out / 'runs'}; call ablate "
            "again to retry only the missing ones):\n" + "\n".join(errors[:10])
        )
    return table


def _run_name(run_fn: RunFn) -> str:
    fn = getattr(run_fn, "func", run_fn)
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', type(fn).__qualname__)}"


def summarize(table: pd.DataFrame, metric: str, by: Sequence[str]) -> pd.DataFrame:
    """Mean, std and count of ``metric`` over seeds for each combination of the ``by`` config columns."""
    missing = [c for c in (metric, *by) if c not in table.columns]
    if missing:
        raise ValueError(f"columns {missing} are not in the table; columns: {list(table.columns)}")
    return table.groupby(list(by), sort=False)[metric].agg(["mean", "std", "count"]).reset_index()


def plot_summary(table: pd.DataFrame, metric: str, x: str, hue: str | None = None, title: str = ""):
    """``metric`` against grid column ``x`` (one line per ``hue`` value), mean over seeds with +-1 std bars."""
    from qatlab.plot import metric_lines

    by = [x] if hue is None else [x, hue]
    summary = summarize(table, metric, by).fillna({"std": 0.0})
    if hue is None:
        summary = summary.assign(series=metric)
        hue = "series"
    return metric_lines(summary, x=x, y="mean", hue=hue, err="std", title=title or f"{metric} (mean +- std over seeds)",
                        ylabel=metric)  # fmt: skip


def digits_qat_run(config: dict[str, Any], seed: int) -> dict[str, Any]:
    """A small ready-made run for sweeps and the CLI: float LabCNN (width 8) on sklearn digits, then PTQ and QAT.

    Config keys (all optional): ``bits`` (weights and activations, default 4), ``per_channel`` (True),
    ``observer`` (activations, "ema"), ``ste`` ("clipped"), ``steps`` (QAT steps, 40), ``lr`` (QAT LR, 0.01).
    The QAT part is :func:`qatlab.experiments.qat_run` (4 calibration batches). Returns ``float_acc``,
    ``ptq_acc`` (the calibrated model before QAT) and ``qat_acc``. Deterministic for a given config and seed
    (1 thread).
    """
    import torch

    from qatlab.config import QATConfig, QuantSpec
    from qatlab.data import digits_loaders
    from qatlab.experiments import one_thread, qat_run
    from qatlab.models import build_model
    from qatlab.train import evaluate, fit

    known = {"bits", "per_channel", "observer", "ste", "steps", "lr"}
    unknown = set(config) - known
    if unknown:
        raise ValueError(f"digits_qat_run: unknown config keys {sorted(unknown)}; known: {sorted(known)}")
    bits = int(config.get("bits", 4))
    cfg = QATConfig(
        weight=QuantSpec(bits=bits, symmetric=True, per_channel=bool(config.get("per_channel", True))),
        activation=QuantSpec(
            bits=bits, observer=config.get("observer", "ema"), ste=config.get("ste", "clipped")
        ),
    )
    with one_thread():
        train, test = digits_loaders(batch_size=64, seed=seed)
        torch.manual_seed(seed)
        model = build_model("cnn", width=8)
        fit(model, train, epochs=3, lr=0.05, seed=seed, progress=False)
        float_acc = evaluate(model, test)["acc"]
        run = qat_run(model, cfg, train, test, steps=int(config.get("steps", 40)), calib_batches=4,
                      lr=float(config.get("lr", 0.01)), seed=seed)  # fmt: skip
    return {"float_acc": float_acc, "ptq_acc": run["ptq_acc"], "qat_acc": run["acc"]}


def read_grid_file(path: str | os.PathLike) -> dict[str, Any]:
    """A grid file (``.json``, ``.toml`` or ``.yaml``/``.yml``) with keys ``run`` ("module:function"),
    ``grid``, and optional ``seeds``, ``out``, ``workers``, ``scheduler``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"grid file {str(path)!r} not found")
    text = path.read_text()
    suffix = path.suffix.lower()
    if suffix == ".json":
        spec = json.loads(text)
    elif suffix == ".toml":
        import tomllib

        spec = tomllib.loads(text)
    elif suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ImportError(
                "YAML grid files need PyYAML: pip install pyyaml (or use .json / .toml)"
            ) from None
        spec = yaml.safe_load(text)
    else:
        raise ValueError(f"grid file {path.name!r}: use a .json, .toml or .yaml file")
    missing = [k for k in ("run", "grid") if k not in spec]
    if missing:
        raise ValueError(
            f"grid file {path.name!r} lacks {missing}; it needs run = 'module:function' and a [grid]"
        )
    return spec


def resolve_run(name: str) -> RunFn:
    """``"package.module:function"`` -> the function."""
    module, _, fn = str(name).partition(":")
    if not module or not fn:
        raise ValueError(
            f"run={name!r} must look like 'package.module:function', e.g. 'qatlab.ablate:digits_qat_run'"
        )
    return getattr(importlib.import_module(module), fn)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qatlab ablate", description=__doc__.splitlines()[0])
    parser.add_argument("grid_file", type=Path, help="JSON, TOML or YAML file with run, grid, seeds, out")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the file's 'out')")
    parser.add_argument("--workers", type=int, default=None, help="parallel processes (default: CPU count)")
    parser.add_argument("--scheduler", default=None, metavar="ADDRESS",
                        help="run on a Dask cluster: the scheduler's address, e.g. tcp://10.0.0.1:8786")  # fmt: skip
    args = parser.parse_args(argv)
    spec = read_grid_file(args.grid_file)
    out = args.out or Path(spec.get("out", Path("build") / "ablate" / args.grid_file.stem))
    table = ablate(spec["grid"], resolve_run(spec["run"]), out, seeds=spec.get("seeds", (0,)),
                   workers=args.workers or spec.get("workers"),
                   scheduler=args.scheduler or spec.get("scheduler"))  # fmt: skip
    print(table.drop(columns=["key"]).to_string(index=False))
    names = list(spec["grid"])
    metrics = [
        c for c in table.columns if c not in (*names, *RESERVED) and pd.api.types.is_numeric_dtype(table[c])
    ]
    # one figure per metric against the first grid name, one line per value of the second
    for metric in metrics:
        fig = plot_summary(table, metric, x=names[0], hue=names[1] if len(names) > 1 else None)
        fig.savefig(out / f"{metric}.png", dpi=100)
    print(f"\n{len(table)} runs -> {out / 'results.csv'}; plots: {', '.join(m + '.png' for m in metrics)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
