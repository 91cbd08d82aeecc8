"""Paper findings (qatlab.reproduce): the verdict rules on hand-built tables with known answers, the run function
(deterministic, validated), and the sweep (only the current grids, resumed from its files)."""

from __future__ import annotations

import itertools
import math

import pandas as pd
import pytest

from qatlab import reproduce as rp


def _rows(key, configs, metrics_fn, seeds=(0, 1)):
    """A fake sweep table for one finding: the grid's columns, then metrics_fn(config, seed)."""
    out = []
    for config, seed in itertools.product(configs, seeds):
        out.append({"finding": key, **config, "seed": seed, "float_acc": 0.90, "diverged": 0, "key": f"{key}{len(out)}",
                    **metrics_fn(config, seed)})  # fmt: skip
    return pd.DataFrame(out)


def _same(a, b):
    """Equal metric dicts, NaN equal to NaN."""
    return a.keys() == b.keys() and all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)


def _judge(key, table):
    f = rp.finding(key)
    return f.judge(rp._rows(table, f))


def test_margin_is_half_a_point_or_twice_the_larger_std():
    assert rp.margin() == 0.005
    assert rp.margin(0.001, 0.002) == 0.005
    assert rp.margin(0.01, 0.002) == pytest.approx(0.02)
    assert rp.margin(float("nan"), 0.004) == pytest.approx(0.008)


def test_bit_cliff_verdicts():
    configs = [{"bits": b} for b in (8, 4, 3)]

    def good(c, s):  # 8 bits free, a cliff at 4 and 3, QAT recovers most
        ptq = {8: 0.899, 4: 0.85, 3: 0.40}[c["bits"]]
        return {"ptq_acc": ptq + 0.001 * s, "qat_acc": {8: 0.90, 4: 0.89, 3: 0.80}[c["bits"]] + 0.001 * s}

    text, verdict = _judge("bit_cliff", _rows("bit_cliff", configs, good))
    assert verdict == "reproduced" and "W4A4: PTQ -4.95" in text and "80% of the PTQ loss recovered" in text

    def no_recovery(c, s):  # QAT gets back less than half of the PTQ loss
        ptq = {8: 0.899, 4: 0.85, 3: 0.40}[c["bits"]]
        return {"ptq_acc": ptq, "qat_acc": ptq + 0.01}

    assert _judge("bit_cliff", _rows("bit_cliff", configs, no_recovery))[1] == "partly"


def test_per_channel_verdict_needs_a_gain_after_folding_larger_than_before():
    configs = [{"model": m, "per_channel": pc, "bn_mode": bn, "w_bits": 4, "steps": 0}
               for m in ("cnn", "dwcnn") for pc in (False, True) for bn in ("keep", "fold")]  # fmt: skip
    gap = {("cnn", "keep"): 0.01, ("cnn", "fold"): 0.03, ("dwcnn", "keep"): 0.05, ("dwcnn", "fold"): 0.60}

    def metrics(c, s):
        return {"ptq_acc": 0.88 - (0 if c["per_channel"] else gap[(c["model"], c["bn_mode"])])}

    text, verdict = _judge("per_channel", _rows("per_channel", configs, metrics))
    assert (
        verdict == "reproduced" and "dwcnn: per-channel minus per-tensor +60.00 points after folding" in text
    )
    gap = dict.fromkeys(gap, 0.0)  # granularity changes nothing
    assert _judge("per_channel", _rows("per_channel", configs, metrics))[1] == "not reproduced"


def test_range_setting_spread_small_at_8_large_at_4():
    configs = [{"observer": o, "bits": b, "per_channel": False, "steps": 0}
               for o in ("minmax", "percentile", "mse") for b in (8, 4)]  # fmt: skip
    acc = {("minmax", 8): 0.900, ("percentile", 8): 0.901, ("mse", 8): 0.899,
           ("minmax", 4): 0.80, ("percentile", 4): 0.82, ("mse", 4): 0.84}  # fmt: skip
    text, verdict = _judge(
        "range_setting",
        _rows("range_setting", configs, lambda c, s: {"ptq_acc": acc[(c["observer"], c["bits"])]}),
    )
    assert (
        verdict == "reproduced"
        and "W4A4: spread 4.00 points, best mse" in text
        and "W8A8: spread 0.20" in text
    )


