"""Bit-exact reference tests for ``qatlab.formats.fake_quant``: per-group and per-token int, FP8 (E4M3, E5M2),
MXFP8, MXFP4 and NVFP4.

Every reference below is written from the formats' definitions in plain numpy float32, in the op order the
format fixes (``v / s`` is a division, amax before the scale, ...), without calling qatlab's own helpers. The
only float64 arithmetic is the minifloat rounding (:func:`minifloat_round`), where it is exact: a float32 value
divided by a power of two, rounded to an integer and multiplied back. FP8 is also checked against torch's own
``float8_e4m3fn`` / ``float8_e5m2`` casts, which the spec names as the rounding FP8 must match, and the numpy
minifloat rounding is checked against those casts on (and between) every E4M3 and E5M2 value.

The inputs are drawn by hypothesis (shapes, block axes, seeds) and built by numpy from the seed: Gaussian blocks
at magnitudes 2**-30 .. 2**30, blocks of exact ties (values exactly halfway between two grid points after the
scale, with the scale a power of two so that the tie survives the division), near ties with arbitrary scales
(where ``v / s`` and ``v * (1 / s)`` can differ), all-zero blocks, constant blocks, float32 subnormals and, for MX,
huge blocks near 2**120. Results are compared with ``np.array_equal`` (so -0.0 == 0.0) and must hold no NaN.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qatlab
from qatlab import QuantSpec, formats

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

F32 = np.float32
EPS = F32(2.0**-23)  # float32 machine epsilon: the smallest int / FP8 scale
MIN_NORMAL = F32(2.0**-126)
TINY = 2.0**-149  # the smallest float32 subnormal

# name: (exponent bits, mantissa bits, exponent bias, largest finite value)
MINIFLOATS = {
    "e4m3": (4, 3, 7, 448.0),  # E4M3FN: no infinities, S.1111.111 is NaN, so 1.75 * 2**8 is the top
    "e5m2": (5, 2, 15, 57344.0),  # IEEE-like: exponent 31 is inf/NaN, so 1.75 * 2**15 is the top
    "e2m1": (2, 1, 1, 6.0),  # OCP FP4: no inf/NaN, 1.5 * 2**2 is the top
}
TORCH_FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
FP8_FORMATS = {"fp8_e4m3": "e4m3", "fp8_e5m2": "e5m2"}
MX_FORMATS = {"mxfp8": ("e4m3", 8), "mxfp4": ("e2m1", 2)}  # element, emax_elem
E2M1_VALUES = [-6, -4, -3, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3, 4, 6]


# ----------------------------------------------------------------------------------------------------------
# Minifloat value sets and rounding (independent of torch and of qatlab)
# ----------------------------------------------------------------------------------------------------------


def minifloat_values(name: str) -> np.ndarray:
    """Every finite value of the minifloat ``name``, sorted, negatives included, zero once (float64)."""
    ebits, mbits, bias, top = MINIFLOATS[name]
    pos = [k * 2.0 ** (1 - bias - mbits) for k in range(2**mbits)]  # zero and the subnormals
    for e in range(1, 2**ebits):
        for k in range(2**mbits):
            v = (1 + k / 2**mbits) * 2.0 ** (e - bias)
            if v <= top:
                pos.append(v)
    pos = np.array(sorted(set(pos)))
    return np.concatenate([-pos[:0:-1], pos])


def positive_values(name: str) -> np.ndarray:
    """The non-negative values of ``name``, ascending; the index of a value is its code (sign bit 0)."""
    v = minifloat_values(name)
    return v[v >= 0]


def midpoints(name: str) -> np.ndarray:
    """The positive points exactly halfway between two consecutive values of ``name``."""
    p = positive_values(name)
    return (p[:-1] + p[1:]) / 2


def minifloat_round(x: np.ndarray, name: str) -> np.ndarray:
    """Round float32 ``x`` to the nearest value of ``name``, ties to the even mantissa, saturating at +-top.

    With e = max(floor(log2 |x|), emin) the spacing of the grid around |x| is 2**(e - mbits); |x| / spacing is
    exact in float64 (a power-of-two scaling of a float32), np.rint rounds it half to even, and a rounding up
    into the next binade lands on a value of the grid as well. Clamping first to +-top saturates.
    """
    ebits, mbits, bias, top = MINIFLOATS[name]
    x64 = np.asarray(x, np.float64)
    a = np.minimum(np.abs(x64), top)
    _, ex = np.frexp(a)  # a = m * 2**ex with m in [0.5, 1): floor(log2 a) = ex - 1 (a = 0 gives ex = 0)
    quantum = np.ldexp(1.0, np.maximum(ex - 1, 1 - bias) - mbits)
    r = np.rint(a / quantum) * quantum
    return np.copysign(r, x64).astype(F32)


def torch_round(x: np.ndarray, name: str) -> np.ndarray:
    """Round float32 ``x`` (already inside +-top) with torch's FP8 cast and back to float32."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=F32))
    return t.to(TORCH_FP8[name]).to(torch.float32).numpy()


# ----------------------------------------------------------------------------------------------------------
# References, numpy float32
# ----------------------------------------------------------------------------------------------------------


