"""2:4 sparsity + QAT: the masks, the pattern at every optimizer step, prepare_qat, squash, ONNX codes, errors."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

import qatlab
from qatlab import QATConfig, QuantSpec
from qatlab import sparsity as sp
from qatlab.data import digits_loaders
from qatlab.models import LabCNN, build_model
from qatlab.modules import QuantConv2d, QuantConvBn2d, QuantLinear

W4A4 = QATConfig(
    weight=QuantSpec(bits=4, symmetric=True, per_channel=True),
    activation=QuantSpec(bits=4, observer="ema", ste="lsq"),
)


@pytest.fixture(scope="module")
def digits():
    train, test = digits_loaders(batch_size=64, seed=0)
    return train, torch.cat([x for x, _ in test])  # x_test: (450, 1, 8, 8)


@pytest.fixture(scope="module")
def sparse_cnn(digits):
    """LabCNN briefly trained on digits, then pruned 2:4 one shot and fine-tuned sparse."""
    train, _ = digits
    torch.manual_seed(0)
    model = LabCNN(width=8)
    qatlab.fit(model, train, epochs=2, lr=0.05, progress=False)
    sp.apply_2to4(model)
    qatlab.fit(model, train, epochs=1, lr=0.01, progress=False, max_steps_per_epoch=5)
    return model.eval()


def reference_mask(w: torch.Tensor) -> torch.Tensor:
    """The 2:4 mask written with loops: per (out, kh, kw), per 4 consecutive input channels, keep the top 2 |w|."""
    mask = torch.ones_like(w, dtype=torch.bool)
    for o in range(w.shape[0]):
        for rest in itertools.product(*(range(s) for s in w.shape[2:])):
            for start in range(0, w.shape[1], 4):
                idx = [(o, i, *rest) for i in range(start, start + 4)]
                values = [abs(float(w[i])) for i in idx]
                for k in sorted(range(4), key=lambda k: values[k])[:2]:
                    mask[idx[k]] = False
    return mask


def pattern_ok(model: nn.Module) -> bool:
    return all(sp.check_2to4(m.weight) for n, m in model.named_modules() if n in sp.masks(model))


# ---- masks ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 8), (5, 12, 3, 3), (4, 8, 1, 2)])
def test_masks_2to4_keeps_the_two_largest_of_each_group_along_the_input_dimension(shape):
    torch.manual_seed(0)
    w = torch.randn(shape)
    mask = sp.masks_2to4(w)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    assert torch.equal(mask, reference_mask(w))
    assert sp.check_2to4(w * mask)
    assert (~mask).float().mean().item() == 0.5


def test_conv_groups_run_over_input_channels_not_over_the_kernel():
    w = torch.zeros(1, 4, 2, 2)
    w[0, :, 0, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0])  # one group at (kh, kw) = (0, 0): channels 0..3
    w[0, :, 1, 1] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    mask = sp.masks_2to4(w)
    assert mask[0, :, 0, 0].tolist() == [False, False, True, True]
    assert mask[0, :, 1, 1].tolist() == [True, True, False, False]
    by_channel = torch.zeros(1, 4, 2, 2)
    by_channel[0, :2] = 1.0  # input channels 0, 1 dense, 2, 3 zero: every (kh, kw) group holds 2 zeros
    assert sp.check_2to4(by_channel)
    by_channel[0, 2, 0, 0] = 1.0  # the group at (0, 0) now holds 1 zero, though the kernels hold many
    assert not sp.check_2to4(by_channel)


def test_fraction_prunes_the_least_damaging_groups_and_grows_the_same_mask():
    w = torch.tensor([[0.1, 0.2, 5.0, 5.0, 1.0, 2.0, 5.0, 5.0, 0.01, 0.02, 5.0, 5.0, 3.0, 3.0, 5.0, 5.0]])
    half = sp.masks_2to4(w, fraction=0.5)  # 4 groups; damages 0.3, 3.0, 0.03, 6.0: groups 2 and 0 go
    pruned_groups = (~half).reshape(4, 4).any(1).tolist()
    assert pruned_groups == [True, False, True, False]
    w2 = w * half
    w2[0, 0] = 9.0  # a pruned entry that moved (before masking) must not change the choice
    more = sp.masks_2to4(w2, fraction=0.75, current=half)
    assert torch.equal(more & half, more)  # pruned entries stay pruned
    assert (~more).reshape(4, 4).any(1).tolist() == [True, True, True, False]
    assert torch.equal(sp.masks_2to4(w, fraction=0.0), torch.ones_like(w, dtype=torch.bool))


def test_check_2to4_and_its_errors():
    ok = torch.tensor([[0.0, 1.0, 0.0, 2.0, 3.0, 0.0, 0.0, 0.0]])
    assert sp.check_2to4(ok) and sp.check_2to4(ok.numpy())
    assert not sp.check_2to4(torch.tensor([[0.0, 1.0, 1.0, 2.0]]))
    assert sp.check_2to4(ok.T, axis=0)
    with pytest.raises(ValueError, match="multiple of 4"):
        sp.check_2to4(torch.zeros(3, 6))
    with pytest.raises(ValueError, match="multiple of 4"):
        sp.masks_2to4(torch.zeros(8, 1, 3, 3))
    with pytest.raises(ValueError, match="fraction"):
        sp.masks_2to4(torch.zeros(2, 4), fraction=1.5)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        sp.masks_2to4([[1.0, 2.0, 3.0, 4.0]])


# ---- model-level masks, eligibility and errors --------------------------------------------------------------


def test_ineligible_layers_are_skipped_and_reported():
    model = LabCNN(width=8)
    assert sp.eligible_layers(model) == ["features.3", "features.6", "features.9", "classifier"]
    report = sp.apply_2to4(model).set_index("layer")
    assert not report.loc["features.0", "masked"] and not report.loc["features.0", "eligible"]
    assert "input channels per group" in report.loc["features.0", "note"]
    assert report.loc["features.0", "zeros"] == 0.0  # left dense
    assert report.loc[["features.3", "features.6", "features.9", "classifier"], "is_2to4"].all()
    assert (report.loc[report["eligible"], "zeros"] == 0.5).all()
    dw = sp.apply_2to4(build_model("dwcnn", width=8)).set_index("layer")
    depthwise = dw[dw["note"].str.startswith("depthwise")]
    assert len(depthwise) == 3 and not depthwise["masked"].any()
    assert dw.loc[dw["eligible"], "is_2to4"].all()


def test_bad_input_raises_clear_errors():
    model = LabCNN(width=8)
    with pytest.raises(ValueError, match=r"'features\.0' cannot take 2:4.*not a multiple of 4.*Leave it out"):
        sp.apply_2to4(model, layers=["features.0"])
    with pytest.raises(ValueError, match=r"'features\.1' is not a Conv2d/Linear layer.*eligible layers"):
        sp.apply_2to4(model, layers=["features.1"])
    with pytest.raises(TypeError, match="list of layer names"):
        sp.apply_2to4(model, layers="features.3")
    with pytest.raises(ValueError, match="masks= alone"):
        sp.apply_2to4(model, masks={"classifier": torch.ones(10, 32)}, fraction=0.5)
    with pytest.raises(ValueError, match="masks is empty"):
        sp.apply_2to4(model, masks={})
    with pytest.raises(TypeError, match="masks must be a"):
        sp.apply_2to4(model, masks=[torch.ones(10, 32)])
    with pytest.raises(ValueError, match="layers is empty"):
        sp.apply_2to4(model, layers=[])
    with pytest.raises(ValueError, match=r"shape \(10, 32\)"):
        sp.apply_2to4(model, masks={"classifier": torch.ones(10, 16, dtype=torch.bool)})
    one_zero = torch.ones(10, 32, dtype=torch.bool)
    one_zero[0, 0] = False
    with pytest.raises(ValueError, match="exactly 1 entry"):
        sp.apply_2to4(model, masks={"classifier": one_zero})
    with pytest.raises(ValueError, match="no layer eligible"):
        sp.apply_2to4(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Linear(3, 2)))
    with pytest.raises(ValueError, match="no 2:4 masks"):
        sp.squash(model)
    with pytest.raises(ValueError, match="apply_2to4"):
        sp.prepare_sparse_qat(model, W4A4)
    with pytest.raises(ValueError, match="prune_epochs=5 exceeds epochs=4"):
        sp.gradual_schedule(4, prune_epochs=5)
    with pytest.raises(ValueError, match="decreases"):
        sp.GradualPruning([0.5, 0.2])
    pruner = sp.GradualPruning([0.5])
    pruner(0, model)
    with pytest.raises(ValueError, match="one entry per epoch"):
        pruner(1, model)
    assert sp.masks(model).keys() == {"features.3", "features.6", "features.9", "classifier"}  # untouched


# ---- the pattern at every optimizer step --------------------------------------------------------------------


@pytest.fixture
def after_each_step():
    """``after_each_step(check)``: run ``check()`` after every optimizer step; returns the list of its results.

    Register it after a mask was applied: global hooks run in registration order, so it runs after qatlab's
    re-masking hook and sees the weights the next forward will see.
    """
    handles = []

    def register(check):
        seen = []
        handles.append(register_optimizer_step_post_hook(lambda opt, args, kwargs: seen.append(check())))
        return seen

    yield register
    for h in handles:
        h.remove()


OPTIMIZERS = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9),
    "sgd_weight_decay": lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9, weight_decay=0.1),
    "adam": lambda p: torch.optim.Adam(p, lr=0.05),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("qat", [False, True], ids=["float", "qat"])
def test_pattern_holds_after_every_step_of_a_custom_optimizer(digits, after_each_step, name, qat):
    train, _ = digits
    torch.manual_seed(0)
    model = LabCNN(width=8)
    sp.apply_2to4(model)
    if qat:
        model = sp.prepare_sparse_qat(model, W4A4)
        qatlab.calibrate(model, train, num_batches=1)
    masks_before = sp.masks(model)
    seen = after_each_step(lambda: pattern_ok(model))
    opt = OPTIMIZERS[name](model.parameters())
    for x, y in itertools.islice(itertools.cycle(train), 6):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        pruned_grad = model.classifier.weight.grad[~model.classifier.sparse_mask]
        assert pruned_grad.abs().sum() > 0  # the optimizer really pushes pruned weights away from 0
        opt.step()
    assert seen == [True] * 6
    assert all(
        torch.equal(a, b) for a, b in zip(masks_before.values(), sp.masks(model).values(), strict=True)
    )
    sp.remove_masks(model)  # control: without the hooks one step breaks the pattern
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert not sp.check_2to4(model.classifier.weight)


@pytest.mark.parametrize("optimizer,weight_decay", [("sgd", 0.0), ("sgd", 1e-2), ("adam", 1e-2)])
def test_fit_keeps_the_pattern_at_every_step_of_its_own_optimizer(
    digits, after_each_step, optimizer, weight_decay
):
    train, _ = digits
    torch.manual_seed(0)
    model = LabCNN(width=8)
    sp.apply_2to4(model)
    seen = after_each_step(lambda: pattern_ok(model))
    qatlab.fit(model, train, epochs=2, lr=0.1, optimizer=optimizer, weight_decay=weight_decay,
               max_steps_per_epoch=4, progress=False)  # fmt: skip
    assert seen == [True] * 8


def test_masks_survive_prepare_qat_by_module_name(sparse_cnn, digits):
    train, _ = digits
    float_masks = sp.masks(sparse_cnn)
    for bn_mode in ("simulate", "fold"):
        qat = sp.prepare_sparse_qat(sparse_cnn, QATConfig(bn_mode=bn_mode))
        qat_masks = sp.masks(qat)
        assert qat_masks.keys() == float_masks.keys()
        assert all(torch.equal(qat_masks[n], float_masks[n]) for n in float_masks)
        assert type(qat.get_submodule("features.3")) is (
            QuantConvBn2d if bn_mode == "simulate" else QuantConv2d
        )
        assert isinstance(qat.classifier, QuantLinear)
        qatlab.calibrate(qat, train, num_batches=2)
        qatlab.fit(qat, train, epochs=1, lr=0.05, max_steps_per_epoch=4, progress=False)
        for name, mask in float_masks.items():
            w = qat.get_submodule(name).weight
            assert torch.all(w[~mask] == 0) and sp.check_2to4(w)
    plain = qatlab.prepare_qat(sparse_cnn, W4A4)  # without the masks, QAT lets the zeros grow back
    qatlab.calibrate(plain, train, num_batches=2)
    qatlab.fit(plain, train, epochs=1, lr=0.05, max_steps_per_epoch=4, progress=False)
    assert not sp.check_2to4(plain.classifier.weight)
    assert sp.masks(sparse_cnn).keys() == float_masks.keys()  # the float model kept its masks


def test_squash_gives_the_same_outputs_and_leaves_a_plain_model(sparse_cnn, digits):
    train, x = digits
    qat = qatlab.calibrate(sp.prepare_sparse_qat(sparse_cnn, W4A4), train, num_batches=2)
    qatlab.fit(qat, train, epochs=1, lr=0.05, max_steps_per_epoch=3, progress=False)
    qat.eval()
    with torch.no_grad():
        before = qat(x)
    sp.squash(qat)
    with torch.no_grad():
        after = qat(x)
    assert torch.equal(before, after)
    assert not any(k.endswith("sparse_mask") for k in qat.state_dict())
    assert not any(sp._premask in m._forward_pre_hooks.values() for m in qat.modules())
    assert sp.sparsity_report(qat).query("eligible")["is_2to4"].all()
    assert not sp.sparsity_report(qat)["masked"].any()


def test_remove_masks_lets_pruned_weights_grow_back(sparse_cnn, digits):
    train, _ = digits
    model = copy.deepcopy(sparse_cnn)
    sp.remove_masks(model)
    assert sp.check_2to4(model.classifier.weight)  # the weights keep their zeros for now
    qatlab.fit(model, train, epochs=1, lr=0.05, max_steps_per_epoch=3, progress=False)
    assert sp.sparsity_report(model)["zeros"].max() < 0.1


def test_deepcopy_state_dict_and_double_forward(sparse_cnn, digits):
    train, x = digits
    clone = copy.deepcopy(sparse_cnn)  # new parameters: the forward pre-hook registers them for the step hook
    assert sp.masks(clone).keys() == sp.masks(sparse_cnn).keys()
    qatlab.fit(clone, train, epochs=1, lr=0.1, optimizer="adam", max_steps_per_epoch=3, progress=False)
    assert pattern_ok(clone)
    state = clone.state_dict()
    assert "classifier.sparse_mask" in state and state["classifier.sparse_mask"].dtype == torch.bool
    fresh = LabCNN(width=8)
    sp.apply_2to4(fresh, masks=sp.masks(clone))
    fresh.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), state.values(), strict=True))
    # Two forwards, one backward: the pre-hook must not modify a weight autograd saved.
    clone.train()
    loss = clone(x[:8]).sum() + clone(x[8:16]).sum()
    loss.backward()
    assert clone.classifier.weight.grad is not None


def test_the_pre_hook_masks_a_weight_changed_outside_the_optimizer(sparse_cnn, digits):
    _, x = digits
    model = copy.deepcopy(sparse_cnn)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)  # every entry nonzero now
    assert not sp.check_2to4(model.classifier.weight)
    model(x[:2])
    assert sp.check_2to4(model.classifier.weight)


def test_gradual_schedule_and_pruning_callback(digits):
    train, _ = digits
    assert sp.gradual_schedule(3) == pytest.approx([1 - (2 / 3) ** 3, 1 - (1 / 3) ** 3, 1.0])
    assert sp.gradual_schedule(5, prune_epochs=2) == pytest.approx([0.875, 1.0, 1.0, 1.0, 1.0])
    torch.manual_seed(0)
    model = LabCNN(width=8)
    pruner = sp.GradualPruning(sp.gradual_schedule(4, prune_epochs=3))
    seen = []
    qatlab.fit(model, train, epochs=4, lr=0.05, max_steps_per_epoch=3, progress=False, on_epoch_start=pruner,
               on_epoch_end=lambda e, m, row: seen.append(sp.masks(m)))  # fmt: skip
    assert [h["epoch"] for h in pruner.history] == [1, 2, 3, 4]
    zeros = [h["zeros"] for h in pruner.history]
    assert zeros == sorted(zeros) and zeros[0] == pytest.approx(0.5 * 0.704, abs=0.02)
    assert zeros[-1] == pytest.approx(0.5, abs=1e-3)
    for earlier, later in itertools.pairwise(seen):  # masks only grow: pruned entries stay pruned
        assert all(torch.equal(later[n] & earlier[n], later[n]) for n in earlier)
    assert pattern_ok(model)


# ---- ONNX ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        W4A4,
        QATConfig(weight=QuantSpec(bits=8, per_channel=False), activation=QuantSpec(bits=8)),
    ],
    ids=["w4a4_per_channel_symmetric", "w8a8_per_tensor_asymmetric"],
)
def test_exported_onnx_has_the_2to4_pattern_in_the_integer_weights(sparse_cnn, digits, tmp_path, config):
    train, x = digits
    qat = qatlab.calibrate(sp.prepare_sparse_qat(sparse_cnn, config), train, num_batches=2)
    qatlab.fit(qat, train, epochs=1, lr=0.02, max_steps_per_epoch=3, progress=False)
    sp.squash(qat)
    path = qatlab.export_onnx(qat, tmp_path / "sparse.onnx", x[:1])
    report = sp.onnx_2to4_report(path).set_index("layer")
    assert list(report.index) == ["features.0", "features.3", "features.6", "features.9", "classifier"]
    assert report.loc["classifier", "consumer"] == "Gemm" and (report["axis"] == 1).all()
    assert not report.loc["features.0", "eligible"]
    assert report.loc[report["eligible"], "is_2to4"].all() and report["eligible"].sum() == 4
    assert (report.loc[report["eligible"], "zero_codes"] >= 0.5).all()
    if not config.weight.symmetric:  # a nonzero zero point: a pruned weight is the code == zero point, not 0
        assert int(qat.classifier.weight_quant.zero_point) != 0
    assert qatlab.verify_onnx(qat, path, x)["passed"]
    dense = qatlab.calibrate(qatlab.prepare_qat(build_model("cnn", width=8), config), train, num_batches=2)
    dense_report = sp.onnx_2to4_report(qatlab.export_onnx(dense, tmp_path / "dense.onnx", x[:1]))
    assert not dense_report["is_2to4"].any()


def _qdq_matmul_model(w: np.ndarray, path) -> None:
    """x (1, in) @ DQ(Q(W)) with W stored (in, out): the reduction axis is 0."""
    nodes = [
        helper.make_node("QuantizeLinear", ["W", "s", "z"], ["wq"]),
        helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["wd"]),
        helper.make_node("MatMul", ["x", "wd"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(w, "W"),
        numpy_helper.from_array(np.array(0.1, np.float32), "s"),
        numpy_helper.from_array(np.array(3, np.uint8), "z"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, w.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, w.shape[1]])], inits,
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path))


def test_onnx_report_reads_a_matmul_weight_along_its_input_axis(tmp_path):
    w = np.array([[0.0, 1.0], [0.04, 1.0], [1.0, 0.0], [1.0, 0.0]], np.float32)  # (in=4, out=2)
    _qdq_matmul_model(w, tmp_path / "mm.onnx")
    row = sp.onnx_2to4_report(tmp_path / "mm.onnx").iloc[0]
    assert row["consumer"] == "MatMul" and row["axis"] == 0 and row["dtype"] == "uint8"
    assert row["is_2to4"] and row["zero_codes"] == 0.5  # 0.04 / 0.1 rounds to 0: code == zero point 3
    _qdq_matmul_model(
        np.array([[0.0, 1.0], [1.0, 1.0], [1.0, 0.0], [1.0, 0.0]], np.float32), tmp_path / "b.onnx"
    )
    assert not sp.onnx_2to4_report(tmp_path / "b.onnx").iloc[0]["is_2to4"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_masks_follow_the_model_to_cuda(digits):
    train, _ = digits
    model = LabCNN(width=8)
    sp.apply_2to4(model)
    model = sp.prepare_sparse_qat(model, W4A4).cuda()
    assert model.classifier.sparse_mask.is_cuda
    qatlab.calibrate(model, train, num_batches=1, device="cuda")
    qatlab.fit(model, train, epochs=1, lr=0.05, max_steps_per_epoch=3, progress=False, device="cuda")
    assert pattern_ok(model)