def test_seed_noise_hides_a_difference_but_a_shared_float_model_does_not():
    configs = [{"a_ste": ste, "a_bits": 2} for ste in ("identity", "clipped")]

    def noisy(c, s):  # clipped better by 2 points on average, but one seed says +8, the other -4
        base = 0.78 if c["a_ste"] == "clipped" else 0.76
        return {"qat_acc": base + (0.03 if s == (c["a_ste"] == "clipped") else -0.03)}

    text, verdict = _judge("clipped_ste", _rows("clipped_ste", configs, noisy))
    assert verdict == "not reproduced" and "+2.00 points, margin 12.00" in text

    def shared(c, s):  # each seed's float model moves both arms alike: the paired difference is always +2
        return {"qat_acc": (0.78 if c["a_ste"] == "clipped" else 0.76) + (0.03 if s else -0.03)}

    assert _judge("clipped_ste", _rows("clipped_ste", configs, shared))[1] == "reproduced"
    quiet = _rows("clipped_ste", configs, lambda c, s: {"qat_acc": 0.78 if c["a_ste"] == "clipped" else 0.76})
    assert _judge("clipped_ste", quiet)[1] == "reproduced"


def test_bn_reestimation_uses_paired_differences():
    configs = [{"model": "dwcnn", "w_bits": b, "record": True, "bn_reestimate": True} for b in (3, 4)]

    def metrics(c, s):  # accuracies vary a lot between seeds, the gain of re-estimation does not
        q = 0.60 + 0.2 * s
        return {"qat_acc": q, "bnre_acc": q + 0.02, "oscillating": 0.1}

    text, verdict = _judge("oscillation_bn", _rows("oscillation_bn", configs, metrics))
    assert (
        verdict == "reproduced" and "BN re-estimation +2.00 points" in text and "per seed +2.0, +2.0" in text
    )


def test_lsq_diverged_runs_count_at_chance_and_static_fold_only_must_not_be_worse():
    configs = [{"w_ste": "lsq", "a_ste": "lsq", "bits": 3, "lsq_grad_scale": g, "lr": lr}
               for g in (True, False) for lr in (2.5e-3, 2.5e-2)]  # fmt: skip

    def metrics(c, s):
        if not c["lsq_grad_scale"] and c["lr"] > 0.01:
            return {"qat_acc": float("nan"), "diverged": 1}
        return {"qat_acc": 0.85}

    text, verdict = _judge("lsq_grad_scale", _rows("lsq_grad_scale", configs, metrics))
    assert verdict == "reproduced" and "(2 of 2 diverged)" in text and "unscaled 10.00%" in text
    fold = [{"bn_mode": m, "bits": b} for m in ("fold", "simulate") for b in (8, 4)]
    better = _rows("static_fold", fold, lambda c, s: {"qat_acc": 0.90 if c["bn_mode"] == "fold" else 0.88})
    worse = _rows("static_fold", fold, lambda c, s: {"qat_acc": 0.86 if c["bn_mode"] == "fold" else 0.88})
    assert (
        _judge("static_fold", better)[1] == "reproduced"
        and _judge("static_fold", worse)[1] == "not reproduced"
    )


def test_findings_table_and_markdown(tmp_path):
    table = _rows("bit_cliff", [{"bits": 8}, {"bits": 4}], lambda c, s: {"ptq_acc": 0.89, "qat_acc": 0.895})
    findings = rp.findings_table(table)
    assert len(findings) == len(rp.FINDINGS) >= 8
    assert findings.set_index("#").loc[2, "verdict"] == "not run"  # findings without runs say so
    assert set(findings.columns) >= {"claim", "paper", "published", "ours", "seeds", "verdict"}
    assert all(f.published and f.paper for f in rp.FINDINGS)
    md = rp.to_markdown(pd.DataFrame({"a": ["x | y"], "b": [1]}))
    assert md.splitlines() == ["| a | b |", "|---|---|", "| x \\| y | 1 |"]
    path = rp.write_findings(findings, tmp_path / "f.md", title="T")
    text = path.read_text()
    assert text.startswith("# T\n") and text.count("\n| ") == len(findings) + 1
    assert not list(tmp_path.glob("*.tmp"))


