"""Tests for qatlab.config: validation messages of QuantSpec / QATConfig, grids, copies, fast mode."""

from __future__ import annotations

import dataclasses

import pytest

from qatlab.config import QATConfig, QuantSpec, fast

# ---------------------------------------------------------------------------------------------- QuantSpec


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"bits": 0}, ValueError, r"bits=0 is out of range; .*2\.\.16"),
        ({"bits": 1}, ValueError, r"bits=1 is out of range"),
        ({"bits": 17}, ValueError, r"bits=17 is out of range"),
        ({"bits": -8}, ValueError, r"bits=-8 is out of range"),
        ({"bits": 8.0}, TypeError, r"bits=8\.0 must be an int between 2 and 16"),
        ({"bits": True}, TypeError, r"bits=True must be an int"),
        ({"bits": "8"}, TypeError, r"bits='8' must be an int"),
        ({"observer": "max"}, ValueError, r"observer='max' is not supported; choose one of 'minmax', 'ema'"),
        ({"ste": "round"}, ValueError, r"ste='round' is not supported; choose one of 'clipped'.*'pact'"),
        ({"narrow_range": True}, ValueError, r"narrow_range=True needs symmetric=True"),
        ({"averaging_constant": 0}, ValueError, r"averaging_constant=0 must be in \(0, 1\]"),
        ({"averaging_constant": 1.5}, ValueError, r"averaging_constant=1\.5 must be in \(0, 1\]"),
        ({"averaging_constant": float("nan")}, ValueError, r"averaging_constant=nan"),
        ({"percentile": 0}, ValueError, r"percentile=0 must be in \(0, 100\]"),
        ({"percentile": 101}, ValueError, r"percentile=101 must be in \(0, 100\]"),
        ({"percentile": float("nan")}, ValueError, r"percentile=nan must be in \(0, 100\]"),
        ({"ch_axis": 1.0}, TypeError, r"ch_axis=1\.0 must be an int"),
        ({"ch_axis": False}, TypeError, r"ch_axis=False must be an int"),
        ({"symmetric": 1}, TypeError, r"symmetric=1 must be a bool"),
        ({"per_channel": "yes"}, TypeError, r"per_channel='yes' must be a bool"),
        ({"reduce_range": 1}, TypeError, r"reduce_range=1 must be a bool"),
        ({"reduce_range": True, "bits": 2}, ValueError, r"reduce_range=True with bits=2 .*use bits >= 3"),
    ],
)
def test_quant_spec_rejects_bad_input(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        QuantSpec(**kwargs)


@pytest.mark.parametrize(
    ("bits", "symmetric", "narrow_range", "qmin", "qmax"),
    [
        (8, False, False, 0, 255),
        (8, True, False, -128, 127),
        (8, True, True, -127, 127),
        (4, True, False, -8, 7),
        (4, True, True, -7, 7),
        (4, False, False, 0, 15),
        (2, False, False, 0, 3),
        (2, True, False, -2, 1),
        (3, True, True, -3, 3),
        (16, False, False, 0, 65535),
        (16, True, False, -32768, 32767),
    ],
)
def test_grid_ends(bits: int, symmetric: bool, narrow_range: bool, qmin: int, qmax: int) -> None:
    spec = QuantSpec(bits=bits, symmetric=symmetric, narrow_range=narrow_range)
    assert (spec.qmin, spec.qmax) == (qmin, qmax)
    assert spec.signed is symmetric
    # the grid has 2**bits codes, one fewer on a narrow grid
    assert spec.qmax - spec.qmin + 1 == 2**bits - (1 if narrow_range else 0)


@pytest.mark.parametrize(
    ("bits", "symmetric", "narrow_range", "qmin", "qmax"),
    [
        (8, True, False, -64, 63),  # torch.ao / ORT reduce_range: int8 weights in [-64, 63]
        (8, False, False, 0, 127),  # uint8 activations in [0, 127]
        (8, True, True, -63, 63),
        (4, True, False, -4, 3),
        (3, False, False, 0, 3),
    ],
)
def test_reduce_range_grid_ends(bits: int, symmetric: bool, narrow_range: bool, qmin: int, qmax: int) -> None:
    spec = QuantSpec(bits=bits, symmetric=symmetric, narrow_range=narrow_range, reduce_range=True)
    assert (spec.qmin, spec.qmax) == (qmin, qmax) and spec.range_bits == bits - 1
    # the same grid as one bit less, in the same container
    assert (spec.qmin, spec.qmax) == (
        spec.with_(bits=bits - 1, reduce_range=False).qmin,
        spec.with_(bits=bits - 1, reduce_range=False).qmax,
    )


def test_defaults_and_edge_values_are_accepted() -> None:
    spec = QuantSpec()
    assert (spec.bits, spec.symmetric, spec.per_channel, spec.observer, spec.ste) == (
        8,
        False,
        False,
        "minmax",
        "clipped",
    )
    assert QuantSpec(averaging_constant=1.0).averaging_constant == 1.0
    assert QuantSpec(percentile=100).percentile == 100
    assert QuantSpec(ch_axis=-1, per_channel=True).ch_axis == -1
    assert [QuantSpec(ste=s).learned for s in ("clipped", "identity", "lsq", "pact")] == [
        False,
        False,
        True,
        True,
    ]


def test_with_returns_a_validated_copy() -> None:
    spec = QuantSpec(bits=8, symmetric=True, per_channel=True, ste="lsq")
    copy = spec.with_(bits=4, narrow_range=True)
    assert copy is not spec and spec.bits == 8 and not spec.narrow_range
    assert (copy.bits, copy.narrow_range, copy.per_channel, copy.ste) == (4, True, True, "lsq")
    assert (copy.qmin, copy.qmax) == (-7, 7)
    assert spec.with_() == spec
    with pytest.raises(ValueError, match=r"bits=1 is out of range"):
        spec.with_(bits=1)
    with pytest.raises(ValueError, match=r"narrow_range=True needs symmetric=True"):
        copy.with_(symmetric=False)
    with pytest.raises(ValueError, match=r"ste='sign' is not supported"):
        spec.with_(ste="sign")
    with pytest.raises(TypeError):
        spec.with_(colour="red")


def test_spec_is_frozen_and_hashable() -> None:
    spec = QuantSpec()
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.bits = 4
    assert QuantSpec(bits=4) == QuantSpec(bits=4) and hash(QuantSpec(bits=4)) == hash(QuantSpec(bits=4))
    assert QuantSpec(bits=4) != QuantSpec(bits=5)


# ---------------------------------------------------------------------------------------------- fast mode


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1", True), (" 1 ", True), ("true", True), ("YES", True), ("0", False), ("", False), ("no", False)],
)
def test_fast_reads_environment(monkeypatch: pytest.MonkeyPatch, value: str, expected: bool) -> None:
    monkeypatch.setenv("QATLAB_FAST", value)
    assert fast() is expected


