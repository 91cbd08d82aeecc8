"""Range estimation: the observers that decide which [min, max] a tensor is quantized over.

Four estimators (Nagel et al. 2021, section 3.4), each per tensor or per channel:

- ``minmax``: the running min and max of everything seen. Exact cover, sensitive to outliers.
- ``ema``: an exponential moving average of each batch's min and max (Jacob et al. 2018); the usual
  choice for activations during QAT.
- ``percentile``: the p-th percentile of each batch (of |x| when symmetric), averaged over batches; clips
  outliers on purpose.
- ``mse``: the clipping range that minimises the mean squared quantization error of each batch, found by a
  grid search over shrunk min-max ranges, averaged over batches.

Example:
    >>> import torch
    >>> from qatlab.config import QuantSpec
    >>> obs = make_observer(QuantSpec(bits=8, observer="minmax"))
    >>> _ = obs(torch.tensor([-1.0, 0.5, 3.0]))
    >>> obs.min_val, obs.max_val
    (tensor([-1.]), tensor([3.]))
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qatlab.config import QuantSpec
from qatlab.quant import channel_axis, fake_quant, qparams_unchecked

# torch.quantile refuses inputs above 2**24 elements, and the MSE search runs 36 fake-quant passes: a strided
# subsample of a large batch keeps the estimate (the range of the tails still comes from the full batch for
# MSE) and the speed.
_MAX_QUANTILE_SAMPLES = 1 << 18
_MAX_MSE_SAMPLES = 1 << 16
_MSE_GRID = torch.linspace(0.3, 1.0, 36)


def _sync_range(lo: Tensor, hi: Tensor, average: bool) -> tuple[Tensor, Tensor]:
    """Combine one batch's range over all ranks of the default process group (a no-op without one).

    Min/max observers take the min of the mins and the max of the maxes: the range of the global batch.
    Averaging estimators (percentile, MSE) average the ranks' estimates. Every rank must call this the same
    number of times (it is a collective), which DDP's lockstep training guarantees.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return lo, hi
    lo, hi = lo.clone(), hi.clone()
    if average:
        both = torch.stack([lo, hi])
        dist.all_reduce(both, op=dist.ReduceOp.SUM)
        both /= dist.get_world_size()
        return both[0], both[1]
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return lo, hi


NOT_FINITE = (
    "observed data contains NaN or inf; quantization ranges must be finite "
    "(check the calibration data and the model's float outputs)"
)


