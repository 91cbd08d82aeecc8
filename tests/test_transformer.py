"""Transformer QAT (MiniLM-L6 as loaded by transformers): prepare quantizes exactly the configured Linears, is the
float model with fake quant off, dynamic vs static ranges, and ORT parity at two sequence lengths."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import qatlab
from qatlab import QuantSpec, experiments, saturation
from qatlab import transformer as tr
from qatlab.data import load_tweets, reseed, tweets_available
from qatlab.modules import FakeQuantizer, QuantLinear
from qatlab.quant import dynamic_qparams, qparams

needs_model = pytest.mark.skipif(
    not (tr.minilm_available() and tweets_available()),
    reason="MiniLM-L6 / transformers / tweet corpus not installed: make setup installs them",
)


# the first 2 of MiniLM-L6's encoder blocks: every kind of layer the tests check, at about a third of the export
# time (test_fewer_layers_keep_the_first_pretrained_blocks: the same weights as the full model's)
LAYERS = 2


@pytest.fixture(scope="module")
def minilm():
    torch.manual_seed(0)
    model, tok = tr.load_minilm(seed=0, layers=LAYERS)
    train_df, test_df = load_tweets(test_size=16, train_size=64, seed=0)
    train, test = tr.text_loaders(train_df, test_df, tok, max_length=24, batch_size=16)
    # a trained head: a random head gives near-tie logits (DESIGN.md), so train it briefly
    qatlab.fit(model, train, epochs=1, lr=5e-4, optimizer="adam", max_steps_per_epoch=4, progress=False)
    return model.eval(), tok, train, test, test_df


def test_dynamic_qparams_match_the_reference_formula():
    x = torch.tensor([[-1.0, 0.2], [3.0, 0.05]])
    spec = QuantSpec(bits=8)
    s, z = dynamic_qparams(x, spec)
    ref_s, ref_z = qparams(torch.tensor([-1.0]), torch.tensor([3.0]), spec)
    assert torch.equal(s, ref_s) and torch.equal(z, ref_z)
    # ONNX DynamicQuantizeLinear: scale = (max(x_max, 0) - min(x_min, 0)) / 255, zp = round(0 - x_min / scale)
    assert s.item() == pytest.approx(4.0 / 255, rel=1e-6) and z.item() == 64  # round(63.75)
    s, z = dynamic_qparams(torch.tensor([0.5, 1.5]), spec)  # all positive: the range still includes 0
    assert z.item() == 0 and s.item() == pytest.approx(1.5 / 255, rel=1e-6)


def test_dynamic_spec_validation():
    with pytest.raises(ValueError, match="per_channel=False"):
        QuantSpec(observer="dynamic", per_channel=True)
    with pytest.raises(ValueError, match="ste="):
        QuantSpec(observer="dynamic", ste="lsq")
    with pytest.raises(ValueError, match="weight.observer='dynamic'"):
        qatlab.QATConfig(weight=QuantSpec(observer="dynamic"))
    with pytest.raises(ValueError, match="activations="):
        tr.transformer_config(activations="per-token")


def test_dynamic_and_static_qparams_on_two_batches():
    small, large = torch.randn(4, 8, 16), 10 * torch.randn(4, 8, 16) + 3
    dyn = FakeQuantizer(QuantSpec(bits=8, observer="dynamic")).eval()
    sta = FakeQuantizer(QuantSpec(bits=8, observer="ema"))
    sta.calibrating = True  # what calibrate() does: static ranges come from calibration
    sta(small)
    sta.calibrating = False
    sta.eval()
    seen = []
    for x in (small, large):
        y_dyn, y_sta = dyn(x), sta(x)
        seen.append((dyn.scale.clone(), dyn.zero_point.clone(), sta.scale.clone()))
        s, z = dynamic_qparams(x, dyn.spec)
        assert torch.equal(y_dyn, qatlab.fake_quant(x, s, z, dyn.spec))  # each batch uses its own range
        assert torch.equal(
            y_sta, qatlab.fake_quant(x, seen[0][2], sta.zero_point, sta.spec)
        )  # the calibrated one
    assert not torch.equal(seen[0][0], seen[1][0])  # dynamic: the scale follows the batch
    assert seen[1][0].item() > 5 * seen[0][0].item()
    assert torch.equal(seen[0][2], seen[1][2])  # static: calibrated once, fixed in eval


@needs_model
def test_prepare_quantizes_exactly_the_configured_linears(minilm):
    model, *_ = minilm
    names = tr.linear_names(model)
    assert len(names) == 6 * LAYERS + 2  # Q, K, V, attention output, 2 FFN per block; pooler, head
    keep = ("hf.classifier", "hf.bert.pooler.dense")
    qat = qatlab.prepare_qat(model, tr.transformer_config(8, 8, keep=keep))
    quantized = {n for n, m in qat.named_modules() if isinstance(m, QuantLinear)}
    assert quantized == set(names) - set(keep)
    assert all(type(m) is torch.nn.Linear for n, m in qat.named_modules() if n in keep)
    # LayerNorm, embeddings and GELU are untouched
    assert sum(isinstance(m, torch.nn.LayerNorm) for m in qat.modules()) == sum(
        isinstance(m, torch.nn.LayerNorm) for m in model.modules()
    )


@needs_model
@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_fake_quant_off_equals_the_float_model(minilm, mode):
    model, _, train, test, _ = minilm
    qat = qatlab.calibrate(qatlab.prepare_qat(model, tr.transformer_config(8, 8, mode)), train, num_batches=1)
    x = next(iter(test))[0]
    qatlab.enable_fake_quant(qat, False)
    with torch.no_grad():
        assert torch.equal(qat.eval()(x), model(x))
    qatlab.enable_fake_quant(qat, True)
    with torch.no_grad():
        err = (qat(x) - model(x)).abs().max().item()
    assert 0 < err < 0.2  # W8A8 changes the logits, a little


@needs_model
@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_export_parity_at_two_sequence_lengths(minilm, tmp_path, mode):
    model, tok, train, test, test_df = minilm
    reseed(train, 0)  # the same calibration batches whatever ran before
    qat = qatlab.calibrate(
        qatlab.prepare_qat(model, tr.transformer_config(8, 8, mode)), train, num_batches=2
    ).eval()
    x24 = next(iter(test))[0]
    path = qatlab.export_onnx(qat, tmp_path / f"minilm_{mode}.onnx", x24[:1], dynamic_dims={1: "sequence"})
    kernels = qatlab.export.ort_integer_kernels(path)
    int8_linears = kernels.get("MatMulIntegerToFloat", 0) + kernels.get("QGemm", 0)
    assert int8_linears >= 6 * LAYERS  # the blocks' Linears run in int8
    for x in (x24, tr.tokenize(list(test_df["text"][:8]), tok, max_length=12)):
        r = qatlab.verify_onnx(qat, path, x, tol_lsb=float("inf"), min_agreement=0.0)
        with torch.no_grad():
            logits = qat(x)
            quant_error = (logits - model(x)).abs().max().item()
        assert r["n"] == len(x)
        # 64 requantizations of 8-bit activations: rounding ties that the file's float ops (numpy's or ORT's)
        # break the other way add up to logit differences of the order of the fake-quant error itself (measured
        # 0.009-0.020 with all 6 blocks, depending on the calibration batches, against a fake-quant error of
        # 0.017-0.021), so both are held to 5% of the logit range; dynamic ranges move every run-time scale a
        # little too: 10%. On AVX2 without VNNI, ORT's int16 saturation adds its part (measured 0.031 for static
        # ranges, about 2% of the range): the report says so, saturates_here, naming every Linear at risk.
        spread = (logits.max() - logits.min()).item()
        bound = (0.05 if mode == "static" else 0.1) * spread
        assert r["semantic_max_abs_diff"] < bound and r["max_abs_diff"] < bound
        assert len(r["layers_at_risk"]) == 6 * LAYERS  # every int8 Linear has pairs that can overflow int16
        assert r["saturates_here"] == saturation.cpu_int8().saturates
        # The head here is barely trained (near-tie logits), so agreement is checked where the decision is not a
        # near-tie: tweets whose PyTorch margin exceeds the fake-quant error must get the file's vote too.
        out = torch.from_numpy(saturation.run_reference(path, [x.numpy()])[0])
        top2 = logits.topk(2, dim=1).values
        clear = (top2[:, 0] - top2[:, 1]) > quant_error
        assert clear.sum() >= 2 and torch.equal(out[clear].argmax(1), logits[clear].argmax(1))


@needs_model
def test_layer_sensitivity_rows(minilm):
    model, _, train, test, _ = minilm
    layers = ["hf.classifier", "hf.bert.encoder.layer.0.attention.self.query"]
    df = experiments.layer_sensitivity(model, tr.transformer_config(4, None), train, test, layers=layers,
                                       calib_batches=1, progress=False)  # fmt: skip
    assert sorted(df["layer"]) == sorted(layers) and df["output_sqnr_db"].is_monotonic_increasing
    # one layer quantized in isolation: matches a direct PTQ with every other layer kept in float
    keep = tuple(n for n in tr.linear_names(model) if n != "hf.classifier")
    reseed(train, 0)  # layer_sensitivity calibrates every layer on the same batches
    q = qatlab.ptq(model, tr.transformer_config(4, None, keep=keep), train, num_batches=1)
    direct = qatlab.evaluate(q, test)["acc"]
    assert df.set_index("layer").loc["hf.classifier", "acc"] == pytest.approx(direct)
    with pytest.raises(ValueError, match="not Conv2d/Linear"):
        experiments.layer_sensitivity(model, tr.transformer_config(), train, test, layers=["hf.nope"])


def test_tweets_loader_dedup_and_split():
    if not tweets_available():
        pytest.skip("tweet corpus not installed")
    train, test = load_tweets(test_size=100, train_size=300, seed=1)
    assert len(train) == 300 and len(test) == 100
    both = pd.concat([train, test])
    assert both["text"].is_unique and set(both["label"]) <= {0, 1}
    train2, test2 = load_tweets(test_size=100, train_size=50, seed=1)
    assert test2.equals(test) and train2.equals(train.iloc[:50])  # the test set does not depend on train_size
    with pytest.raises(ValueError, match="test_size"):
        load_tweets(test_size=10**6)


@needs_model
def test_attention_matmuls_quantized_calibrated_and_exported(minilm, tmp_path):
    model, _, train, test, _ = minilm
    plain = qatlab.prepare_qat(model, tr.transformer_config(8, 8))
    qat = qatlab.prepare_qat(model, tr.transformer_config(8, 8))
    assert tr.quantize_attention(qat) == LAYERS  # one per encoder block
    n_plain, n_attn = len(list(qatlab.prepare.quantizers(plain))), len(list(qatlab.prepare.quantizers(qat)))
    assert n_attn == n_plain + LAYERS * 4  # query, key, value, probs
    for m in (plain, qat):
        qatlab.data.reseed(train, 0)
        qatlab.calibrate(m, train, num_batches=2)
    probs = qat.hf.bert.encoder.layer[0].attention.self.attn_quant["probs"]
    assert probs.calibrated and probs.observer.min_val.item() >= 0 and probs.observer.max_val.item() <= 1
    x = next(iter(test))[0]
    with torch.no_grad():
        a, b = plain.eval()(x), qat.eval()(x)
        qatlab.enable_fake_quant(qat, False)
        assert torch.allclose(qat(x), model(x), atol=1e-5)  # the new attention function is BERT's with FQ off
        qatlab.enable_fake_quant(qat, True)
    assert not torch.equal(a, b)  # the attention quantizers change the output
    path = qatlab.export_onnx(qat, tmp_path / "attn.onnx", x[:1], dynamic_dims={1: "sequence"})
    r = qatlab.verify_onnx(qat, path, x, tol_lsb=float("inf"), min_agreement=0.0)
    # softmax codes flip between float implementations: a looser bound
    bound = 0.1 * (b.max() - b.min()).item()
    assert r["max_abs_diff"] < bound and r["semantic_max_abs_diff"] < bound
    # the emulator computes every integer layer, the activation x activation products (Q K^T) included, from
    # its codes; summed exactly (as VNNI does), that is the reference evaluator up to the same rounding ties
    exact, clipped = saturation.emulate(path, x, saturate=False)
    assert abs(exact - b.numpy()).max() < bound and sum(clipped.values()) == 0
    with pytest.raises(ValueError, match="per tensor"):
        tr.quantize_attention(qat, QuantSpec(per_channel=True))


@needs_model
def test_fewer_layers_keep_the_first_pretrained_blocks(minilm):
    """``layers=2`` (the notebooks' fast mode) is the first two pretrained blocks of MiniLM-L6, unchanged: the
    same weights as the full model's blocks 0 and 1, the same embeddings, 6 Linears a block (+ pooler, head)."""
    full, _ = tr.load_minilm(seed=0)
    short, _ = tr.load_minilm(seed=0, layers=2)
    assert len(short.hf.bert.encoder.layer) == 2 and len(tr.linear_names(short)) == 2 * 6 + 2
    full_sd = full.state_dict()
    for name, value in short.state_dict().items():
        assert torch.equal(value, full_sd[name]), name  # the head too: the same seed draws it
    with pytest.raises(ValueError, match=r"layers=7 must be an int in \[1, 6\]"):
        tr.load_minilm(layers=7)