def test_run_config_is_validated():
    with pytest.raises(ValueError, match="unknown config keys"):
        rp.run({"bitz": 4}, 0)
    with pytest.raises(ValueError, match="model="):
        rp.run({"model": "vgg"}, 0)
    with pytest.raises(ValueError, match="multiple of evals"):
        rp.run({"steps": 10, "evals": 3}, 0)
    with pytest.raises(ValueError, match="needs init='calibrated'"):
        rp.run({"steps": 0, "init": "raw"}, 0)


@pytest.fixture
def fast_lab(monkeypatch, tmp_path):
    monkeypatch.setenv("QATLAB_FAST", "1")
    monkeypatch.setenv("QATLAB_BUILD", str(tmp_path))
    monkeypatch.setattr(rp, "_FLOAT", {})
    return tmp_path


def test_runs_are_deterministic_and_metrics_consistent(fast_lab):
    ptq = {"bits": 4, "steps": 0}
    assert _same(rp.run(ptq, 0), rp.run(ptq, 0))
    qat = {
        "w_ste": "lsq",
        "a_ste": "pact",
        "bits": 4,
        "steps": 4,
        "evals": 2,
        "record": True,
        "bn_reestimate": True,
    }
    model, a = rp.run_model(qat, 1)
    b = rp.run(qat, 1)
    assert _same(a, b)  # same config and seed: the same numbers, bit for bit
    assert model is not None and a["diverged"] == 0
    for k in ("ptq_acc", "qat_acc", "acc_first", "bnre_acc", "alpha_ratio", "oscillating", "flips_per_step"):
        assert math.isfinite(a[k]), k
    assert 0 <= a["oscillating"] <= 1 and 0 <= a["flips_per_step"] <= 1
    lsq = {**qat, "a_ste": "lsq", "record": False, "bn_reestimate": False}
    scaled, unscaled = rp.run(lsq, 1), rp.run({**lsq, "lsq_grad_scale": False}, 1)
    # without LSQ's 1/sqrt(N Qp) the activation scales move much further in the same steps
    assert abs(unscaled["alpha_ratio"] - 1) > 3 * abs(scaled["alpha_ratio"] - 1) > 0


def test_sweep_keeps_only_current_grids_and_resumes(fast_lab, monkeypatch):
    calls = []

    def fake(config, seed):
        calls.append((config["finding"], seed))
        return {"float_acc": 0.9, "ptq_acc": 0.8, "qat_acc": 0.85, "diverged": 0}

    monkeypatch.setattr(rp, "run", fake)
    trained = []
    monkeypatch.setattr(rp, "float_model", lambda name, seed=0: trained.append((name, seed)))
    findings = [rp.finding("static_fold"), rp.finding("bit_cliff")]
    out = fast_lab / "sweep"
    old = rp.reproduce(findings, out, seeds=(5,), progress=False)  # another seed: a stale run in the folder
    assert sorted(trained) == [("cnn", 5)]  # each seed's float model is made before the runs (not by workers)
    calls.clear()
    table = rp.reproduce(findings, out, progress=False)
    n = sum(len(rp.grids([f])[0]["bits"]) * (2 if f.key == "static_fold" else 1) for f in findings)
    assert len(table) == n == len(calls) and set(table["seed"]) == {0}
    assert len(old) == n and len(list((out / "runs").glob("*.json"))) == 2 * n
    calls.clear()
    again = rp.reproduce(findings, out, progress=False)
    assert calls == [] and again.equals(table)


def test_each_seed_has_its_own_float_model_unless_pinned(fast_lab):
    import torch

    ptq = {"bits": 8, "steps": 0}
    a, pinned = rp.run(ptq, 0), rp.run({**ptq, "float_seed": 0}, 1)
    w0, w1 = (rp.float_model("cnn", s)[0].features[0].weight for s in (0, 1))
    assert not torch.equal(w0, w1)  # seed 1 trained its own float model
    assert pinned["float_acc"] == a["float_acc"]  # float_seed=0 uses seed 0's
    with pytest.raises(ValueError, match="float_seed='x'"):
        rp.run({"float_seed": "x"}, 0)