def test_fast_unset_is_false(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QATLAB_FAST", raising=False)
    assert fast() is False


# ---------------------------------------------------------------------------------------------- QATConfig


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"weight": 8}, TypeError, r"weight=8 must be a QuantSpec"),
        ({"weight": None}, TypeError, r"weight=None must be a QuantSpec"),
        ({"activation": {"bits": 8}}, TypeError, r"activation=\{'bits': 8\} must be a QuantSpec or None"),
        (
            {"activation": QuantSpec(per_channel=True)},
            ValueError,
            r"activation\.per_channel=True is not supported.*per_channel=False",
        ),
        (
            {"weight": QuantSpec(symmetric=True, ste="pact")},
            ValueError,
            r"weight\.ste='pact' is not supported.*use 'lsq'",
        ),
        ({"bn_mode": "freeze"}, ValueError, r"bn_mode='freeze' is not supported; choose one of 'fold'"),
        ({"keep": "first"}, TypeError, r"keep='first' must be a tuple of module names"),
        ({"keep": ("first", 3)}, TypeError, r"keep=\('first', 3\) must be a tuple of module names"),
        ({"keep_bits": 1}, ValueError, r"bits=1 is out of range"),
        ({"keep_bits": 17}, ValueError, r"bits=17 is out of range"),
        ({"keep_bits": 8.0}, TypeError, r"bits=8\.0 must be an int"),
    ],
)
def test_qat_config_rejects_bad_input(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        QATConfig(**kwargs)


def test_qat_config_defaults() -> None:
    cfg = QATConfig()
    assert cfg.weight == QuantSpec(bits=8, symmetric=True, per_channel=True, observer="minmax")
    assert cfg.activation == QuantSpec(bits=8, symmetric=False, per_channel=False, observer="ema")
    assert (cfg.bn_mode, cfg.keep, cfg.keep_bits, cfg.fuse_relu) == ("simulate", (), None, True)
    assert (cfg.weight.qmin, cfg.weight.qmax, cfg.activation.qmin, cfg.activation.qmax) == (-128, 127, 0, 255)
    assert QATConfig(activation=None).activation is None
    assert QATConfig(keep=["first", "last"]).keep == ("first", "last")  # a list is stored as a tuple


def test_spec_for_without_keep_bits() -> None:
    weight = QuantSpec(bits=4, symmetric=True, per_channel=True, ste="lsq")
    cfg = QATConfig(weight=weight, keep=("first", "last"))
    assert cfg.spec_for("weight", keep=False) is weight
    assert cfg.spec_for("activation", keep=False) is cfg.activation
    assert cfg.spec_for("weight", keep=True) is None  # kept layers stay in float
    assert cfg.spec_for("activation", keep=True) is None


def test_spec_for_with_keep_bits() -> None:
    weight = QuantSpec(bits=4, symmetric=True, per_channel=True, narrow_range=True, ste="lsq")
    activation = QuantSpec(bits=4, ste="pact", observer="ema")
    cfg = QATConfig(weight=weight, activation=activation, keep=("first",), keep_bits=8)
    kept_w, kept_a = cfg.spec_for("weight", keep=True), cfg.spec_for("activation", keep=True)
    assert kept_w == dataclasses.replace(weight, bits=8)
    assert (kept_w.qmin, kept_w.qmax) == (-127, 127)
    assert kept_a == dataclasses.replace(activation, bits=8)
    assert (kept_a.qmin, kept_a.qmax) == (0, 255)
    assert cfg.spec_for("weight", keep=False).bits == 4 and cfg.weight is weight  # the config is unchanged


def test_spec_for_weights_only() -> None:
    cfg = QATConfig(activation=None, keep=("last",), keep_bits=8)
    assert cfg.spec_for("activation", keep=False) is None
    assert cfg.spec_for("activation", keep=True) is None
    assert cfg.spec_for("weight", keep=True).bits == 8


def test_qat_config_dict_round_trip_through_json():
    import json

    for cfg in (
        QATConfig(),
        QATConfig(
            weight=QuantSpec(bits=4, symmetric=True, per_channel=True), activation=None, keep=("first",)
        ),
        QATConfig(
            activation=QuantSpec(bits=6, observer="percentile", ste="lsq"), bn_mode="fold", keep_bits=8
        ),
    ):
        assert QATConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown QATConfig fields"):
        QATConfig.from_dict({"wieght": {}})
    with pytest.raises(TypeError, match="from_dict needs a dict"):
        QATConfig.from_dict([1])


def test_lab_config_is_the_notebooks_recipe():
    from qatlab.config import lab_config

    cfg = lab_config(4)
    assert cfg.weight == QuantSpec(bits=4, symmetric=True, per_channel=True)
    assert cfg.activation == QuantSpec(bits=4, observer="ema", ste="lsq")
    assert cfg.bn_mode == "simulate"
    assert lab_config(8, activations=False).activation is None
    assert lab_config(8, bn_mode="fold").bn_mode == "fold"
