"""Tests for qatlab.observers: each range estimator checked against numpy, torch or a hand computation."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from qatlab.config import OBSERVERS, QuantSpec
from qatlab.observers import (
    EMAObserver,
    MinMaxObserver,
    MSEObserver,
    Observer,
    PercentileObserver,
    make_observer,
)
from qatlab.quant import fake_quant, qparams

NAMES = [n for n in OBSERVERS if n != "dynamic"]  # "dynamic" stores no range: see test_transformer.py


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batches(n: int, shape: tuple[int, ...], seed: int = 0, scale: float = 1.0) -> list[torch.Tensor]:
    g = _gen(seed)
    # Different offsets per batch, so a rule that only keeps the first or the last batch gives other numbers.
    return [torch.randn(shape, generator=g) * scale + 0.3 * (i - 1) for i in range(n)]


def _np_channel_range(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    others = tuple(d for d in range(x.ndim) if d != axis % x.ndim)
    return x.min(axis=others), x.max(axis=others)


def _mse(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> float:
    """Quantization MSE of ``x`` over the range [lo, hi] (per tensor: (1,) tensors)."""
    s, z = qparams(lo, hi, spec)
    return float((fake_quant(x, s, z, spec) - x).double().pow(2).mean())


# ---- minmax ----------------------------------------------------------------------------------------------


def test_minmax_per_tensor_is_global_range_of_all_batches() -> None:
    spec = QuantSpec(bits=8, observer="minmax")
    obs = make_observer(spec)
    batches = _batches(4, (32, 5), seed=1)
    for b in batches:
        obs(b)
    everything = torch.cat(batches).numpy()
    assert obs.min_val.shape == (1,) and obs.max_val.shape == (1,)
    assert obs.min_val.item() == everything.min()
    assert obs.max_val.item() == everything.max()
    assert int(obs.num_batches) == 4
    s_ref, z_ref = qparams(torch.tensor(everything.min()), torch.tensor(everything.max()), spec)
    s, z = obs.qparams()
    assert torch.equal(s, s_ref) and torch.equal(z, z_ref)


@pytest.mark.parametrize(
    ("shape", "ch_axis", "cat_dim"),
    [
        ((6, 7), 0, 1),  # linear weight (out, in)
        ((5, 4, 3, 3), 1, 0),  # conv activation (N, C, H, W), batches along N
        ((5, 4, 3, 3), 0, 1),  # conv weight (out, in, kh, kw)
        ((2, 3, 4, 6), -1, 0),  # channels last
    ],
)
def test_minmax_per_channel_matches_numpy_amin_amax(
    shape: tuple[int, ...], ch_axis: int, cat_dim: int
) -> None:
    n_ch = shape[ch_axis]
    obs = make_observer(QuantSpec(bits=8, symmetric=True, per_channel=True, ch_axis=ch_axis), n_ch)
    batches = _batches(3, shape, seed=2)
    for b in batches:
        assert obs(b) is b
    ref_lo, ref_hi = _np_channel_range(torch.cat(batches, dim=cat_dim).numpy(), ch_axis)
    assert obs.min_val.shape == (n_ch,)
    np.testing.assert_array_equal(obs.min_val.numpy(), ref_lo)
    np.testing.assert_array_equal(obs.max_val.numpy(), ref_hi)
    # The channels must really differ, else a per-tensor answer would pass too.
    assert len(set(ref_hi.tolist())) == n_ch


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_minmax_per_channel_on_cuda_matches_numpy() -> None:
    obs = make_observer(QuantSpec(bits=8, per_channel=True, ch_axis=1), 4).to("cuda")
    batches = [b.to("cuda") for b in _batches(3, (8, 4, 5, 5), seed=3)]
    for b in batches:
        assert obs(b) is b
    ref_lo, ref_hi = _np_channel_range(torch.cat(batches).cpu().numpy(), 1)
    assert obs.min_val.device.type == "cuda"
    np.testing.assert_array_equal(obs.min_val.cpu().numpy(), ref_lo)
    np.testing.assert_array_equal(obs.max_val.cpu().numpy(), ref_hi)
    s, z = obs.qparams()
    s_ref, z_ref = qparams(torch.from_numpy(ref_lo), torch.from_numpy(ref_hi), obs.spec)
    torch.testing.assert_close(s.cpu(), s_ref)
    assert torch.equal(z.cpu(), z_ref)


# ---- ema -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("c", [0.5, 0.2])  # 0.2 as well: at 0.5, c and 1 - c cannot be told apart
def test_ema_first_batch_sets_range_then_moving_average(per_channel: bool, c: float) -> None:
    spec = QuantSpec(bits=8, observer="ema", averaging_constant=c, per_channel=per_channel, ch_axis=1)
    obs = make_observer(spec, 3 if per_channel else None)
    assert isinstance(obs, EMAObserver)
    batches = _batches(3, (16, 3), seed=4)
    lo = hi = None
    for i, b in enumerate(batches):
        obs(b)
        a = b.numpy().astype(np.float64)
        b_lo, b_hi = (
            (a.min(axis=0), a.max(axis=0)) if per_channel else (a.min().reshape(1), a.max().reshape(1))
        )
        if i == 0:
            lo, hi = b_lo, b_hi
            np.testing.assert_array_equal(obs.min_val.numpy(), b_lo.astype(np.float32))
            np.testing.assert_array_equal(obs.max_val.numpy(), b_hi.astype(np.float32))
        else:
            lo = lo + c * (b_lo - lo)
            hi = hi + c * (b_hi - hi)
    np.testing.assert_allclose(obs.min_val.numpy(), lo, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(obs.max_val.numpy(), hi, rtol=1e-6, atol=1e-6)
    # Not the plain min/max: the averaging pulls the range inside the global one.
    allv = torch.cat(batches).numpy()
    assert (obs.max_val.numpy() < allv.max(axis=0 if per_channel else None)).all()


# ---- percentile ------------------------------------------------------------------------------------------


def test_percentile_per_tensor_asymmetric_matches_quantile_and_numpy() -> None:
    p = 99.0
    obs = make_observer(QuantSpec(bits=8, observer="percentile", percentile=p))
    assert isinstance(obs, PercentileObserver)
    x = torch.randn(50, 40, generator=_gen(5)) * 2.0 + 0.5
    obs(x)
    np_lo, np_hi = np.percentile(x.numpy().astype(np.float64), [100 - p, p])
    torch_lo = torch.quantile(x.flatten(), (100 - p) / 100)
    torch_hi = torch.quantile(x.flatten(), p / 100)
    torch.testing.assert_close(obs.min_val, torch_lo.reshape(1))
    torch.testing.assert_close(obs.max_val, torch_hi.reshape(1))
    np.testing.assert_allclose(obs.min_val.item(), np_lo, rtol=1e-5)
    np.testing.assert_allclose(obs.max_val.item(), np_hi, rtol=1e-5)
    assert x.min() < obs.min_val.item() < obs.max_val.item() < x.max()


def test_percentile_symmetric_uses_abs() -> None:
    p = 95.0
    obs = make_observer(QuantSpec(bits=8, symmetric=True, observer="percentile", percentile=p))
    # Skewed data: the positive tail is much longer, so percentiles of x and of |x| differ.
    x = torch.cat([torch.rand(900, generator=_gen(6)) * 10.0, -torch.rand(100, generator=_gen(7))])
    obs(x)
    amax = np.percentile(np.abs(x.numpy().astype(np.float64)), p)
    np.testing.assert_allclose(obs.max_val.item(), amax, rtol=1e-5)
    np.testing.assert_allclose(obs.min_val.item(), -amax, rtol=1e-5)
    s, z = obs.qparams()
    np.testing.assert_allclose(s.item(), amax / 127, rtol=1e-5)
    assert z.item() == 0


def test_percentile_per_channel_matches_numpy_along_axis() -> None:
    p = 90.0
    obs = make_observer(
        QuantSpec(bits=8, per_channel=True, ch_axis=1, observer="percentile", percentile=p), 3
    )
    x = torch.randn(200, 3, generator=_gen(8)) * torch.tensor([0.1, 1.0, 10.0])
    obs(x)
    a = x.numpy().astype(np.float64)
    np.testing.assert_allclose(obs.min_val.numpy(), np.percentile(a, 100 - p, axis=0), rtol=1e-5)
    np.testing.assert_allclose(obs.max_val.numpy(), np.percentile(a, p, axis=0), rtol=1e-5)


@pytest.mark.parametrize("name", ["percentile", "mse"])
def test_averaging_observers_average_batch_estimates_with_equal_weights(name: str) -> None:
    spec = QuantSpec(bits=4, observer=name, percentile=98.0)
    batches = _batches(3, (400,), seed=9, scale=1.5)
    singles = []
    for b in batches:
        one = make_observer(spec)
        one(b)
        singles.append((one.min_val.item(), one.max_val.item()))
    obs = make_observer(spec)
    for k, b in enumerate(batches, start=1):
        obs(b)
        mean_lo = np.mean([s[0] for s in singles[:k]])
        mean_hi = np.mean([s[1] for s in singles[:k]])
        np.testing.assert_allclose(obs.min_val.item(), mean_lo, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(obs.max_val.item(), mean_hi, rtol=1e-6, atol=1e-7)
    # The batch estimates really differ, so equal weights is a real check (not min/max, not last-only).
    assert len({round(s[1], 6) for s in singles}) == 3


def test_percentile_clips_a_single_huge_outlier() -> None:
    x = torch.randn(10_000, generator=_gen(10))
    x[1234] = 1000.0
    pct = make_observer(QuantSpec(bits=8, observer="percentile", percentile=99.9))
    mm = make_observer(QuantSpec(bits=8, observer="minmax"))
    pct(x)
    mm(x)
    pct_width = (pct.max_val - pct.min_val).item()
    mm_width = (mm.max_val - mm.min_val).item()
    assert mm_width / pct_width > 100.0
    # And its scale is correspondingly finer.
    assert mm.qparams()[0].item() / pct.qparams()[0].item() > 100.0


def test_percentile_subsamples_large_tensors_without_losing_accuracy() -> None:
    x = torch.randn((1 << 21) + 3, generator=_gen(11))
    obs = make_observer(QuantSpec(bits=8, observer="percentile", percentile=99.0))
    obs(x)
    lo, hi = np.percentile(x.numpy(), [1.0, 99.0])
    # A third of the values are used; the estimate of a 1% tail from ~700k samples is good to ~1%.
    np.testing.assert_allclose([obs.min_val.item(), obs.max_val.item()], [lo, hi], rtol=1e-2)


# ---- mse -------------------------------------------------------------------------------------------------


def test_mse_4bit_gaussian_range_beats_minmax_and_a_fine_grid() -> None:
    spec = QuantSpec(bits=4, observer="mse")
    x = torch.randn(10_000, generator=_gen(12))
    obs = make_observer(spec)
    assert isinstance(obs, MSEObserver)
    obs(x)
    lo, hi = x.min().reshape(1), x.max().reshape(1)
    assert lo.item() < obs.min_val.item() < obs.max_val.item() < hi.item()
    chosen = _mse(x, obs.min_val, obs.max_val, spec)
    minmax = _mse(x, lo, hi, spec)
    assert chosen <= minmax
    assert chosen < 0.7 * minmax  # at 4 bits clipping a Gaussian's tails pays a lot
    # Also the range the observer itself reports turns into the same qparams as the one we scored.
    torch.testing.assert_close(obs.qparams()[0], qparams(obs.min_val, obs.max_val, spec)[0])
    for alpha in np.linspace(0.2, 1.0, 401):
        for beta in (alpha - 0.05, alpha, alpha + 0.05):  # also asymmetric shrinking of the two ends
            if not 0.0 < beta <= 1.0:
                continue
            other = _mse(x, lo * float(alpha), hi * float(beta), spec)
            assert chosen <= other * 1.01, (alpha, beta, chosen, other)


@pytest.mark.parametrize("symmetric", [False, True])
def test_mse_8bit_range_is_close_to_minmax(symmetric: bool) -> None:
    spec = QuantSpec(bits=8, symmetric=symmetric, observer="mse")
    x = torch.randn(10_000, generator=_gen(13))
    obs = make_observer(spec)
    obs(x)
    ratio_lo = obs.min_val.item() / x.min().item()
    ratio_hi = obs.max_val.item() / x.max().item()
    # At 8 bits the rounding error dominates: the best clip is within a few grid steps (0.02) of min-max.
    assert 0.9 <= ratio_lo <= 1.0 and 0.9 <= ratio_hi <= 1.0
    assert _mse(x, obs.min_val, obs.max_val, spec) <= _mse(x, x.min().reshape(1), x.max().reshape(1), spec)


def test_mse_per_channel_picks_a_range_per_channel() -> None:
    spec = QuantSpec(bits=4, symmetric=True, per_channel=True, ch_axis=0, observer="mse")
    sig = torch.tensor([0.01, 1.0, 50.0])
    x = torch.randn(3, 2000, generator=_gen(14)) * sig[:, None]
    x[2, 7] = 400.0  # an outlier only in channel 2: it should be clipped harder there
    obs = make_observer(spec, 3)
    obs(x)
    ch_spec = spec.with_(per_channel=False)
    ratios = []
    for c in range(3):
        one = make_observer(ch_spec)
        one(x[c])
        torch.testing.assert_close(obs.min_val[c : c + 1], one.min_val)
        torch.testing.assert_close(obs.max_val[c : c + 1], one.max_val)
        amax = torch.maximum(-obs.min_val[c], obs.max_val[c]).item()
        ratios.append(amax / x[c].abs().max().item())
        assert ratios[-1] < 1.0
        full = x[c].abs().max().reshape(1)
        assert _mse(x[c], -amax * torch.ones(1), amax * torch.ones(1), ch_spec) < _mse(
            x[c], -full, full, ch_spec
        )
    # The ranges follow each channel's spread (in units of sigma they agree), and the channel with the
    # outlier is clipped much harder (about 0.32 of its max, against 0.6-0.66 for the plain Gaussians).
    in_sigmas = (obs.max_val / sig).numpy()
    np.testing.assert_allclose(in_sigmas[0], in_sigmas[1], rtol=0.3)
    assert ratios[2] < 0.7 * min(ratios[:2])
    s, _ = obs.qparams()
    assert s.shape == (3,) and s[0] < s[1] < s[2]


# ---- errors ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_qparams_before_data_raises_runtime_error(name: str) -> None:
    obs = make_observer(QuantSpec(observer=name))
    with pytest.raises(RuntimeError, match="calibrate"):
        obs.qparams()


@pytest.mark.parametrize("name", NAMES)
def test_empty_tensor_raises_and_leaves_observer_untouched(name: str) -> None:
    obs = make_observer(QuantSpec(observer=name))
    with pytest.raises(ValueError, match="empty"):
        obs(torch.empty(0, 3))
    assert not bool(obs.initialized) and int(obs.num_batches) == 0


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_or_inf_raises_and_does_not_corrupt_range(name: str, bad: float) -> None:
    obs = make_observer(QuantSpec(observer=name))
    good = torch.tensor([-1.0, 0.0, 2.0])
    obs(good)
    before = (obs.min_val.clone(), obs.max_val.clone(), int(obs.num_batches))
    with pytest.raises(ValueError, match="NaN"):
        obs(torch.tensor([0.5, bad, 1.0]))
    assert torch.equal(obs.min_val, before[0]) and torch.equal(obs.max_val, before[1])
    assert int(obs.num_batches) == before[2]
    assert torch.isfinite(obs.qparams()[0]).all()


@pytest.mark.parametrize("num_channels", [None, 0])
def test_per_channel_without_num_channels_raises(num_channels: int | None) -> None:
    with pytest.raises(ValueError, match="num_channels"):
        make_observer(QuantSpec(per_channel=True), num_channels)


@pytest.mark.parametrize("name", NAMES)
def test_wrong_channel_count_raises(name: str) -> None:
    obs = make_observer(QuantSpec(per_channel=True, ch_axis=1, observer=name), 4)
    with pytest.raises(ValueError, match="5 channels"):
        obs(torch.randn(2, 5, 3))
    assert not bool(obs.initialized)


def test_channel_axis_out_of_range_raises() -> None:
    obs = make_observer(QuantSpec(per_channel=True, ch_axis=2), 3)
    with pytest.raises(ValueError, match="ch_axis=2"):
        obs(torch.randn(3, 3))


def test_per_channel_observer_on_scalar_tensor_raises_value_error() -> None:
    obs = make_observer(QuantSpec(per_channel=True), 1)
    with pytest.raises(ValueError, match="ch_axis"):
        obs(torch.tensor(2.0))


# ---- state dict, reset -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("per_channel", [False, True])
def test_state_dict_round_trip(name: str, per_channel: bool) -> None:
    spec = QuantSpec(bits=6, per_channel=per_channel, ch_axis=1, observer=name, averaging_constant=0.3)
    n_ch = 4 if per_channel else None
    obs = make_observer(spec, n_ch)
    for b in _batches(3, (64, 4), seed=15):
        obs(b)
    buf = io.BytesIO()
    torch.save(obs.state_dict(), buf)
    buf.seek(0)
    fresh = make_observer(spec, n_ch)
    assert not bool(fresh.initialized)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert bool(fresh.initialized)
    assert int(fresh.num_batches) == 3
    s, z = obs.qparams()
    s2, z2 = fresh.qparams()
    assert torch.equal(s, s2) and torch.equal(z, z2)
    assert torch.equal(fresh.min_val, obs.min_val) and torch.equal(fresh.max_val, obs.max_val)


@pytest.mark.parametrize("name", NAMES)
def test_reloaded_observer_continues_like_an_uninterrupted_one(name: str) -> None:
    spec = QuantSpec(bits=4, observer=name, averaging_constant=0.3, percentile=97.0)
    batches = _batches(4, (500,), seed=16)
    straight = make_observer(spec)
    for b in batches:
        straight(b)
    first = make_observer(spec)
    for b in batches[:2]:
        first(b)
    resumed = make_observer(spec)
    resumed.load_state_dict(first.state_dict())
    for b in batches[2:]:
        resumed(b)
    assert int(resumed.num_batches) == 4
    torch.testing.assert_close(resumed.min_val, straight.min_val, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(resumed.max_val, straight.max_val, rtol=1e-6, atol=1e-7)
    if name in ("percentile", "mse"):
        # Had num_batches been lost, the third batch would get weight 1/2 instead of 1/3: a visible gap.
        lost = make_observer(spec)
        lost.load_state_dict({**first.state_dict(), "num_batches": torch.tensor(1)})
        for b in batches[2:]:
            lost(b)
        assert abs(lost.max_val.item() - straight.max_val.item()) > 1e-3


@pytest.mark.parametrize("name", NAMES)
def test_reset_clears_initialized_and_restarts_the_range(name: str) -> None:
    obs = make_observer(QuantSpec(bits=8, observer=name, percentile=100.0))
    obs(torch.tensor([-5.0, 0.0, 5.0]))
    obs.reset()
    assert not bool(obs.initialized) and int(obs.num_batches) == 0
    with pytest.raises(RuntimeError, match="calibrate"):
        obs.qparams()
    small = torch.tensor([-0.5, 0.1, 0.25])
    obs(small)
    # The old range is forgotten: the new one comes from the new batch alone (mse may clip it a little).
    assert -0.5 <= obs.min_val.item() < 0.0 < obs.max_val.item() <= 0.25
    if name != "mse":
        assert obs.min_val.item() == -0.5 and obs.max_val.item() == 0.25


# ---- pass-through, degenerate ranges, factory ------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_observer_returns_input_unchanged_and_records_no_autograd(name: str) -> None:
    obs = make_observer(QuantSpec(bits=4, per_channel=True, ch_axis=0, observer=name), 3)
    x = torch.randn(3, 50, generator=_gen(17), requires_grad=True)
    ref = x.detach().clone()
    version = x._version
    y = obs(x)
    assert torch.equal(y, ref)
    assert x._version == version  # not modified in place
    assert y.grad_fn is None  # no node was added for the observer
    for buf in (obs.min_val, obs.max_val):
        assert not buf.requires_grad and buf.grad_fn is None
    # Gradients flow straight through, untouched.
    (y * 2.0).sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))
    # An intermediate (non-leaf) input keeps its own history, nothing wraps it.
    h = x * 3.0
    assert obs(h).grad_fn is h.grad_fn


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("value", [0.0, 3.0, -2.0])
def test_zero_range_data_gives_finite_positive_scale(name: str, symmetric: bool, value: float) -> None:
    spec = QuantSpec(bits=8, symmetric=symmetric, observer=name)
    obs = make_observer(spec)
    x = torch.full((4, 5), value)
    obs(x)
    s, z = obs.qparams()
    assert torch.isfinite(s).all() and (s > 0).all()
    assert spec.qmin <= z.item() <= spec.qmax
    # The constant itself survives quantization to within half a step (exactly, for zero).
    err = (fake_quant(x, s, z, spec) - x).abs().max().item()
    assert err <= 0.5 * s.item() + 1e-6
    if value == 0.0:
        assert err == 0.0


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("minmax", MinMaxObserver),
        ("ema", EMAObserver),
        ("percentile", PercentileObserver),
        ("mse", MSEObserver),
    ],
)
def test_make_observer_returns_the_named_class(name: str, cls: type[Observer]) -> None:
    obs = make_observer(QuantSpec(observer=name))
    assert type(obs) is cls and isinstance(obs, Observer)
    assert obs.min_val.shape == (1,)
    pc = make_observer(QuantSpec(observer=name, per_channel=True), 7)
    assert type(pc) is cls and pc.min_val.shape == (7,) and pc.max_val.shape == (7,)
    assert pc.spec.observer == name


def test_sync_ranks_outside_a_process_group_changes_nothing():
    """Without torch.distributed initialised, a synced observer behaves as a plain one (the sync is a no-op)."""
    spec = QuantSpec(bits=8, observer="ema")
    a, b = make_observer(spec), make_observer(spec)
    b.sync_ranks = True
    for x in (torch.randn(100), 3 * torch.randn(100) + 1):
        a(x)
        b(x)
    assert torch.equal(a.min_val, b.min_val) and torch.equal(a.max_val, b.max_val)


@pytest.mark.parametrize("cls", [MinMaxObserver, EMAObserver])
def test_compiling_observers_update_as_eager_in_one_graph_and_reject_nan(cls):
    """fit(compile=True) needs the min-max and moving-average updates as one graph (fullgraph: no break at the
    first batch or the NaN check); they give eager's ranges bit for bit, and NaN still raises."""
    compiled_observer, eager = cls(QuantSpec(bits=8)), cls(QuantSpec(bits=8))
    compiled = torch.compile(compiled_observer, fullgraph=True)
    assert cls.compiles
    for batch in (torch.tensor([-1.0, 2.0]), torch.tensor([-3.0, 1.0]), torch.tensor([0.5, 4.0])):
        compiled(batch)
        eager(batch)
    for name in ("min_val", "max_val", "num_batches", "initialized"):
        assert torch.equal(getattr(compiled_observer, name), getattr(eager, name)), name
    with pytest.raises(RuntimeError, match="NaN or inf"):
        compiled(torch.tensor([float("nan"), 1.0]))
    assert not PercentileObserver.compiles and not MSEObserver.compiles