def to_blocks(x: np.ndarray, axis: int, size: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """Move ``axis`` last and cut it into blocks: (..., n_blocks, size), and the moved shape to undo it."""
    c = np.moveaxis(x, axis, -1)
    assert c.shape[-1] % size == 0
    return c.reshape(*c.shape[:-1], c.shape[-1] // size, size), c.shape


def from_blocks(b: np.ndarray, moved_shape: tuple[int, ...], axis: int) -> np.ndarray:
    return np.moveaxis(b.reshape(moved_shape), -1, axis)


def ref_int(x: np.ndarray, bits: int, symmetric: bool, size: int, axis: int) -> np.ndarray:
    """Per-group integer fake quantization, groups of ``size`` along ``axis``."""
    b, moved = to_blocks(x, axis, size)
    if symmetric:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        amax = np.abs(b).max(axis=-1, keepdims=True)
        s = np.maximum(amax / F32(qmax), EPS)
        q = np.clip(np.rint(b / s), qmin, qmax)
        y = q * s
    else:
        qmin, qmax = 0, 2**bits - 1
        lo = np.minimum(b.min(axis=-1, keepdims=True), F32(0))
        hi = np.maximum(b.max(axis=-1, keepdims=True), F32(0))
        s = np.maximum((hi - lo) / F32(qmax - qmin), EPS)
        z = np.clip(F32(qmin) - np.rint(lo / s), qmin, qmax)
        q = np.clip(np.rint(b / s) + z, qmin, qmax)
        y = (q - z) * s
    assert y.dtype == F32
    return from_blocks(y, moved, axis)


def ref_fp8(
    x: np.ndarray,
    name: str,
    ch_axis: int | None = None,
    scale: np.ndarray | None = None,
    via_torch: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """FP8 fake quantization per tensor (``ch_axis=None``) or per channel; returns (y, v / s, s)."""
    top = F32(MINIFLOATS[name][3])
    bshape = [1] * x.ndim
    if ch_axis is not None:
        bshape[ch_axis] = x.shape[ch_axis]
    if scale is not None:
        s = np.asarray(scale, F32).reshape(bshape)
    elif ch_axis is None:
        s = np.maximum(np.abs(x).max() / top, EPS)
    else:
        others = tuple(d for d in range(x.ndim) if d != ch_axis)
        s = np.maximum(np.abs(x).max(axis=others, keepdims=True) / top, EPS)
    with np.errstate(over="ignore"):
        r = x / s
    c = np.clip(r, -top, top)
    y = (torch_round(c, name) if via_torch else minifloat_round(c, name)) * s
    assert y.dtype == F32
    return y, r, np.broadcast_to(s, x.shape)


def ref_mx(x: np.ndarray, fmt: str, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """MXFP8 / MXFP4: blocks of 32 along ``axis`` sharing the scale 2**shared; returns (y, v / s)."""
    elem, emax = MX_FORMATS[fmt]
    b, moved = to_blocks(x, axis, 32)
    amax = np.abs(b).max(axis=-1, keepdims=True)
    _, ex = np.frexp(np.maximum(amax, MIN_NORMAL))  # floor(log2(a)) = ex - 1, exactly
    shared = np.clip(ex.astype(np.int64) - 1 - emax, -127, 127)
    s = np.ldexp(1.0, shared).astype(F32)  # exact: 2**-127 is a float32 subnormal
    r = b / s
    y = minifloat_round(r, elem) * s
    assert y.dtype == F32
    return from_blocks(y, moved, axis), from_blocks(r, moved, axis)


def ref_nvfp4(x: np.ndarray, axis: int, ts: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """NVFP4: blocks of 16, an E4M3 scale per block times a float32 tensor scale; returns (y, v / eff)."""
    b, moved = to_blocks(x, axis, 16)
    if ts is None:
        ts = np.maximum(np.abs(x).max() / F32(2688), MIN_NORMAL)
    ts = F32(ts)
    amax = np.abs(b).max(axis=-1, keepdims=True)
    with np.errstate(over="ignore"):
        ratio = (amax / F32(6)) / ts
    bscale = minifloat_round(np.clip(ratio, F32(2.0**-9), F32(448)), "e4m3")
    eff = bscale * ts
    with np.errstate(over="ignore"):
        r = b / eff
    y = minifloat_round(r, "e2m1") * eff
    assert y.dtype == F32
    return from_blocks(y, moved, axis), from_blocks(r, moved, axis)


# ----------------------------------------------------------------------------------------------------------
# Helpers: comparison, inputs
# ----------------------------------------------------------------------------------------------------------


def assert_bit_exact(got: torch.Tensor, want: np.ndarray, x: np.ndarray | None = None) -> None:
    """``got`` is float32, of ``want``'s shape, NaN-free and equal to ``want`` element for element."""
    assert got.dtype == torch.float32, got.dtype
    g = got.detach().numpy()
    assert g.shape == want.shape, (g.shape, want.shape)
    assert not np.isnan(g).any(), "NaN in the result"
    assert not np.isnan(want).any(), "NaN in the reference"
    if not np.array_equal(g, want):
        bad = np.flatnonzero(g.ravel() != want.ravel())
        i = bad[:6]
        xs = f" input {x.ravel()[i].tolist()}" if x is not None else ""
        raise AssertionError(
            f"{bad.size} of {g.size} elements differ; at flat {i.tolist()}:{xs} "
            f"got {g.ravel()[i].tolist()} want {want.ravel()[i].tolist()}"
        )


def as_tensor(canon: np.ndarray, pos: int, contiguous: bool) -> tuple[np.ndarray, torch.Tensor]:
    """The array with its last axis moved to ``pos`` and the same values as a torch tensor: contiguous, or a
    non-contiguous view of the canonical layout (the layout must not change the result)."""
    x = np.ascontiguousarray(np.moveaxis(canon, -1, pos))
    t = torch.from_numpy(x.copy()) if contiguous else torch.from_numpy(canon.copy()).movedim(-1, pos)
    return x, t


def signed(rng: np.random.Generator, values: np.ndarray, n: int) -> np.ndarray:
    return rng.choice(values, n) * rng.choice([-1.0, 1.0], n)


def tiny_block(rng: np.random.Generator, n: int) -> np.ndarray:
    """Float32 subnormals (a few multiples of 2**-149, or any) and normals just above 2**-126."""
    m = np.where(rng.random(n) < 0.5, rng.integers(-100, 101, n), rng.integers(-(2**24), 2**24, n))
    return m * TINY


INT_KINDS = ("normal", "shifted", "tie", "near_tie", "zero", "const", "tiny")


def int_block(rng: np.random.Generator, kind: str, g: int, bits: int, symmetric: bool, k: int) -> np.ndarray:
    """One group of ``g`` values of the given kind at magnitude about 2**k (float64, exact in float32)."""
    if kind == "normal":
        return rng.standard_normal(g) * 2.0**k
    if kind == "shifted":  # one-signed or lopsided: the asymmetric zero point moves
        return rng.uniform(rng.uniform(-1, 0.5), 1, g) * 2.0**k
    if kind == "zero":
        return np.zeros(g)
    if kind == "const":
        return np.full(g, rng.standard_normal() * 2.0**k)
    if kind == "tiny":
        return tiny_block(rng, g)
    # ties: the group's scale is s (a power of two for "tie": v / s is then exactly c + 0.5)
    s = 2.0**k if kind == "tie" else float(F32(2.0**k * rng.uniform(1, 2)))
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        v = (rng.integers(-qmax, qmax, g) + 0.5) * s  # |c + 0.5| < qmax: below the anchor
        v[rng.integers(g)] = qmax * s * rng.choice([-1, 1])  # amax = qmax * s, so the scale is s
    else:
        n = 2**bits - 1
        z0 = int(rng.integers(0, n + 1))
        v = (rng.integers(-z0, n - z0, g) + 0.5) * s
        i, j = rng.choice(g, 2, replace=g < 2)
        v[i], v[j] = -z0 * s, (n - z0) * s  # min and max: (hi - lo) / n = s, zero point z0
    return v


@st.composite
def blocked_layout(draw, sizes):
    """(block size, blocks per row, leading dims, position of the block axis, block_axis as passed, contiguous)."""
    size = draw(sizes)
    nblocks = draw(st.integers(1, 3))
    lead = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    ndim = len(lead) + 1
    pos = draw(st.integers(0, ndim - 1))
    axis = pos - ndim if draw(st.booleans()) else pos
    return size, nblocks, lead, pos, axis, draw(st.booleans())


SEEDS = st.integers(0, 2**32 - 1)


# ----------------------------------------------------------------------------------------------------------
# 0. The references themselves: minifloat rounding against torch's casts and hand-computed ties
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["e4m3", "e5m2"])
def test_minifloat_value_sets_match_torch(name):
    """The enumerated E4M3FN / E5M2 value sets are exactly the finite values torch's float8 dtypes decode from
    their 256 codes (E4M3FN: 253 values with +-0 merged, top 448; E5M2: 247, top 57344)."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(TORCH_FP8[name]).to(torch.float32)
    decoded = codes.numpy().astype(np.float64)
    decoded = np.unique(decoded[np.isfinite(decoded)])
    ours = minifloat_values(name)
    assert np.array_equal(decoded, ours)
    assert len(ours) == {"e4m3": 253, "e5m2": 247}[name]
    assert ours.max() == MINIFLOATS[name][3] and ours.min() == -MINIFLOATS[name][3]


@pytest.mark.parametrize("name", ["e4m3", "e5m2"])
def test_minifloat_round_agrees_with_torch_cast(name):
    """The numpy rounding (nearest, ties to the even code) equals torch's cast on every value, every midpoint
    (a tie), one float32 ulp either side of each midpoint, and random float32 values of all magnitudes within
    +-top, subnormals of the format and float32 subnormals included; and each midpoint goes to the even code."""
    top = MINIFLOATS[name][3]
    p, m = positive_values(name), midpoints(name)
    m32 = m.astype(F32)
    assert np.array_equal(m32, m)  # the midpoints are float32 values: exact ties
    rng = np.random.default_rng(0)
    emin = 1 - MINIFLOATS[name][2] - MINIFLOATS[name][1]
    rand = rng.uniform(1, 2, 20000) * 2.0 ** rng.integers(emin - 4, int(math.log2(top)) + 1, 20000)
    cands = np.concatenate(
        [
            p,
            m,
            np.nextafter(m32, F32(0)),
            np.nextafter(m32, F32(np.inf)),
            rand,
            tiny_block(rng, 1000),
        ]
    ).astype(F32)
    cands = cands[np.abs(cands) <= top]
    cands = np.concatenate([cands, -cands])
    assert np.array_equal(minifloat_round(cands, name), torch_round(cands, name))
    # ties to even: the midpoint between codes i and i + 1 goes to whichever of the two is even
    even = np.where(np.arange(len(m)) % 2 == 0, p[:-1], p[1:])
    assert np.array_equal(minifloat_round(m32, name), even.astype(F32))
    assert np.array_equal(minifloat_round(-m32, name), -even.astype(F32))


def test_e2m1_round_hand_cases():
    """E2M1 rounding by hand: the ties go to the even mantissa (0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2,
    3.5->4, 5->4), values beyond 6 saturate, the sign is symmetric."""
    x = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, 7, 100, 0.1, 0.3, 0.8, 2.6, 5.1, 6], F32)
    want = np.array([0, 1, 1, 2, 2, 4, 4, 6, 6, 0, 0.5, 1, 3, 6, 6], F32)
    assert np.array_equal(minifloat_round(x, "e2m1"), want)
    assert np.array_equal(minifloat_round(-x, "e2m1"), -want)
    assert np.array_equal(minifloat_values("e2m1"), np.array(E2M1_VALUES, np.float64))


# ----------------------------------------------------------------------------------------------------------
# 1. Per-group and per-token int
# ----------------------------------------------------------------------------------------------------------


def int_canon(rng, rows, nblocks, g, bits, symmetric, k0, spread, kinds=INT_KINDS) -> np.ndarray:
    out = np.empty((rows, nblocks, g), np.float64)
    for r in range(rows):
        for b in range(nblocks):
            k = k0 + int(rng.integers(-spread, spread + 1))
            out[r, b] = int_block(rng, str(rng.choice(kinds)), g, bits, symmetric, k)
    return out.astype(F32)


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_int_group_matches_reference(bits, symmetric, group_size):
    """Per-group int (groups of 32/64/128 along the last axis) equals the numpy reference bit for bit on a
    (6, 256) tensor mixing Gaussian groups at 2**-30..2**30, exact and near ties, zero, constant and subnormal
    groups."""
    rng = np.random.default_rng([bits, group_size, symmetric])
    x = int_canon(rng, 6, 256 // group_size, group_size, bits, symmetric, 0, 30).reshape(6, 256)
    spec = QuantSpec(bits=bits, symmetric=symmetric, group_size=group_size)
    assert_bit_exact(
        formats.fake_quant(torch.from_numpy(x.copy()), spec), ref_int(x, bits, symmetric, group_size, -1), x
    )


@SETTINGS
@given(
    layout=blocked_layout(st.sampled_from([1, 2, 3, 4, 8, 16, 32, 64, 128])),
    bits=st.sampled_from([2, 3, 4, 5, 8, 16]),
    symmetric=st.booleans(),
    seed=SEEDS,
    k0=st.integers(-30, 30),
    spread=st.integers(0, 8),
)
def test_int_group_property(layout, bits, symmetric, seed, k0, spread):
    """Per-group int over shapes of 1-3 dims, any block axis (given positive or negative), small and large
    groups, contiguous or strided input: bit-exact against the reference, input left unchanged."""
    g, nblocks, lead, pos, axis, contiguous = layout
    rng = np.random.default_rng(seed)
    canon = int_canon(rng, math.prod(lead), nblocks, g, bits, symmetric, k0, spread).reshape(
        *lead, nblocks * g
    )
    x, t = as_tensor(canon, pos, contiguous)
    spec = QuantSpec(bits=bits, symmetric=symmetric, group_size=g, block_axis=axis)
    before = t.clone()
    assert_bit_exact(formats.fake_quant(t, spec), ref_int(x, bits, symmetric, g, pos), x)
    assert torch.equal(t, before)


@SETTINGS
@given(
    layout=blocked_layout(st.integers(1, 70)),
    bits=st.sampled_from([2, 4, 8]),
    symmetric=st.booleans(),
    seed=SEEDS,
    k0=st.integers(-30, 30),
)
def test_int_per_token_property(layout, bits, symmetric, seed, k0):
    """``per_token=True`` (observer="dynamic"): one group per row, the whole block axis: bit-exact against the
    reference with the group size equal to the axis length."""
    d, _, lead, pos, axis, contiguous = layout
    rng = np.random.default_rng(seed)
    canon = int_canon(rng, math.prod(lead), 1, d, bits, symmetric, k0, 4).reshape(*lead, d)
    x, t = as_tensor(canon, pos, contiguous)
    spec = QuantSpec(bits=bits, symmetric=symmetric, per_token=True, observer="dynamic", block_axis=axis)
    assert_bit_exact(formats.fake_quant(t, spec), ref_int(x, bits, symmetric, d, pos), x)


@SETTINGS
@given(
    layout=blocked_layout(st.sampled_from([2, 4, 8, 16, 32, 64, 128])),
    bits=st.sampled_from([2, 3, 4, 8]),
    symmetric=st.booleans(),
    seed=SEEDS,
    k0=st.integers(-30, 30),
)
def test_int_group_equals_per_channel_of_regrouped(layout, bits, symmetric, seed, k0):
    """Per-group int equals ``qatlab.fake_quant`` per channel (ch_axis=0) on the regrouped tensor
    (rows, D) -> (rows * D / g, g) with ``qatlab.qparams`` of each row's min/max. That op multiplies by 1 / s
    where formats divides, so an element may differ, by exactly one code, only where v / s is within a few
    float32 ulps of a tie; everywhere else the two agree bit for bit."""
    g, nblocks, lead, pos, axis, contiguous = layout
    rng = np.random.default_rng(seed)
    kinds = ("normal", "shifted", "tie", "zero")
    canon = int_canon(rng, math.prod(lead), nblocks, g, bits, symmetric, k0, 6, kinds)
    canon = canon.reshape(*lead, nblocks * g)
    x, t = as_tensor(canon, pos, contiguous)
    got = formats.fake_quant(t, QuantSpec(bits=bits, symmetric=symmetric, group_size=g, block_axis=axis))
    got2 = np.ascontiguousarray(np.moveaxis(got.detach().numpy(), pos, -1)).reshape(-1, g)
    x2 = torch.from_numpy(canon.reshape(-1, g).copy())
    spec_pc = QuantSpec(bits=bits, symmetric=symmetric, per_channel=True, ch_axis=0)
    scale, zp = qatlab.qparams(x2.min(1).values, x2.max(1).values, spec_pc)
    want2 = qatlab.fake_quant(x2, scale, zp, spec_pc).detach().numpy()
    assert not np.isnan(got2).any()
    differ = got2 != want2
    if differ.any():
        s = np.broadcast_to(scale.numpy()[:, None].astype(np.float64), x2.shape)
        q = x2.numpy().astype(np.float64) / s
        near_tie = np.abs(np.abs(q - np.floor(q)) - 0.5) <= 2.0**-20 * np.maximum(1.0, np.abs(q))
        one_code = np.isclose(np.abs(got2.astype(np.float64) - want2), s, rtol=1e-6, atol=0)
        assert (near_tie & one_code)[differ].all(), (x2.numpy()[differ], got2[differ], want2[differ])
        assert differ.sum() <= max(1, 0.01 * differ.size)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_int_group_asymmetric_zero_point_divides(bits):
    """The asymmetric zero point is clip(qmin - round(lo / s)) with a division. Groups are searched whose min
    lo makes lo / s and lo * (1 / s) round to different integers; on those, fake_quant agrees with the
    division (and so with ``qatlab.qparams``, which divides as well)."""
    rng = np.random.default_rng(bits)
    n = 2**bits - 1
    c = rng.integers(0, n, 200000)
    s0 = rng.uniform(1, 2, c.size) * 2.0 ** rng.integers(-20, 20, c.size)
    lo = np.minimum((-(c + 0.5) * s0).astype(F32), F32(0))
    lo = np.where(rng.random(c.size) < 0.5, np.nextafter(lo, F32(0)), lo)
    hi = ((n - c - 0.5) * s0).astype(F32)
    s = np.maximum((hi - lo) / F32(n), EPS)
    hit = np.rint(lo / s) != np.rint(lo * (F32(1) / s))
    assert hit.sum() >= 4, "no order-sensitive group found: the search is broken"
    lo, hi = lo[hit][:16], hi[hit][:16]
    x = rng.uniform(0, 1, (lo.size, 8)) * (hi - lo)[:, None] + lo[:, None]
    x[:, 0], x[:, 1] = lo, hi
    x = x.astype(F32)
    spec = QuantSpec(bits=bits, symmetric=False, group_size=8)
    assert_bit_exact(formats.fake_quant(torch.from_numpy(x.copy()), spec), ref_int(x, bits, False, 8, -1), x)


def test_int_group_tie_rounds_half_to_even():
    """Hand case: symmetric int4 group [7, 0.5, 1.5, 2.5, -0.5, -2.5, 6.5, -3.5] (amax 7, s = 1): ties go to
    the even code: [7, 0, 2, 2, -0, -2, 6, -4]; asymmetric int2 group [0, 3, 0.5, 1.5, 2.5] (s = 1, z = 0):
    [0, 3, 0, 2, 2]."""
    x = torch.tensor([[7, 0.5, 1.5, 2.5, -0.5, -2.5, 6.5, -3.5]])
    y = formats.fake_quant(x, QuantSpec(bits=4, symmetric=True, group_size=8))
    assert_bit_exact(y, np.array([[7, 0, 2, 2, 0, -2, 6, -4]], F32))
    x = torch.tensor([[0, 3, 0.5, 1.5, 2.5]])
    y = formats.fake_quant(x, QuantSpec(bits=2, symmetric=False, group_size=5))
    assert_bit_exact(y, np.array([[0, 3, 0, 2, 2]], F32))


# ----------------------------------------------------------------------------------------------------------
# 2. FP8 per tensor / per channel
# ----------------------------------------------------------------------------------------------------------


def fp8_row(rng, n: int, name: str, j: int) -> np.ndarray:
    """Values for one channel (or the whole tensor) whose natural scale is 2**j: segments of Gaussian values,
    exact ties and grid values, zeros, subnormals and (for a given scale) values beyond the top."""
    top = MINIFLOATS[name][3]
    grid = np.concatenate([positive_values(name), midpoints(name)])
    out = np.empty(n)
    cuts = np.sort(rng.integers(0, n + 1, 2))
    for lo, hi in zip([0, *cuts], [*cuts, n], strict=True):
        kind = rng.choice(["normal", "tie", "tie", "zero", "tiny", "beyond"])
        m = hi - lo
        if kind == "normal":
            out[lo:hi] = rng.standard_normal(m) * 2.0 ** (j + int(rng.integers(-12, 8)))
        elif kind == "tie":
            out[lo:hi] = signed(rng, grid, m) * 2.0**j
        elif kind == "zero":
            out[lo:hi] = 0
        elif kind == "tiny":
            out[lo:hi] = tiny_block(rng, m)
        else:
            out[lo:hi] = rng.uniform(-3, 3, m) * top * 2.0**j
    if n and rng.random() < 0.7:
        out[rng.integers(n)] = top * 2.0**j * rng.choice([-1, 1])  # amax = top * 2**j: the scale is 2**j
    return out


@SETTINGS
@given(
    fmt=st.sampled_from(sorted(FP8_FORMATS)),
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    per_channel=st.booleans(),
    ch_axis=st.integers(-3, 2),
    given_scale=st.sampled_from(["none", "pow2", "any"]),
    seed=SEEDS,
    k0=st.integers(-30, 30),
)
def test_fp8_matches_torch_cast(fmt, shape, per_channel, ch_axis, given_scale, seed, k0):
    """FP8 (E4M3 / E5M2), per tensor or per channel (any ch_axis), dynamic scale amax / max_normal or a given
    ``scale=`` (a power of two, or any float): bit-exact against ``fp8(clip(v / s, -max, max)) * s`` with
    torch's cast, and against the same with the numpy minifloat rounding; saturated values are +-max * s."""
    name = FP8_FORMATS[fmt]
    ndim = len(shape)
    ch = ch_axis % ndim if per_channel else None
    rng = np.random.default_rng(seed)
    nch = shape[ch] if per_channel else 1
    js = k0 + rng.integers(-10, 11, nch)
    rows = [fp8_row(rng, math.prod(shape) // nch, name, int(j)) for j in js]
    canon = np.stack(rows).astype(F32)  # (channels, everything else)
    if per_channel:
        others = [d for i, d in enumerate(shape) if i != ch]
        x = np.ascontiguousarray(np.moveaxis(canon.reshape(nch, *others), 0, ch))
    else:
        x = canon.reshape(shape)
    scale = None
    if given_scale != "none":
        scale = (2.0**js).astype(F32)
        if given_scale == "any":
            scale = (scale * rng.uniform(1, 2, nch)).astype(F32)
    spec = QuantSpec(format=fmt, per_channel=per_channel, ch_axis=ch_axis if per_channel else 0)
    t = torch.from_numpy(x.copy())
    got = (
        formats.fake_quant(t, spec)
        if scale is None
        else formats.fake_quant(t, spec, scale=torch.from_numpy(scale))
    )
    want, r, s = ref_fp8(x, name, ch, scale)
    assert_bit_exact(got, want, x)
    assert np.array_equal(want, ref_fp8(x, name, ch, scale, via_torch=False)[0])
    # saturation: |v / s| >= max gives exactly +-max * s
    top = F32(MINIFLOATS[name][3])
    sat = np.abs(r) >= top
    assert np.array_equal(got.numpy()[sat], np.sign(x[sat]) * top * s[sat])


@pytest.mark.parametrize("fmt", sorted(FP8_FORMATS))
def test_fp8_saturation_hand_case(fmt):
    """With a given scale s = 2**-4, values at or beyond +-max * s come back as exactly +-max * s, the rest
    are rounded (values exactly on the grid stay)."""
    name = FP8_FORMATS[fmt]
    top = MINIFLOATS[name][3]
    s = 2.0**-4
    x = np.array(
        [-1e6, -2 * top, -top * 1.01, -top, top, top * 1.001, 3 * top, 1.0, 0.0, 2.0**-4], F32
    ) * F32(s)
    want = np.array([-top, -top, -top, -top, top, top, top, 1.0, 0.0, 2.0**-4], F32) * F32(s)
    got = formats.fake_quant(torch.from_numpy(x.copy()), QuantSpec(format=fmt), scale=torch.tensor([s]))
    assert_bit_exact(got, want, x)
    assert_bit_exact(got, ref_fp8(x, name, None, np.array([s], F32))[0], x)


@pytest.mark.parametrize("fmt", sorted(FP8_FORMATS))
@pytest.mark.parametrize("per_channel", [False, True])
def test_fp8_tiny_and_zero_tensors(fmt, per_channel):
    """FP8 with amax below max * eps (the scale floored at eps = 2**-23, values into the FP8 subnormals or to
    zero), an all-zero channel (zeros, no NaN) and float32 subnormals: bit-exact against the reference."""
    name = FP8_FORMATS[fmt]
    rng = np.random.default_rng(11)
    x = np.stack(
        [
            rng.standard_normal(40) * 2.0**-12,
            rng.standard_normal(40) * 2.0**-20,
            np.zeros(40),
            tiny_block(rng, 40),
            rng.standard_normal(40) * 2.0**-30,
        ]
    ).astype(F32)
    for rows in (slice(None), slice(1, None), slice(2, 3)):
        xr = np.ascontiguousarray(x[rows])
        spec = QuantSpec(format=fmt, per_channel=per_channel, ch_axis=0)
        got = formats.fake_quant(torch.from_numpy(xr.copy()), spec)
        assert_bit_exact(got, ref_fp8(xr, name, 0 if per_channel else None)[0], xr)
    zero = formats.fake_quant(torch.zeros(3, 8), QuantSpec(format=fmt))
    assert_bit_exact(zero, np.zeros((3, 8), F32))


# ----------------------------------------------------------------------------------------------------------
# 3. MXFP8 / MXFP4
# ----------------------------------------------------------------------------------------------------------

MX_KINDS = ("normal", "tie", "tie_extreme", "pow2", "saturating", "zero", "tiny", "huge")


def mx_block(rng, kind: str, fmt: str, k: int) -> np.ndarray:
    """32 values of ``kind``; ``k`` is the shared exponent the tie-like kinds are built for."""
    elem, emax = MX_FORMATS[fmt]
    top = MINIFLOATS[elem][3]
    if kind == "normal":
        return rng.standard_normal(32) * 2.0**k
    if kind == "zero":
        return np.zeros(32)
    if kind == "tiny":
        return tiny_block(rng, 32)
    if kind == "huge":
        return rng.standard_normal(32) * 2.0 ** rng.integers(90, 121)
    if kind == "tie_extreme":
        k = int(rng.integers(-127, 101))
    if kind == "pow2":  # amax exactly 2**(emax + k), everything else below
        v = rng.uniform(-1, 1, 32) * 2.0 ** (emax + k)
        v[rng.integers(32)] = 2.0 ** (emax + k) * rng.choice([-1, 1])
        return v
    if kind == "saturating":  # amax in (top, 2**(emax + 1)) * 2**k: shared exponent k, amax saturates
        anchor = rng.uniform(top, 2.0 ** (emax + 1)) * 2.0**k
        v = rng.uniform(-1, 1, 32) * anchor
        v[rng.integers(32)] = anchor
        return v
    # ties: grid values, exact midpoints and the ones beyond the top, all times 2**k (exact in float32)
    # past the top: the midpoint to the next (missing) value (E2M1: 7, E4M3: 464) and just below 2**(emax+1)
    beyond = np.array([top + 2.0 ** (emax - MINIFLOATS[elem][1] - 1), 2.0 ** (emax + 1) * 0.99])
    pool = np.concatenate([positive_values(elem), midpoints(elem), beyond])
    v = signed(rng, pool, 32) * 2.0**k
    v[rng.integers(32)] = rng.choice([2.0**emax, top]) * 2.0**k * rng.choice([-1, 1])
    return v


def mx_canon(rng, rows, nblocks, fmt, k0, spread, kinds=MX_KINDS) -> np.ndarray:
    out = np.empty((rows, nblocks, 32))
    for r in range(rows):
        for b in range(nblocks):
            out[r, b] = mx_block(
                rng, str(rng.choice(kinds)), fmt, k0 + int(rng.integers(-spread, spread + 1))
            )
    return out.astype(F32)


@SETTINGS
@given(
    fmt=st.sampled_from(sorted(MX_FORMATS)),
    layout=blocked_layout(st.just(32)),
    seed=SEEDS,
    k0=st.integers(-30, 30),
    spread=st.integers(0, 20),
)
def test_mx_matches_reference(fmt, layout, seed, k0, spread):
    """MXFP8 / MXFP4 over 1-3 dim inputs with the block axis anywhere: bit-exact against the reference on
    blocks of exact ties, power-of-two amax, saturating amax, zeros, subnormals, huge values (2**120) and shared
    exponents down to the clamp at -127."""
    _, nblocks, lead, pos, axis, contiguous = layout
    rng = np.random.default_rng(seed)
    canon = mx_canon(rng, math.prod(lead), nblocks, fmt, k0, spread).reshape(*lead, nblocks * 32)
    x, t = as_tensor(canon, pos, contiguous)
    assert_bit_exact(formats.fake_quant(t, QuantSpec(format=fmt, block_axis=axis)), ref_mx(x, fmt, pos)[0], x)


@pytest.mark.parametrize("fmt", sorted(MX_FORMATS))
def test_mx_block_axis_0_and_3d(fmt):
    """block_axis=0 on a (64, 3) tensor and block_axis=1 / -1 on (2, 64, 3) / (3, 2, 96) tensors: blocks run
    along that axis only (each column is quantized on its own), bit-exact against the reference."""
    rng = np.random.default_rng(7)
    for shape, axis in [((64, 3), 0), ((2, 64, 3), 1), ((3, 2, 96), -1), ((32, 2, 2), -3)]:
        pos = axis % len(shape)
        moved = tuple(d for i, d in enumerate(shape) if i != pos) + (shape[pos],)
        canon = mx_canon(rng, math.prod(moved[:-1]), moved[-1] // 32, fmt, 0, 20).reshape(moved)
        x, t = as_tensor(canon, pos, True)
        assert x.shape == shape
        assert_bit_exact(
            formats.fake_quant(t, QuantSpec(format=fmt, block_axis=axis)), ref_mx(x, fmt, pos)[0], x
        )


@pytest.mark.parametrize("k", [0, -20, 30, -125])
def test_mxfp4_ties_hand_case(k):
    """One MXFP4 block with amax 7.9 * 2**k (shared exponent k, s = 2**k): the E2M1 ties go to the even
    mantissa (0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4), 7 and 7.9 saturate to 6, symmetric in
    sign; computed by hand, then scaled by 2**k (exact)."""
    v = [7.9, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, 7, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5, -7]
    v += [0.5, 1, 1.5, 2, 3, 4, 0.1, 0.3, 0.8, 2.6, 5.1, 6, -6, 0, 0]
    w = [6, 0, 1, 1, 2, 2, 4, 4, 6, 0, -1, -1, -2, -2, -4, -4, -6]
    w += [0.5, 1, 1.5, 2, 3, 4, 0, 0.5, 1, 3, 6, 6, -6, 0, 0]
    x = (np.array(v, F32) * F32(2.0**k)).reshape(1, 32)
    want = (np.array(w, F32) * F32(2.0**k)).reshape(1, 32)
    got = formats.fake_quant(torch.from_numpy(x.copy()), QuantSpec(format="mxfp4"))
    assert_bit_exact(got, want, x)
    assert np.array_equal(ref_mx(x, "mxfp4", -1)[0], want)


def test_mxfp8_ties_hand_case():
    """One MXFP8 block with amax 448 (s = 1): E4M3 ties to even: 1.0625->1, 1.1875->1.25, 232->224, 248->256,
    2**-10->0, 3 * 2**-10->2**-8, 464 saturates to 448 (the cast alone would give 480, a NaN code in E4M3FN)."""
    v = [448, 1.0625, 1.1875, 232, 248, 2.0**-10, 3 * 2.0**-10, 464, -1.0625, -248, -464] + [0] * 21
    w = [448, 1, 1.25, 224, 256, 0, 2.0**-8, 448, -1, -256, -448] + [0] * 21
    x, want = np.array([v], F32), np.array([w], F32)
    assert_bit_exact(formats.fake_quant(torch.from_numpy(x.copy()), QuantSpec(format="mxfp8")), want, x)
    assert np.array_equal(ref_mx(x, "mxfp8", -1)[0], want)


@pytest.mark.parametrize("fmt", sorted(MX_FORMATS))
def test_mx_zero_and_subnormal_blocks(fmt):
    """All-zero blocks give zeros (no NaN), and a block of float32 subnormals (amax below 2**-126: shared
    exponent clamped at -127, s = 2**-127 subnormal) is bit-exact against the reference."""
    x = np.zeros((3, 64), F32)
    x[1] = (np.arange(64) - 32) * TINY
    x[2, :32] = np.arange(32) * 2.0**-130
    got = formats.fake_quant(torch.from_numpy(x.copy()), QuantSpec(format=fmt))
    assert_bit_exact(got, ref_mx(x, fmt, -1)[0], x)
    assert not got[0].any()


# ----------------------------------------------------------------------------------------------------------
# 4. NVFP4
# ----------------------------------------------------------------------------------------------------------

NV_KINDS = ("normal", "tie", "wide", "zero", "tiny", "beyond")


def nv_canon(rng, rows, nblocks, j, kinds=NV_KINDS) -> np.ndarray:
    """Blocks of 16 for a tensor scale near 2**j: ties are built on an E4M3 block scale b0, values
    mid * b0 * 2**j with one element 6 * b0 * 2**j (so the block scale is exactly b0 when ts = 2**j)."""
    b0s = positive_values("e4m3")[1:]  # 2**-9 .. 448
    pool = np.concatenate([positive_values("e2m1"), midpoints("e2m1")])
    out = np.empty((rows, nblocks, 16))
    for r in range(rows):
        for b in range(nblocks):
            kind = rng.choice(kinds)
            if kind == "normal":
                out[r, b] = rng.standard_normal(16) * 2.0 ** (j + int(rng.integers(-10, 9)))
            elif kind == "tie":
                b0 = rng.choice(b0s)
                v = signed(rng, pool, 16) * b0 * 2.0**j
                v[rng.integers(16)] = 6 * b0 * 2.0**j * rng.choice([-1, 1])
                out[r, b] = v
            elif kind == "wide":  # magnitudes 2**-24 .. 2**0 of the tensor range: the 2**-9 clamp
                out[r, b] = rng.choice([-1, 1], 16) * 2688 * 2.0 ** (j + rng.uniform(-24, 0, 16))
            elif kind == "zero":
                out[r, b] = 0
            elif kind == "tiny":
                out[r, b] = tiny_block(rng, 16)
            else:  # far beyond 448 * 6 * ts: block scale clamped at 448, elements saturate at 6 (given ts)
                out[r, b] = rng.standard_normal(16) * 2688 * 2.0 ** (j + int(rng.integers(1, 12)))
    return out


@SETTINGS
@given(
    layout=blocked_layout(st.just(16)),
    mode=st.sampled_from(["dynamic", "dynamic_gauss", "dynamic_anchor", "pow2", "any", "tiny_tensor"]),
    seed=SEEDS,
    j=st.integers(-40, 40),
)
def test_nvfp4_matches_reference(layout, mode, seed, j):
    """NVFP4 over 1-3 dim inputs with the block axis anywhere, with the dynamic tensor scale (amax / 2688,
    floored at 2**-126; "dynamic_gauss": Gaussian blocks only, so amax / 2688 is rounded; "dynamic_anchor":
    amax = 2688 * 2**j so ts = 2**j exactly and the built ties are exact ties) or a given ``scale=`` (a power of two, or any float; values far beyond it saturate), and a tensor of
    subnormals only (the 2**-126 floor): bit-exact against the reference."""
    _, nblocks, lead, pos, axis, contiguous = layout
    rng = np.random.default_rng(seed)
    rows = math.prod(lead)
    kinds = NV_KINDS if mode in ("pow2", "any") else tuple(k for k in NV_KINDS if k != "beyond")
    if mode == "dynamic_gauss":  # an amax of arbitrary bits: amax / 2688 is rounded
        kinds = ("normal", "normal", "zero")
    canon = nv_canon(rng, rows, nblocks, j, kinds)
    if mode == "dynamic_anchor":
        canon[0, 0, int(rng.integers(16))] = 2688 * 2.0**j * rng.choice([-1, 1])
    if mode == "tiny_tensor":
        canon = tiny_block(rng, canon.size).reshape(canon.shape)
    canon = canon.astype(F32).reshape(*lead, nblocks * 16)
    x, t = as_tensor(canon, pos, contiguous)
    ts = None
    if mode == "pow2":
        ts = F32(2.0**j)
    elif mode == "any":
        ts = F32(2.0**j * rng.uniform(1, 2))
    spec = QuantSpec(format="nvfp4", block_axis=axis)
    got = formats.fake_quant(t, spec) if ts is None else formats.fake_quant(t, spec, scale=torch.tensor([ts]))
    assert_bit_exact(got, ref_nvfp4(x, pos, ts)[0], x)


def test_nvfp4_block_scale_division_order():
    """The block scale is e4m3((amax_block / 6) / ts), two divisions in that order. Block amaxes are searched
    (from the float32 values next to 6 * m * ts, m an E4M3 midpoint) where that order and amax / (6 * ts) round
    to different E4M3 block scales; on those blocks fake_quant must agree with the spec's order."""
    rng = np.random.default_rng(13)
    mids = midpoints("e4m3")
    mids = mids[(mids > 2.0**-9) & (mids < 448)]
    found: list[tuple[np.float32, np.ndarray]] = []
    for _ in range(200):
        ts = F32(rng.uniform(1, 2) * 2.0 ** rng.integers(-20, 20))
        a = (6 * mids * np.float64(ts)).astype(F32)
        amax = np.concatenate([a, np.nextafter(a, F32(0)), np.nextafter(a, F32(np.inf))])
        spec_order = minifloat_round(np.clip((amax / F32(6)) / ts, F32(2.0**-9), F32(448)), "e4m3")
        other = minifloat_round(np.clip(amax / (F32(6) * ts), F32(2.0**-9), F32(448)), "e4m3")
        hits = amax[spec_order != other]
        if hits.size >= 4:
            found.append((ts, hits[:8]))
        if len(found) == 3:
            break
    assert found, "no order-sensitive block amax found: the search is broken"
    for ts, hits in found:
        x = rng.uniform(-1, 1, (hits.size, 16)) * hits[:, None].astype(np.float64)
        x[np.arange(hits.size), rng.integers(16, size=hits.size)] = hits * rng.choice([-1, 1], hits.size)
        x = x.astype(F32)
        got = formats.fake_quant(
            torch.from_numpy(x.copy()), QuantSpec(format="nvfp4"), scale=torch.tensor([ts])
        )
        assert_bit_exact(got, ref_nvfp4(x, -1, ts)[0], x)


@pytest.mark.parametrize("k", [0, -20, 30])
def test_nvfp4_ties_hand_case(k):
    """One NVFP4 block with amax 6 * 2**k and the given tensor scale 2**k: block scale e4m3(1) = 1, so the
    elements are E2M1 of v / 2**k with ties to even (0.25->0, 0.75->1, ..., 5->4)."""
    v = [6, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5, -6]
    w = [6, 0, 1, 1, 2, 2, 4, 4, 0, -1, -1, -2, -2, -4, -4, -6]
    x = np.array([v], F32) * F32(2.0**k)
    want = np.array([w], F32) * F32(2.0**k)
    got = formats.fake_quant(
        torch.from_numpy(x.copy()), QuantSpec(format="nvfp4"), scale=torch.tensor([2.0**k])
    )
    assert_bit_exact(got, want, x)
    assert np.array_equal(ref_nvfp4(x, -1, F32(2.0**k))[0], want)


# ----------------------------------------------------------------------------------------------------------
# 5. Lattices
# ----------------------------------------------------------------------------------------------------------


def test_lattice_e2m1():
    """``formats.lattice("mxfp4")`` (and "nvfp4") is the sorted E2M1 value set with its negatives, zero once."""
    for fmt in ("mxfp4", "nvfp4"):
        lat = np.asarray(formats.lattice(fmt), np.float64)
        assert np.array_equal(lat, np.array(E2M1_VALUES, np.float64)), fmt


@pytest.mark.parametrize("fmt,name", [("fp8_e4m3", "e4m3"), ("fp8_e5m2", "e5m2"), ("mxfp8", "e4m3")])
def test_lattice_fp8(fmt, name):
    """The FP8 lattices: E4M3FN has 253 finite values (256 codes, 2 NaN, +-0 merged) with max 448, E5M2 247 with
    max 57344; both equal the independent enumeration (which equals torch's decoding of the codes)."""
    lat = np.asarray(formats.lattice(fmt), np.float64)
    assert np.array_equal(lat, minifloat_values(name))
    assert len(lat) == {"e4m3": 253, "e5m2": 247}[name]
    assert lat.max() == MINIFLOATS[name][3]


# ----------------------------------------------------------------------------------------------------------
# 6. Straight-through gradient
# ----------------------------------------------------------------------------------------------------------


def grad_of(x: np.ndarray, spec: QuantSpec, scale=None) -> tuple[torch.Tensor, np.ndarray]:
    t = torch.from_numpy(x.copy()).requires_grad_(True)
    y = formats.fake_quant(t, spec) if scale is None else formats.fake_quant(t, spec, scale=scale)
    y.sum().backward()
    return y, t.grad.numpy()


@SETTINGS
@given(seed=SEEDS, k0=st.integers(-30, 30))
def test_mxfp4_ste_gradient(seed, k0):
    """MXFP4 clipped STE: d/dx = 1 where |v / s| <= 6 and 0 where the element saturates (|v / s| > 6, e.g.
    values above 6 * 2**k in a block with amax 7 * 2**k); the forward pass under autograd stays bit-exact."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(4):
        k = k0 + int(rng.integers(-5, 6))
        v = rng.uniform(-7, 7, 32) * 2.0**k
        v[:3] = np.array([7, 6, -6]) * 2.0**k  # amax 7 * 2**k: s = 2**k; +-6 * 2**k just not saturated
        rows.append(rng.permutation(v))
    x = np.stack(rows).astype(F32)
    y, grad = grad_of(x, QuantSpec(format="mxfp4"))
    want, r = ref_mx(x, "mxfp4", -1)
    assert_bit_exact(y, want, x)
    mask = (np.abs(r) <= 6).astype(F32)
    assert np.array_equal(grad, mask)
    assert 0 < mask.sum() < mask.size
    assert (grad[np.abs(x) == np.abs(x).max(axis=1, keepdims=True)] == 0).all()  # the 7 * 2**k elements


@pytest.mark.parametrize("fmt", sorted(FP8_FORMATS))
def test_fp8_ste_gradient_given_scale(fmt):
    """FP8 with a given small scale: d/dx = 1 where |v / s| <= max (the boundary included) and 0 beyond."""
    name = FP8_FORMATS[fmt]
    top = MINIFLOATS[name][3]
    s = F32(2.0**-6)
    rng = np.random.default_rng(3)
    x = (np.concatenate([rng.uniform(-2, 2, 200) * top, [top, -top, top * 1.01]]) * s).astype(F32)
    y, grad = grad_of(x, QuantSpec(format=fmt), scale=torch.tensor([float(s)]))
    want, r, _ = ref_fp8(x, name, None, np.array([s], F32))
    assert_bit_exact(y, want, x)
    assert np.array_equal(grad, (np.abs(r) <= top).astype(F32))
    assert grad[-3] == 1 and grad[-2] == 1 and grad[-1] == 0


def test_nvfp4_ste_gradient_given_scale():
    """NVFP4 with a given tensor scale small enough that block scales clamp at 448: d/dx = 1 where
    |v / (b * ts)| <= 6, else 0."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((4, 32)) * 2688 * 4).astype(F32)
    ts = F32(1.0)
    y, grad = grad_of(x, QuantSpec(format="nvfp4"), scale=torch.tensor([1.0]))
    want, r = ref_nvfp4(x, -1, ts)
    assert_bit_exact(y, want, x)
    mask = (np.abs(r) <= 6).astype(F32)
    assert np.array_equal(grad, mask)
    assert 0 < mask.sum() < mask.size


# ----------------------------------------------------------------------------------------------------------
# 7. Errors
# ----------------------------------------------------------------------------------------------------------


def test_group_size_must_divide_the_axis():
    """A group size that does not divide the block axis is a ValueError naming group_size."""
    with pytest.raises(ValueError, match="group_size"):
        formats.fake_quant(torch.randn(4, 48), QuantSpec(bits=4, symmetric=True, group_size=32))
    with pytest.raises(ValueError, match="group_size"):
        formats.fake_quant(torch.randn(48, 4), QuantSpec(bits=4, group_size=32, block_axis=0))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(format="mxfp4", bits=8), "bits"),
        (dict(format="mxfp4", per_channel=True), "per_channel"),
        (dict(format="mxfp4", ste="lsq"), "ste"),
        (dict(format="nvfp4", ste="pact"), "ste"),
        (dict(group_size=0), "group_size"),
        (dict(group_size=-32), "group_size"),
        (dict(bits=4, per_token=True), "per_token"),
    ],
)
def test_invalid_specs(kwargs, match):
    """QuantSpec refuses combinations that make no sense, with a ValueError naming the argument: bits with a
    float format, per_channel or a learned-scale STE with MX/NVFP4, a non-positive group_size, per_token
    without observer="dynamic"."""
    with pytest.raises(ValueError, match=match):
        QuantSpec(**kwargs)