class Observer(nn.Module):
    """Base observer: keeps ``min_val``/``max_val`` buffers ((1,) per tensor, (C,) per channel).

    Calling it on a tensor updates the range and returns the tensor unchanged. ``qparams()`` turns the range
    into (scale, zero_point). The buffers are in the state dict, so a calibrated model saves and loads.

    ``sync_ranks`` (off by default; ``qatlab.distributed.sync_observers`` turns it on): each batch's range is
    combined over all ranks of the process group before it is merged, so every rank holds the same range,
    the one of the global batch (torch.ao's observers keep per-rank ranges).
    """

    sync_ranks: bool = False
    _averages_batches: bool = False
    # its update compiles as one graph (fit(compile=True) compiles a training step only when every live
    # observer's does): the running min/max and the moving average; the averaging observers count batches
    # with a Python float, and percentile/MSE search per batch
    compiles: bool = False

    def __init__(self, spec: QuantSpec, num_channels: int | None = None) -> None:
        super().__init__()
        if spec.per_channel and (num_channels is None or num_channels < 1):
            raise ValueError(
                f"num_channels={num_channels!r}: a per-channel observer needs the channel count "
                "(e.g. conv.out_channels)"
            )
        self.spec = spec
        n = num_channels if spec.per_channel else 1
        self.register_buffer("min_val", torch.zeros(n))
        self.register_buffer("max_val", torch.zeros(n))
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("num_batches", torch.tensor(0))

    def _rows(self, x: Tensor) -> Tensor:
        """View ``x`` as rows, one per channel: (C, N) per channel, (1, N) per tensor."""
        axis = channel_axis(x, self.spec)
        if axis < 0:
            return x.reshape(1, -1)
        rows = x.transpose(0, axis).reshape(x.shape[axis], -1)
        if rows.shape[0] != self.min_val.numel():
            raise ValueError(
                f"tensor has {rows.shape[0]} channels along ch_axis={self.spec.ch_axis}, "
                f"but the observer was built for {self.min_val.numel()}"
            )
        return rows

    def _batch_range(self, rows: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        """This batch's range estimate from ``rows`` ((C, N) per channel; the tensor itself per tensor, see
        :meth:`_flat`); ``lo``/``hi`` are its plain min and max, already computed."""
        return lo, hi

    def _flat(self, rows: Tensor) -> Tensor:
        """``rows`` as a 2-D (C, N) tensor: per tensor, a (1, N) copy or view of the tensor."""
        return rows if self.spec.per_channel else rows.reshape(1, -1)

    def _combine(self, lo: Tensor, hi: Tensor) -> None:
        """Merge this batch's range into the running one (subclasses pick the rule)."""
        self.min_val.copy_(torch.minimum(self.min_val, lo))
        self.max_val.copy_(torch.maximum(self.max_val, hi))

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        if x.numel() == 0:
            raise ValueError(f"cannot observe an empty tensor of shape {tuple(x.shape)}: it has no range")
        data = x.detach().float()
        # One pass for min and max. Per tensor, the reduction runs on x as it is laid out (a (1, N) view of a
        # channels-last tensor would first copy it); a NaN or inf anywhere shows up in lo / hi.
        if self.spec.per_channel:
            rows = self._rows(data)
            lo, hi = torch.aminmax(rows, dim=1)
        else:
            rows = data
            lo, hi = (t.reshape(1) for t in torch.aminmax(data))
        if torch.compiler.is_compiling():  # inside a compiled training step: no data-dependent branch
            return self._compiled_forward(x, rows, lo, hi)
        if not bool(torch.isfinite(torch.cat([lo, hi])).all()):
            raise ValueError(NOT_FINITE)
        lo, hi = self._batch_range(rows, lo, hi)
        if self.sync_ranks:
            lo, hi = _sync_range(lo, hi, self._averages_batches)
        if not bool(self.initialized):
            self.min_val.copy_(lo)
            self.max_val.copy_(hi)
            self.initialized.fill_(True)
        else:
            self._combine(lo, hi)
        self.num_batches += 1
        return x

    def _compiled_forward(self, x: Tensor, rows: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        """:meth:`forward` as one graph (``fit(compile=True)``): the NaN check asserts inside the compiled code,
        and a first batch starts from its own range (which the rules of the observers that set :attr:`compiles`,
        the running min/max and the moving average, then keep when they merge it)."""
        torch._assert_async(torch.isfinite(torch.cat([lo, hi])).all(), NOT_FINITE)
        lo, hi = self._batch_range(rows, lo, hi)
        if self.sync_ranks:  # a collective: the graph splits here, the ranges stay the global batch's
            lo, hi = _sync_range(lo, hi, self._averages_batches)
        self.min_val.copy_(torch.where(self.initialized, self.min_val, lo))
        self.max_val.copy_(torch.where(self.initialized, self.max_val, hi))
        self._combine(lo, hi)
        self.initialized.fill_(True)
        self.num_batches += 1
        return x

    def qparams(self) -> tuple[Tensor, Tensor]:
        """(scale, zero_point) for the observed range; raises if nothing was observed yet."""
        if not torch.compiler.is_compiling() and not bool(self.initialized):
            raise RuntimeError(
                "observer has seen no data, so there is no range to quantize with: run calibrate(model, loader) "
                "or a training step with observers enabled first"
            )
        # the range is finite (checked in forward) and ordered by construction: no need for qparams' checks
        if self.spec.format != "int":
            from qatlab.formats import stored_qparams

            return stored_qparams(self.min_val, self.max_val, self.spec)
        return qparams_unchecked(self.min_val, self.max_val, self.spec)

    def reset(self) -> None:
        self.initialized.fill_(False)
        self.num_batches.zero_()

    def extra_repr(self) -> str:
        return f"bits={self.spec.bits}, per_channel={self.spec.per_channel}, symmetric={self.spec.symmetric}"


class MinMaxObserver(Observer):
    """Running min and max over everything seen."""

    compiles = True


class EMAObserver(Observer):
    """Exponential moving average of batch min/max: ``r <- r + c * (r_batch - r)``."""

    compiles = True

    def _combine(self, lo: Tensor, hi: Tensor) -> None:
        c = self.spec.averaging_constant
        self.min_val.add_(c * (lo - self.min_val))
        self.max_val.add_(c * (hi - self.max_val))


class _AveragingObserver(Observer):
    """Averages a per-batch range estimate over batches (equal weights)."""

    _averages_batches = True

    def _combine(self, lo: Tensor, hi: Tensor) -> None:
        n = float(self.num_batches)  # batches already merged
        self.min_val.add_((lo - self.min_val) / (n + 1))
        self.max_val.add_((hi - self.max_val) / (n + 1))


class PercentileObserver(_AveragingObserver):
    """Per-batch percentile range: of |x| when symmetric, of both tails otherwise."""

    def _batch_range(self, rows: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        rows = self._flat(rows)
        if rows.shape[1] > _MAX_QUANTILE_SAMPLES:
            rows = rows[:, :: rows.shape[1] // _MAX_QUANTILE_SAMPLES + 1]
        p = self.spec.percentile / 100.0
        if self.spec.symmetric:
            amax = torch.quantile(rows.abs(), p, dim=1)
            return -amax, amax
        return torch.quantile(rows, 1.0 - p, dim=1), torch.quantile(rows, p, dim=1)


class MSEObserver(_AveragingObserver):
    """Per-batch range minimising ||x - fake_quant(x)||^2 over shrunk min-max ranges (a grid of 36)."""

    def _batch_range(self, rows: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        # candidates shrink the full batch's range (lo, hi)
        rows = self._flat(rows)
        if rows.shape[1] > _MAX_MSE_SAMPLES:
            rows = rows[:, :: rows.shape[1] // _MAX_MSE_SAMPLES + 1]
        row_spec = self.spec.with_(per_channel=True, ch_axis=0, ste="clipped")
        best_err = torch.full_like(lo, float("inf"))
        best_lo, best_hi = lo.clone(), hi.clone()
        for alpha in _MSE_GRID.tolist():
            s, z = qparams_unchecked(lo * alpha, hi * alpha, row_spec)
            err = (fake_quant(rows, s.to(rows.device), z.to(rows.device), row_spec) - rows).pow(2).mean(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo = torch.where(better, lo * alpha, best_lo)
            best_hi = torch.where(better, hi * alpha, best_hi)
        return best_lo, best_hi


OBSERVER_CLASSES: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "ema": EMAObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
}


def make_observer(spec: QuantSpec, num_channels: int | None = None) -> Observer:
    """The observer named by ``spec.observer``, sized for ``num_channels`` when per channel.

    ``"dynamic"`` gets a min-max observer: a dynamic quantizer never reads it for its qparams (each tensor uses
    its own range), but calibration still records the range seen, for inspection.
    """
    return OBSERVER_CLASSES["minmax" if spec.observer == "dynamic" else spec.observer](spec, num_channels)
