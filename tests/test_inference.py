"""Inference fast path: optimize_for_inference, the fused kernels of kernels/fused.py, the op
counter of bench/opcount.py.

Whole networks run at 128x128 (SCNets need >= 97 px); SCNet-101 variants are marked slow. Tests
that launch Triton kernels use DEVICE: the GPU where there is one (compiled kernels, which take
CUDA tensors only), else the CPU through Triton's interpreter. Tests marked ``cuda`` check the
CUDA dispatch of the optimized models and are skipped without a GPU.
"""

import copy
import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import scconv
from bench import opcount
from bench.opcount import OpCounter, aten_op_counts, count_aten_ops
from kernels import fused
from scconv.inference import (
    FusedSCBottleneck,
    GlobalAvgPool,
    InferenceLinear,
    fold_batchnorm,
    optimize_for_inference,
)

RTOL = 1e-5  # the bound for fp32 optimized vs original outputs
SLOW_SCNETS = ["scnet101", "scnet101_v1d"]
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (compiled Triton kernels)")


@pytest.fixture(scope="module")
def pair():
    """``pair(name)`` -> (eval model, optimized copy), built once per module: tests that change
    either one work on copies or restore it."""
    from conftest import _perturb_batchnorm

    cache = {}

    def get(name):
        if name not in cache:
            model = _model(name, _perturb_batchnorm)
            cache[name] = model, optimize_for_inference(model)
        return cache[name]

    return get


def _model(name, perturb, seed=0, **kwargs):
    torch.manual_seed(seed)
    gate = {"gate": "eager"} if name.startswith("scnet") else {}
    return perturb(scconv.create_model(name, num_classes=10, **gate, **kwargs), seed=seed).eval()


def _relative_error(out, ref):
    return ((out - ref).abs().max() / ref.abs().max()).item()


def _sc_block(perturb, stride=1, avd=False, inplanes=64, planes=16, dtype=torch.float32):
    """One SCBottleneck; with stride 2 it gets v1d's avg-pool downsample."""
    downsample = None
    if stride != 1 or inplanes != planes * 4:
        downsample = nn.Sequential(
            nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False),
            nn.Conv2d(inplanes, planes * 4, 1, bias=False),
            nn.BatchNorm2d(planes * 4),
        )
    torch.manual_seed(0)
    block = scconv.SCBottleneck(inplanes, planes, stride, downsample, avd=avd, gate="eager")
    return perturb(block).to(dtype).eval()


# --- Equivalence -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["scnet50", "scnet50_v1d", "resnet50"]
    + [pytest.param(n, marks=pytest.mark.slow) for n in SLOW_SCNETS],
)
def test_optimized_matches_original(name, pair):
    model, optimized = pair(name)
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        ref, out = model(x), optimized(x)
    assert ref.std() > 1e-3  # a degenerate network would make the comparison vacuous
    assert _relative_error(out, ref) <= RTOL
    torch.testing.assert_close(out, ref, rtol=RTOL, atol=RTOL * ref.abs().max().item())
    # Every BatchNorm is gone from the copy, and the original is untouched.
    assert not any(isinstance(m, _BatchNorm) for m in optimized.modules())
    assert any(isinstance(m, _BatchNorm) for m in model.modules())
    assert optimized is not model and type(optimized) is type(model)
    # A new model: no parameter or buffer shares memory with the original.
    original_storage = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    assert not any(
        t.untyped_storage().data_ptr() in original_storage for t in optimized.state_dict().values()
    )


def test_folding_uses_the_running_statistics(pair):
    """Negative control: the comparison above detects a wrong fold (stale statistics)."""
    model, optimized = pair("scnet50")
    running_var = model.layer2[1].scconv.k3[1].running_var
    saved = running_var.clone()
    x = torch.randn(1, 3, 128, 128)
    try:
        with torch.no_grad():
            running_var.mul_(1.02)  # a 1 % change of one BatchNorm's std
            assert _relative_error(optimized(x), model(x)) > 10 * RTOL
    finally:
        running_var.copy_(saved)


def test_forward_features_and_attributes_survive(pair):
    model, optimized = pair("scnet50")
    assert optimized.arch == "scnet50" and optimized.min_input_size == model.min_input_size
    x = torch.randn(1, 3, 112, 128)
    with torch.no_grad():
        for out, ref in zip(optimized.forward_features(x), model.forward_features(x), strict=True):
            assert _relative_error(out, ref) <= RTOL
    with pytest.raises(ValueError, match="too small"):
        optimized(torch.randn(1, 3, 96, 96))


def test_basic_block_resnet_and_float64_fold_is_exact(perturb_batchnorm):
    """torchvision BasicBlock (ResNet-18); in float64 the fold leaves only rounding noise."""
    import torchvision

    torch.manual_seed(0)
    model = perturb_batchnorm(torchvision.models.resnet18(num_classes=10)).double().eval()
    optimized = optimize_for_inference(model)
    x = torch.randn(2, 3, 64, 48, dtype=torch.float64)
    with torch.no_grad():
        ref, out = model(x), optimized(x)
    assert out.dtype == torch.float64
    assert _relative_error(out, ref) <= 1e-12


def test_fold_batchnorm_single_layer_and_errors():
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 7, 3, stride=2, padding=1, groups=1, bias=True)
    bn = nn.BatchNorm2d(7, eps=1e-3)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    bn.eval()
    folded = fold_batchnorm(conv, bn)
    x = torch.randn(2, 5, 9, 11)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), bn(conv(x)), rtol=1e-5, atol=1e-5)
    assert not folded.weight.requires_grad
    # The folded conv keeps the original's geometry: dilation, groups, padding mode.
    conv = nn.Conv2d(6, 7, 3, padding=2, dilation=2, padding_mode="reflect", bias=False)
    odd = nn.Conv2d(6, 8, 3, groups=2, bias=False)
    for layer in (conv, odd):
        norm = bn if layer is conv else nn.BatchNorm2d(8, eps=1e-3).eval()
        x = torch.randn(2, 6, 9, 11)
        with torch.no_grad():
            torch.testing.assert_close(fold_batchnorm(layer, norm)(x), norm(layer(x)),
                                       rtol=1e-5, atol=1e-5)  # fmt: skip
    with pytest.raises(ValueError, match="BatchNorm of 6 channels after a 7-channel conv"):
        fold_batchnorm(conv, nn.BatchNorm2d(6))
    with pytest.raises(ValueError, match="without running statistics"):
        fold_batchnorm(conv, nn.BatchNorm2d(7, track_running_stats=False))
    with pytest.raises(ValueError, match="GroupNorm is not a BatchNorm2d"):
        fold_batchnorm(conv, nn.GroupNorm(1, 7))


# --- The bottleneck's data path ------------------------------------------------------------------


@pytest.mark.parametrize("stride, avd", [(1, False), (2, False), (2, True)])
def test_fused_sc_bottleneck_eager_and_triton_gate(stride, avd, perturb_batchnorm, no_tf32):
    """One block at an odd size, eager gate and the Triton gate (interpreter on CPU)."""
    block = _sc_block(perturb_batchnorm, stride=stride, avd=avd, inplanes=32).to(DEVICE)
    optimized = optimize_for_inference(block)
    assert type(optimized) is FusedSCBottleneck and optimized.split_sizes == [8, 8]
    x = torch.randn(2, 32, 13, 11, device=DEVICE)
    with torch.no_grad():
        ref = block(x)
        assert _relative_error(optimized(x), ref) <= RTOL
        scconv.set_gate(optimized, "triton")
        assert _relative_error(optimized(x), ref) <= RTOL


@pytest.mark.parametrize(
    "batch, memory_format",
    [(1, torch.contiguous_format), (2, torch.contiguous_format), (1, torch.channels_last)],
)
def test_gate_input_reaches_the_gate_without_a_copy(
    batch, memory_format, perturb_batchnorm, monkeypatch
):
    """One merged conv1 at every batch size and layout, and one relu_split_pool that writes both
    halves dense and out_b's average pool: the gating's x (also k3's input) is that dense out_b,
    and k2's own AvgPool2d does not run. On DEVICE: with a GPU, cuDNN's output layout decides
    the merged output's strides."""
    import scconv.modules

    block = optimize_for_inference(_sc_block(perturb_batchnorm)).to(DEVICE)
    block = block.to(memory_format=memory_format)
    seen = {"conv1 calls": 0, "k2 pool calls": 0}

    def record_conv1(module, inputs, out):
        seen["conv1 calls"] += 1
        seen["merged"] = out

    def record_pool(module, inputs, out):
        seen["k2 pool calls"] += 1

    block.conv1.register_forward_hook(record_conv1)
    block.scconv.k2[0].register_forward_hook(record_pool)
    real_gate = scconv.modules.sc_gate

    def recording_gate(x, k2, k3, gate):
        seen["x"], seen["k2"] = x, k2
        return real_gate(x, k2, k3, gate)

    monkeypatch.setattr(scconv.modules, "sc_gate", recording_gate)
    with torch.no_grad():
        block(torch.randn(batch, 64, 12, 12, device=DEVICE).to(memory_format=memory_format))
    x, merged = seen["x"], seen["merged"]
    assert seen["conv1 calls"] == 1 and seen["k2 pool calls"] == 0
    # k3 and the gate read it as it lies.
    assert x.is_contiguous(memory_format=memory_format)
    assert x.untyped_storage().data_ptr() != merged.untyped_storage().data_ptr()
    torch.testing.assert_close(x, merged[:, 8:].relu(), rtol=0, atol=0)
    # k2 (the folded conv after the pool) took the pool of x.
    pooled = torch.nn.functional.avg_pool2d(x, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(seen["k2"], block.scconv.k2[1:](pooled), rtol=1e-6, atol=1e-6)


def test_scconv_takes_a_precomputed_pool(perturb_batchnorm):
    """SCConv(x, pooled=avg_pool(x)) equals SCConv(x); a pool of the wrong size is refused."""
    sc = _sc_block(perturb_batchnorm).scconv
    x = torch.randn(2, 8, 13, 10)
    with torch.no_grad():
        pooled = torch.nn.functional.avg_pool2d(x, 4, 4)
        torch.testing.assert_close(sc(x, pooled=pooled), sc(x), rtol=0, atol=0)
        with pytest.raises(ValueError, match=r"shape \(2, 8, 3, 2\), got \(2, 8, 4, 3\)"):
            sc(x, pooled=torch.nn.functional.avg_pool2d(x, 4, 4, ceil_mode=True))


@pytest.mark.parametrize(
    "pool, message",
    [
        (nn.AvgPool2d(4, 4, ceil_mode=True), "has ceil_mode=True, not AvgPool2d(4, 4)'s"),
        (nn.AvgPool2d(4, 4, divisor_override=8), "has divisor_override=8, not"),
        (nn.AvgPool2d(4, 2, padding=1), "has stride=(2, 2), padding=(1, 1), not"),
        (nn.MaxPool2d(4, 4), "starts with a MaxPool2d, not AvgPool2d(4, 4)"),
    ],
)
def test_a_k2_pool_other_than_the_plain_one_leaves_the_block_unchanged(
    pool, message, perturb_batchnorm
):
    """relu_split_pool computes AvgPool2d(r, r): a block whose k2 pools otherwise is reported in
    the warning and left as it was, never run with the wrong pool."""
    block = _sc_block(perturb_batchnorm)
    block.scconv.k2[0] = pool.eval()
    with pytest.warns(UserWarning, match=re.escape(message)):
        optimized = optimize_for_inference(block)
    assert type(optimized) is scconv.SCBottleneck


@pytest.mark.parametrize("dilation, cardinality, pooling_r", [(2, 1, 4), (1, 2, 4), (1, 1, 2)])
def test_dilated_grouped_and_other_pooling_blocks_match(
    dilation, cardinality, pooling_r, perturb_batchnorm
):
    """Blocks unlike SCNet-50's: dilated (SCNet with dilated=True), grouped (cardinality > 1) and
    an SC-Conv that pools by 2 are converted and keep their outputs."""
    torch.manual_seed(0)
    block = scconv.SCBottleneck(64, 16, dilation=dilation, cardinality=cardinality, gate="eager")
    if pooling_r != block.scconv.pooling_r:  # SCConv takes any pooling_r; SCBottleneck uses 4
        block.scconv.pooling_r = pooling_r
        block.scconv.k2[0] = nn.AvgPool2d(pooling_r, pooling_r)
    block = perturb_batchnorm(block).eval()
    optimized = optimize_for_inference(block)
    assert type(optimized) is FusedSCBottleneck
    x = torch.randn(2, 64, 13, 11)
    with torch.no_grad():
        assert _relative_error(optimized(x), block(x)) <= RTOL


class _Doubler(nn.Module):
    def forward(self, x):
        return 2 * x


@pytest.mark.parametrize(
    "change, message",
    [
        ("conv1_b_3x3", "conv1_a and conv1_b differ in more than"),
        ("conv1_grouped", "conv1_a and conv1_b differ in more than"),
        ("leaky_relu", "its relu is a LeakyReLU, not an nn.ReLU"),
        ("k1_extra", "k1: holds a _Doubler"),
    ],
)
def test_a_block_it_cannot_convert_is_left_unchanged(change, message, perturb_batchnorm):
    """conv1_a and conv1_b merge only when they are twins of one geometry, ungrouped; a block
    with parts of other types is reported and kept as it was."""
    block = _sc_block(perturb_batchnorm)
    if change == "conv1_b_3x3":
        block.conv1_b = nn.Conv2d(64, 8, 3, padding=1, bias=False)
    elif change == "conv1_grouped":
        block.conv1_a = nn.Conv2d(64, 8, 1, groups=2, bias=False)
        block.conv1_b = nn.Conv2d(64, 8, 1, groups=2, bias=False)
    elif change == "leaky_relu":
        block.relu = nn.LeakyReLU(0.1, inplace=True)
    else:
        block.k1.append(_Doubler())
    block.eval()
    with pytest.warns(UserWarning, match=re.escape(message)):
        optimized = optimize_for_inference(block)
    assert type(optimized) is scconv.SCBottleneck
    x = torch.randn(1, 64, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(optimized(x), block(x), rtol=0, atol=0)


def test_a_batchnorm_after_no_convolution_is_reported():
    seq = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4)).eval()
    with pytest.warns(UserWarning, match=re.escape("1 (BatchNorm2d): BatchNorm with no conv")):
        optimized = optimize_for_inference(seq)
    assert type(optimized[1]) is nn.BatchNorm2d


def test_channels_last(perturb_batchnorm):
    model = _model("scnet50", perturb_batchnorm).to(memory_format=torch.channels_last)
    optimized = optimize_for_inference(model)
    # Every folded weight keeps its layout; the 3x3 ones are the test (a 1x1 weight is dense in
    # both formats).
    convs = [m for m in optimized.modules() if isinstance(m, nn.Conv2d)]
    assert sum(c.kernel_size == (3, 3) for c in convs) == 16 * 4  # k1 to k4
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    seen = []
    optimized.layer2[1].conv3.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x = torch.randn(2, 3, 128, 128).to(memory_format=torch.channels_last)
    with torch.no_grad():
        ref, out = model(x), optimized(x)
    assert _relative_error(out, ref) <= RTOL
    # relu_cat wrote conv3's input in channels_last: no layout flip inside the block.
    assert seen[0].is_contiguous(memory_format=torch.channels_last) and not seen[0].is_contiguous()


def test_bfloat16_block(perturb_batchnorm):
    block = _sc_block(perturb_batchnorm, stride=2, avd=True)
    optimized = optimize_for_inference(copy.deepcopy(block).to(torch.bfloat16))
    assert optimized.conv1.weight.dtype == torch.bfloat16
    x = torch.randn(2, 64, 16, 16)
    with torch.no_grad():
        ref = block(x)
        out = optimized(x.bfloat16()).float()
    # bf16 keeps 8 bits: a few roundings of relative size 2**-8 along the block.
    assert _relative_error(out, ref) <= 3e-2


def test_set_gate_and_repr_on_optimized_model(pair):
    optimized = pair("scnet50")[1]
    assert "gate='eager'" in repr(optimized)
    try:
        assert scconv.set_gate(optimized, "triton") is optimized
        assert {m.gate for m in optimized.modules() if isinstance(m, scconv.SCConv)} == {"triton"}
        assert "gate='triton'" in repr(optimized) and "gate='eager'" not in repr(optimized)
        assert sum(isinstance(m, scconv.SCConv) for m in optimized.modules()) == 16
    finally:
        scconv.set_gate(optimized, "eager")


def test_compiles_with_fullgraph(perturb_batchnorm):
    block = _sc_block(perturb_batchnorm, stride=2, avd=True)
    optimized = optimize_for_inference(block)
    compiled = torch.compile(optimized, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 64, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), optimized(x), rtol=0, atol=0)


def test_exports_with_the_fused_ops(perturb_batchnorm):
    """torch.export of an optimized block keeps relu_split_pool, relu_cat and add_relu_ as single
    ops, and no average pool besides those of avd and the downsample (k2 takes the fused one)."""
    block = _sc_block(perturb_batchnorm, stride=2, avd=True)
    optimized = optimize_for_inference(block)
    x = torch.randn(2, 64, 12, 12)
    program = torch.export.export(optimized, (x,))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count("scconv.relu_cat.default") == 1
    assert targets.count("scconv.add_relu_.default") == 1
    assert targets.count("scconv.relu_split_pool.default") == 1
    assert targets.count("aten.avg_pool2d.default") == 2  # avd's and the downsample's
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), optimized(x), rtol=0, atol=0)


# --- Modes, copies and bad input -----------------------------------------------------------------


def test_training_mode_raises(perturb_batchnorm):
    model = scconv.scnet50(gate="eager", num_classes=10)
    with pytest.raises(ValueError, match=r"training mode: <model>.*Call model\.eval\(\) first"):
        optimize_for_inference(model)
    model.eval()
    model.layer3[2].scconv.k2[2].train()
    with pytest.raises(ValueError, match=r"layer3\.2\.scconv\.k2\.2"):
        optimize_for_inference(model)


def test_unsupported_root_raises():
    with pytest.raises(TypeError, match="supports SCNet, ResNet.*got Linear"):
        optimize_for_inference(nn.Linear(3, 4).eval())
    with pytest.raises(TypeError, match="expects an nn.Module"):
        optimize_for_inference("scnet50")


def test_unknown_modules_are_left_alone_and_listed(perturb_batchnorm):
    model = _model("scnet50", perturb_batchnorm)
    model.layer4[2] = _Doubler()  # an unknown block type
    odd = model.layer2[1]
    odd.bn1_a = nn.GroupNorm(4, odd.bn1_a.num_features)  # a block that cannot be folded
    model.eval()
    with pytest.warns(UserWarning) as record:
        optimized = optimize_for_inference(model)
    message = str(record[0].message)
    assert "layer4.2 (_Doubler): unknown module type" in message
    assert "layer2.1 (SCBottleneck): conv1_a/bn1_a: GroupNorm is not a BatchNorm2d" in message
    assert type(optimized.layer4[2]) is _Doubler
    kept = optimized.layer2[1]
    assert type(kept) is scconv.SCBottleneck and type(kept.bn3) is nn.BatchNorm2d
    assert all(torch.equal(v, odd.state_dict()[k]) for k, v in kept.state_dict().items())
    # Copied, not shared: changing the optimized model never changes the original.
    originals = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    assert not any(t.untyped_storage().data_ptr() in originals for t in kept.state_dict().values())
    assert type(optimized.layer2[2]) is FusedSCBottleneck  # its neighbours are still converted
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        assert _relative_error(optimized(x), model(x)) <= RTOL


def test_v1d_identity_pools_are_dropped_and_other_pools_kept(perturb_batchnorm):
    """v1d's layer1 downsample starts with a 1x1 AvgPool2d (a copy): it becomes an Identity.
    A head pool that is not global stays an AdaptiveAvgPool2d."""
    with torch.device("meta"):
        model = scconv.scnet50_v1d(gate="eager").eval()
        x = torch.empty(1, 3, 224, 224)
    optimized = optimize_for_inference(model)
    assert type(model.layer1[0].downsample[0]) is nn.AvgPool2d
    assert type(optimized.layer1[0].downsample[0]) is nn.Identity
    assert aten_op_counts(optimized, x)["aten.avg_pool2d.default"] == 6  # 3 avd + 3 downsample
    import torchvision

    torch.manual_seed(0)
    model = perturb_batchnorm(torchvision.models.resnet18(num_classes=10))
    model.avgpool, model.fc = nn.AdaptiveAvgPool2d(2), nn.Linear(512 * 4, 10)
    model.eval()
    optimized = optimize_for_inference(model)
    assert type(optimized.avgpool) is nn.AdaptiveAvgPool2d
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert _relative_error(optimized(x), model(x)) <= RTOL


def test_inplace_and_idempotent(perturb_batchnorm, recwarn):
    model = _model("resnet50", perturb_batchnorm)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    assert optimize_for_inference(model, inplace=True) is model
    assert isinstance(model.avgpool, GlobalAvgPool) and isinstance(model.fc, InferenceLinear)
    again = optimize_for_inference(model)
    # nothing unknown, nothing left to fold: no warning
    assert not [w for w in recwarn.list if "optimize_for_inference" in str(w.message)]
    with torch.no_grad():
        assert _relative_error(again(x), ref) <= RTOL
        assert count_aten_ops(again, x) == count_aten_ops(model, x) == 105


# --- Fused kernels -------------------------------------------------------------------------------

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
LAYOUTS = [torch.contiguous_format, torch.channels_last]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
# 7x9 planes and 5 + 3 channels: rows that are no multiple of the block or of 16. A one-channel
# `a` is dense in both formats: the output's layout, not a's, picks the kernel's rows.
@pytest.mark.parametrize(
    "shape_a, channels_b", [((2, 5, 7, 9), 3), ((1, 16, 4, 4), 16), ((2, 1, 4, 5), 3)]
)
def test_relu_cat_triton_matches_eager(dtype, layout, shape_a, channels_b):
    torch.manual_seed(0)
    a = torch.randn(shape_a, dtype=dtype).to(DEVICE).contiguous(memory_format=layout)
    b = torch.randn(shape_a[0], channels_b, *shape_a[2:], dtype=dtype).to(DEVICE)
    b = b.contiguous(memory_format=layout)
    a[0, -1, 2, 3] = float("nan")
    expected = torch.relu(torch.cat([a, b], dim=1))
    for out in (fused.relu_cat_triton(a, b), torch.ops.scconv.relu_cat(a, b)):
        # ReLU and placement are exact: bit-identical, NaN where eager has NaN.
        torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
        assert out.is_contiguous(memory_format=layout)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_add_relu_triton_matches_eager(dtype, layout):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, 3, dtype=dtype).to(DEVICE).contiguous(memory_format=layout)
    residual = torch.randn_like(x)
    expected = torch.relu(x + residual)
    out = x.clone()
    assert fused.add_relu_triton_(out, residual) is out
    # The interpreter rounds float32 -> bfloat16 toward zero (a GPU rounds to nearest, as
    # eager does): allow one bf16 ulp there; the other dtypes round identically.
    rtol = 2**-7 if dtype == torch.bfloat16 else 0
    torch.testing.assert_close(out, expected, rtol=rtol, atol=0)
    op_out = x.clone()
    torch.ops.scconv.add_relu_(op_out, residual)
    torch.testing.assert_close(op_out, expected, rtol=0, atol=0)


def _relu_split_pool_eager(m, split, r):
    a, b = torch.relu(m[:, :split]), torch.relu(m[:, split:])
    return a, b, torch.nn.functional.avg_pool2d(b, r, r)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
# H and W that are no multiple of r (rows and columns past the last window are copied, not
# pooled), a split that is no multiple of the channel block, r = 2 and SCNet's 4; 70 channels
# take two channel blocks in channels_last.
# In NCHW, rows of 16 and 12 columns take the aligned path (ALIGN 16 and 4: W and the strides
# reach the kernel divided by it).
# r = 1 (a copy of b), r = 8, and r equal to H (one row of windows).
@pytest.mark.parametrize(
    "shape, split, r",
    [((2, 12, 9, 13), 5, 4), ((3, 6, 7, 5), 3, 4), ((2, 70, 6, 10), 32, 2),
     ((2, 12, 8, 16), 5, 4), ((1, 6, 5, 12), 2, 4), ((2, 6, 3, 5), 2, 1), ((1, 5, 8, 17), 2, 8)],
)  # fmt: skip
def test_relu_split_pool_triton_matches_eager(dtype, layout, shape, split, r):
    torch.manual_seed(0)
    m = torch.randn(shape, dtype=dtype).to(DEVICE).contiguous(memory_format=layout)
    m[0, 1, 2, 3] = float("nan")  # in a
    m[-1, split + 1, 1, 0] = float("nan")  # in b and in its first window
    expected = _relu_split_pool_eager(m, split, r)
    # The pool sums in float32 by columns first (avg_pool2d by rows): float32 may differ in its
    # last bit; the interpreter also rounds float32 -> 16-bit floats toward zero (one ulp).
    rtol = {torch.float16: 2**-10, torch.bfloat16: 2**-7, torch.float32: 1e-6}.get(dtype, 1e-15)
    for outputs in (fused.relu_split_pool_triton(m, split, r),
                    torch.ops.scconv.relu_split_pool(m, split, r)):  # fmt: skip
        for name, out, ref in zip(("a", "b", "pooled"), outputs, expected, strict=True):
            assert out.shape == ref.shape and out.is_contiguous(memory_format=layout), name
            # ReLU and placement are exact: bit-identical, NaN where eager has NaN.
            tolerance = {"rtol": rtol, "atol": 1e-6} if name == "pooled" else {"rtol": 0, "atol": 0}
            torch.testing.assert_close(out, ref, equal_nan=True, **tolerance, msg=name)
    assert expected[2].isnan().sum() == 1  # the NaN reached one window of the pool


def test_relu_split_pool_any_strides_any_r_and_bad_input():
    torch.manual_seed(0)
    wide = torch.randn(2, 10, 7, 9, device=DEVICE)
    m = wide[:, 1:9]  # a channel slice: dense in no format
    for split, r in ((3, 4), (3, 3)):  # r = 3: not a power of two, the ATen path
        for out, ref in zip(torch.ops.scconv.relu_split_pool(m, split, r),
                            _relu_split_pool_eager(m, split, r), strict=True):  # fmt: skip
            torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
            assert out.is_contiguous()
    for out, ref in zip(fused.relu_split_pool_triton(m, 3, 4), _relu_split_pool_eager(m, 3, 4),
                        strict=True):  # fmt: skip
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="r must be a power of two, got 3"):
        fused.relu_split_pool_triton(m, 3, 3)
    with pytest.raises(ValueError, match="0 < split < 8, got 8"):
        torch.ops.scconv.relu_split_pool(m, 8, 4)
    with pytest.raises(ValueError, match="7x9 map cannot be average-pooled by windows of 8x8"):
        torch.ops.scconv.relu_split_pool(m, 3, 8)
    with pytest.raises(ValueError, match="9x7 map cannot be average-pooled by windows of 8x8"):
        torch.ops.scconv.relu_split_pool(m.transpose(2, 3), 3, 8)  # too narrow, tall enough
    with pytest.raises(ValueError, match="must be 4-D"):
        torch.ops.scconv.relu_split_pool(m[0], 3, 4)
    with pytest.raises(TypeError, match="supported dtypes"):
        torch.ops.scconv.relu_split_pool(m.int(), 3, 4)


def test_relu_split_pool_edge_cases():
    generator = torch.Generator().manual_seed(0)
    # A column slice of one row, one channel per half: the strides are multiples of 16 and only
    # W (12) holds the alignment down to 4.
    m = torch.randn(1, 2, 1, 16, generator=generator)[..., :12].to(DEVICE)
    for out, ref in zip(fused.relu_split_pool_triton(m, 1, 1), _relu_split_pool_eager(m, 1, 1),
                        strict=True):  # fmt: skip
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
    # A window wider than the channels_last column block (64 channels take BLOCK_W 16 < r).
    m = torch.randn(1, 64, 32, 32, generator=generator).to(DEVICE)
    m = m.contiguous(memory_format=torch.channels_last)
    for out, ref in zip(fused.relu_split_pool_triton(m, 32, 32),
                        _relu_split_pool_eager(m, 32, 32), strict=True):  # fmt: skip
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    # float16 windows sum in float32: in float16, 2048 + 1 rounds back to 2048.
    m = torch.ones(1, 2, 4, 4, dtype=torch.float16, device=DEVICE)
    m[0, 1, 0, 0] = 2048.0
    pooled = fused.relu_split_pool_triton(m, 1, 4)[2]
    assert pooled.item() == pytest.approx((2048 + 15) / 16, abs=2**-4)  # 128.9375, one fp16 step


def test_fused_ops_take_any_strides_through_the_composite_path():
    torch.manual_seed(0)
    wide = torch.randn(2, 10, 6, 7, device=DEVICE)
    a, b = wide[:, :4], wide[:, 4:]  # channel slices: dense in no format
    out = torch.ops.scconv.relu_cat(a, b)
    torch.testing.assert_close(out, torch.relu(torch.cat([a, b], 1)), rtol=0, atol=0)
    x = torch.randn(2, 4, 6, 7, device=DEVICE)
    residual = wide[:, :4]
    expected = torch.relu(x + residual)
    torch.ops.scconv.add_relu_(x, residual)
    torch.testing.assert_close(x, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="must both be contiguous or both channels_last"):
        fused.relu_cat_triton(a, b)
    with pytest.raises(ValueError, match="dense with equal strides"):
        fused.add_relu_triton_(x, residual)


def test_fused_ops_reject_bad_input():
    a = torch.randn(2, 3, 4, 5)
    with pytest.raises(ValueError, match="every dimension but channels"):
        torch.ops.scconv.relu_cat(a, torch.randn(2, 3, 4, 6))
    with pytest.raises(TypeError, match="share one dtype"):
        torch.ops.scconv.relu_cat(a, a.double())
    with pytest.raises(TypeError, match="supported dtypes"):
        torch.ops.scconv.relu_cat(a.int(), a.int())
    with pytest.raises(ValueError, match="must have one shape"):
        torch.ops.scconv.add_relu_(a, torch.randn(1, 3, 4, 5))
    with pytest.raises(TypeError, match="share one dtype"):  # the launcher has no promotion
        fused.add_relu_triton_(a, a.double())


def test_add_relu_takes_a_residual_of_another_dtype(perturb_batchnorm):
    """As ``out += residual`` does: under autocast an optimized block (or nn.Sequential of
    blocks) fed float32 adds that float32 input to its bfloat16 conv3 output."""
    x = torch.randn(2, 3, 4, 5, dtype=torch.bfloat16, device=DEVICE)
    residual = torch.randn(2, 3, 4, 5, device=DEVICE)
    expected = x.clone().add_(residual).relu_()
    torch.ops.scconv.add_relu_(x, residual)
    torch.testing.assert_close(x, expected, rtol=0, atol=0)

    block = _sc_block(perturb_batchnorm)
    optimized = optimize_for_inference(block)
    images = torch.randn(2, 64, 12, 12)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref, out = block(images), optimized(images)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert _relative_error(out.float(), ref.float()) <= 3e-2  # bf16 roundings, as in the block test


def test_launchers_refuse_cpu_tensors_when_compiled(monkeypatch):
    """Compiled kernels (a GPU machine) name the problem instead of Triton's pointer error."""
    from kernels import runtime

    monkeypatch.setattr(fused, "INTERPRETED", False)
    monkeypatch.setattr(runtime, "cuda_present", lambda: True)
    a = torch.randn(1, 2, 3, 3)
    with pytest.raises(ValueError, match="compiled for CUDA here, got tensors on cpu"):
        fused.relu_cat_triton(a, a)
    with pytest.raises(ValueError, match="compiled for CUDA here, got tensors on cpu"):
        fused.add_relu_triton_(a, a)
    with pytest.raises(ValueError, match="compiled for CUDA here, got tensors on cpu"):
        fused.relu_split_pool_triton(a, 1, 2)


def test_fused_launch_plans_are_cached_by_every_input_of_the_plan(monkeypatch):
    """relu_split_pool's and relu_cat's launch arguments are cached (kernels.runtime.LaunchPlans)
    by shapes, strides, dtype, split, r and the int32 limit."""
    from kernels import runtime

    monkeypatch.setattr(fused, "_RELU_SPLIT_POOL_PLANS", runtime.LaunchPlans())
    monkeypatch.setattr(fused, "_RELU_CAT_PLANS", runtime.LaunchPlans())
    with torch.device("meta"):
        m = torch.empty(2, 12, 8, 16)
    cases = [(m, 5, 4), (m.to(memory_format=torch.channels_last), 5, 4), (m, 6, 4), (m, 5, 2),
             (m.double(), 5, 4), (m[..., :12], 5, 4)]  # fmt: skip
    for m_, split, r in cases:
        outputs = fused._relu_split_pool_empty(m_, split, r)
        args, constexprs, grid = fused.relu_split_pool_launch_arguments(m_, split, r, *outputs)
        scalars, fresh_constexprs, fresh_grid = fused._relu_split_pool_plan(m_, split, r, *outputs)
        assert args == (m_, *outputs, *scalars) and constexprs == fresh_constexprs
        assert grid == fresh_grid and not constexprs["WIDE_INDEX"]
    assert len(fused._RELU_SPLIT_POOL_PLANS) == len(cases)
    a, b = m[:, :5], m[:, 5:]
    for a_, b_ in ((a, b), (a.contiguous(), b.contiguous())):
        out = fused._relu_cat_empty(a_, b_)
        args, constexprs, grid = fused.relu_cat_launch_arguments(a_, b_, out)
        assert (args[3:], constexprs, grid) == fused._relu_cat_plan(a_, b_, out)
    # Callers get their own copy of the cached constexprs.
    outputs = fused._relu_split_pool_empty(m, 5, 4)
    fused.relu_split_pool_launch_arguments(m, 5, 4, *outputs)[1]["ALIGN"] = -1
    assert fused.relu_split_pool_launch_arguments(m, 5, 4, *outputs)[1]["ALIGN"] == 16
    # The tensor spans 3071 elements, but the last blocks' masked lanes (and b's offsets of a's
    # channels) reach up to (BLOCK_C + BLOCK_W) * 1536 elements past it: WIDE_INDEX counts that.
    monkeypatch.setattr(fused, "_INT32_LIMIT", 4000)
    assert fused.relu_split_pool_launch_arguments(m, 5, 4, *outputs)[1]["WIDE_INDEX"]
    monkeypatch.setattr(fused, "_INT32_LIMIT", 16)  # after plans at the real limit were cached
    assert fused.relu_split_pool_launch_arguments(m, 5, 4, *outputs)[1]["WIDE_INDEX"]
    out = fused._relu_cat_empty(a, b)
    assert fused.relu_cat_launch_arguments(a, b, out)[1]["WIDE_INDEX"]


def test_relu_cat_refuses_rows_near_the_int32_limit():
    """The kernel's row block count, row + BLOCK_R - 1, must not wrap past 2**31 - 1."""
    with torch.device("meta"):
        a = torch.empty(1, 1, 1, 2**30 - 50)  # a row of 2**31 - 100 elements with b
    with pytest.raises(ValueError, match="elements per image is too many"):
        fused.relu_cat_triton(a, a)


@pytest.mark.parametrize(
    "op, shapes, dtypes",
    [
        (torch.ops.scconv.relu_cat.default, [(2, 3, 4, 5), (2, 2, 4, 5)], [torch.float32] * 2),
        (torch.ops.scconv.add_relu_.default, [(2, 3, 4, 5)] * 2, [torch.float32] * 2),
        (torch.ops.scconv.add_relu_.default, [(2, 3, 4, 5)] * 2, [torch.bfloat16, torch.float32]),
        (torch.ops.scconv.relu_split_pool.default, [(2, 6, 9, 5), 2, 4], [torch.float32]),
        (torch.ops.scconv.relu_split_pool.default, [(2, 6, 4, 4), 4, 4], [torch.bfloat16]),
    ],
)
def test_fused_custom_ops_pass_opcheck(op, shapes, dtypes):
    """On DEVICE: with a GPU this checks the Triton path against the fake implementations.
    Integers in ``shapes`` are passed as they are (relu_split_pool's split and r)."""
    sizes = [s for s in shapes if isinstance(s, tuple)]
    made = iter(torch.randn(s, dtype=d, device=DEVICE) for s, d in zip(sizes, dtypes, strict=True))
    args = [next(made) if isinstance(s, tuple) else s for s in shapes]
    torch.library.opcheck(op, args)
    if op is torch.ops.scconv.relu_split_pool.default:  # channels_last too
        args[0] = args[0].contiguous(memory_format=torch.channels_last)
        torch.library.opcheck(op, args)


# --- Op counter ----------------------------------------------------------------------------------


class _Tiny(nn.Module):
    def forward(self, x):
        y = torch.relu_(x + 1)  # add, relu_
        torch.empty(3)  # an allocation: not counted
        z = torch.ops.scconv.relu_cat(y, y)  # one custom op, whatever runs inside it
        return z.view(-1)  # a view counts


def test_op_counter_counts_what_it_says():
    counts = aten_op_counts(_Tiny(), torch.randn(1, 2, 3, 3))
    assert counts == {
        "aten.add.Tensor": 1,
        "aten.relu_.default": 1,
        "scconv.relu_cat.default": 1,
        "aten.view.default": 1,
    }
    with OpCounter() as counter:
        torch.empty(2)
    assert counter.total == 0 and counter.allocations == 1


@pytest.mark.parametrize(
    "name, expected",
    # docs/DESIGN.md's counts for the official code and torchvision; scnet101_v1d measured here.
    [("resnet50", 176), ("scnet50", 432), ("scnet50_v1d", 448), ("scnet101", 874)]
    + [("scnet101_v1d", 890)],
)
def test_original_op_counts_match_design(name, expected):
    with torch.device("meta"):
        model = scconv.create_model(name, gate="eager" if name.startswith("scnet") else None)
        x = torch.empty(1, 3, 224, 224)
    assert count_aten_ops(model.eval(), x) == expected


def test_scnet50_optimized_at_most_250_ops(pair):
    """Counted on the CPU with the eager gate: the gate that runs on a CPU ('auto' resolves to it)
    and the official code's four ops per gating, so 432 -> 217 compares like with like."""
    model, optimized = pair("scnet50")
    x = torch.randn(1, 3, 128, 128)
    before, after = aten_op_counts(model, x), aten_op_counts(optimized, x)
    assert sum(before.values()) == 432
    assert sum(after.values()) <= 250
    assert after["aten.native_batch_norm.default"] == after["aten.cat.default"] == 0
    # 16 blocks x 7 convolutions + stem + 4 downsamples, minus one per merged conv1_a/conv1_b
    assert after["aten.convolution.default"] == 16 * 6 + 1 + 4
    assert after["scconv.relu_cat.default"] == after["scconv.add_relu_.default"] == 16
    assert after["scconv.relu_split_pool.default"] == 16 and after["aten.avg_pool2d.default"] == 0
    assert after["aten.sigmoid.default"] == 16  # the eager gate is still there, four ops each
    assert sum(after.values()) == 217
    # The same count at every batch size and layout (one path through every block).
    for images in (
        torch.randn(2, 3, 128, 128),
        torch.randn(1, 3, 128, 128).contiguous(memory_format=torch.channels_last),
    ):
        assert count_aten_ops(optimized, images) == 217  # fmt: skip


@pytest.mark.parametrize("name", ["scnet50", "resnet50"])
def test_counts_on_meta_equal_counts_on_cpu(name, pair):
    """The command line counts on the meta device: the same ops as a real CPU forward."""
    model, optimized = pair(name)
    x = torch.randn(1, 3, 128, 128)
    with torch.device("meta"):
        meta_model = scconv.create_model(name, num_classes=10).eval()
        meta_x = torch.empty(1, 3, 224, 224)
    if name.startswith("scnet"):
        scconv.set_gate(meta_model, "eager")
    assert count_aten_ops(meta_model, meta_x) == count_aten_ops(model, x)
    meta_optimized = optimize_for_inference(meta_model)
    assert count_aten_ops(meta_optimized, meta_x) == count_aten_ops(optimized, x)


def test_triton_gate_count_on_meta():
    with torch.device("meta"):
        model = scconv.scnet50(gate="triton").eval()
        x = torch.empty(1, 3, 224, 224)
    counts = aten_op_counts(optimize_for_inference(model), x)
    assert counts["scconv.sc_gate.default"] == 16 and sum(counts.values()) == 217 - 16 * 3


def test_opcount_cli(capsys):
    opcount.main(["resnet50", "scnet50"])
    out = capsys.readouterr().out
    assert "original" in out and "optimized_triton_gate" in out
    lines = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert lines["resnet50"][1:3] == ["176", "105"]
    assert lines["scnet50"][1:4] == ["432", "217", "169"]
    opcount.main(["--breakdown", "resnet50"])
    out = capsys.readouterr().out
    assert "aten.native_batch_norm.default" in out and "scconv.add_relu_.default" in out
    with pytest.raises(SystemExit):
        opcount.main(["resnet18"])
    with pytest.raises(SystemExit) as exit_info:
        opcount.main(["scnet50", "--size", "64"])  # a usage error, not a traceback
    assert exit_info.value.code == 2
    assert "smallest input that works is 97x97" in capsys.readouterr().err


def test_byte_counter_reads_arguments_and_writes_outputs():
    """A convolution reads input, weight and bias and writes its output; an in-place ReLU reads
    and writes its tensor; a view moves nothing; allocations are not ops."""
    conv = nn.Conv2d(4, 6, 3, padding=1, device="meta", dtype=torch.bfloat16)
    x = torch.empty(2, 4, 5, 7, device="meta", dtype=torch.bfloat16)

    def block(t):
        out = torch.relu_(conv(t))
        return out.split([2, 4], dim=1)

    counter = opcount.bytes_moved(block, x)
    element = 2  # bfloat16
    conv_read = (x.numel() + conv.weight.numel() + conv.bias.numel()) * element
    out_bytes = 2 * 6 * 5 * 7 * element
    assert counter.read == {"aten.convolution.default": conv_read, "aten.relu_.default": out_bytes}
    assert counter.written == {"aten.convolution.default": out_bytes,
                               "aten.relu_.default": out_bytes}  # fmt: skip
    assert counter.total == conv_read + 3 * out_bytes


def test_byte_counter_counts_writes_through_arguments():
    """An op that mutates an argument and returns nothing (the fused residual add + ReLU) writes
    it; an out= argument and copy_'s destination are written, not read; an op with two outputs
    writes both."""
    t = torch.empty(4, 8, 3, 3, device="meta")  # 1152 bytes of float32
    n = t.numel() * 4

    def ops(t):
        torch.ops.scconv.add_relu_(t, t.clone())
        torch.add(t, t, out=torch.empty_like(t))
        torch.empty_like(t).copy_(t)
        torch.nn.functional.max_pool2d(t, 2, return_indices=True)

    counter = opcount.bytes_moved(ops, t)
    assert (counter.read["scconv.add_relu_.default"], counter.written["scconv.add_relu_.default"]) \
        == (2 * n, n)  # fmt: skip
    assert (counter.read["aten.add.out"], counter.written["aten.add.out"]) == (2 * n, n)
    assert (counter.read["aten.copy_.default"], counter.written["aten.copy_.default"]) == (n, n)
    pooled = 4 * 8 * 1 * 1
    assert counter.written["aten.max_pool2d_with_indices.default"] == pooled * (4 + 8)


def test_bytes_table_scnet50_near_resnet50():
    """The traffic model at the GPU headline (bf16, channels_last, batch 256): folding saves about
    two fifths of the bytes, and the optimized SCNet-50 moves less than 1.2x the optimized
    ResNet-50's. With conv1_a and conv1_b as two convolutions (each reading the block input) it
    was 1.24x."""
    table = opcount.bytes_table(("scnet50", "resnet50"), batch=256, dtype="bf16",
                                layout="channels_last").set_index("model")  # fmt: skip
    assert (table["optimized_gb"] < 0.65 * table["original_gb"]).all()
    assert table.loc["resnet50", "optimized_vs_resnet"] == 1.0
    assert 1.0 < table.loc["scnet50", "optimized_vs_resnet"] < 1.2
    assert table.loc["scnet50", "optimized_gb"] > 20  # GB: batch 256 at 224 px in bf16
    # The per-op view adds up to the same total.
    parts = opcount.bytes_breakdown("scnet50", batch=256, dtype="bf16", layout="channels_last")
    total = parts.set_index("op").loc["total", "optimized_gb"]
    assert total == pytest.approx(table.loc["scnet50", "optimized_gb"], abs=1e-3)
    assert parts.set_index("op").loc["scconv.sc_gate.default", "optimized_gb"] > 0


def test_opcount_bytes_cli(capsys):
    opcount.main(["resnet50", "--bytes", "--batch", "2", "--dtype", "bf16", "--channels-last"])
    out = capsys.readouterr().out
    assert "optimized_vs_resnet" in out and "channels_last" in out
    for argv, message in (
        (["--dtype", "bf16"], "go with --bytes"),
        (["--bytes", "--device", "cpu"], "meta device only"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            opcount.main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_deepcopy_keeps_fused_model_working(perturb_batchnorm):
    block = optimize_for_inference(_sc_block(perturb_batchnorm))
    twin = copy.deepcopy(block)
    x = torch.randn(1, 64, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), block(x), rtol=0, atol=0)


def _clones_per_forward(model, x):
    """aten::clone calls in one forward, nested ones included (the profiler records ops that
    kernels call internally, such as a convolution's ``contiguous()`` of a strided input)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(x)
    return sum(1 for e in prof.events() if e.name == "aten::clone")


@pytest.mark.parametrize("name", ["scnet50", "scnet50_v1d"])
def test_no_hidden_copies_at_batch_2(name, pair):
    """The optimized blocks add no copies of activations: at batch 2 a channel slice of the merged
    conv1 output is strided, and if it reached them k1, k2's pool and k3 would each clone theirs
    (48 clones more per SCNet-50 forward); relu_split_pool writes each half dense instead. The
    original's clones (the eager gate's upsample) are still there. One merged conv1 per block."""
    model, optimized = pair(name)
    x = torch.randn(2, 3, 128, 128)
    before, after = _clones_per_forward(model, x), _clones_per_forward(optimized, x)
    assert after <= before
    convolutions = [aten_op_counts(m, x)["aten.convolution.default"] for m in (model, optimized)]
    assert convolutions[1] == convolutions[0] - 16

    # The probe sees nested clones: strided halves handed on as they are get counted.
    def strided_halves(m, split, r):
        a, b = m.clamp_min(0).split([split, m.shape[1] - split], dim=1)
        return a, b, torch.nn.functional.avg_pool2d(b, r, r)

    with pytest.MonkeyPatch.context() as patch:
        # The blocks call the op's .default overload.
        patch.setattr(torch.ops.scconv, "relu_split_pool", SimpleNamespace(default=strided_halves))
        assert _clones_per_forward(optimized, x) >= before + 16 * 3


# --- CUDA: the optimized models and fused ops as a GPU runs them ---------------------------------


def _count_triton_launches(monkeypatch) -> dict:
    """Count the fused ops' Triton launches (the custom ops call the launchers by name)."""
    launchers = {"relu_cat": "relu_cat_triton", "add_relu_": "add_relu_triton_",
                 "relu_split_pool": "relu_split_pool_triton"}  # fmt: skip
    launches = dict.fromkeys(launchers, 0)

    def counting(key, real):
        def launch(*args):
            launches[key] += 1
            return real(*args)

        return launch

    for key, name in launchers.items():
        monkeypatch.setattr(fused, name, counting(key, getattr(fused, name)))
    return launches


def _cuda_scnet50(perturb, memory_format):
    torch.manual_seed(0)
    model = perturb(scconv.scnet50(gate="triton", num_classes=10)).eval().cuda()
    return model.to(memory_format=memory_format)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("memory_format", LAYOUTS)
@pytest.mark.parametrize("batch", [1, 8])
def test_cuda_optimized_scnet50_matches(
    batch, memory_format, perturb_batchnorm, no_tf32, monkeypatch
):
    """Triton gate and Triton fused ops in every block, at every batch and layout."""
    model = _cuda_scnet50(perturb_batchnorm, memory_format)
    optimized = optimize_for_inference(model)
    launches = _count_triton_launches(monkeypatch)
    images = torch.randn(batch, 3, 224, 224, device="cuda").contiguous(memory_format=memory_format)
    with torch.inference_mode():
        ref, out = model(images), optimized(images)
    assert launches == {"relu_cat": 16, "add_relu_": 16, "relu_split_pool": 16}
    assert _relative_error(out, ref) <= 10 * RTOL  # cuDNN picks other algorithms per weight


@pytest.mark.cuda
@requires_cuda
def test_cuda_graph_replays_the_optimized_scnet(perturb_batchnorm, no_tf32):
    """bench.models' optimized_cuda_graph regime: the replayed graph (Triton gate and fused ops
    captured) gives each new input's own output, under bf16 autocast and channels_last. It runs
    the eager forward's kernels, so it matches it to a bf16 rounding; C5 features (not logits,
    which two random inputs move by little) tell the two inputs apart well beyond that."""
    from bench.models import CUDAGraphForward

    model = _cuda_scnet50(perturb_batchnorm, torch.channels_last)
    optimized = optimize_for_inference(model)

    def c5(images):
        return optimized.forward_features(images)[-1]

    graphed = CUDAGraphForward(c5)
    first, second = (
        torch.randn(2, 3, 128, 128, device="cuda").contiguous(memory_format=torch.channels_last)
        for _ in range(2)
    )
    tolerance = {"rtol": 2**-7, "atol": 1e-3}
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        expected = {id(images): c5(images) for images in (first, second)}
        assert not torch.allclose(expected[id(first)], expected[id(second)], **tolerance)
        for images in (first, second, first):
            torch.testing.assert_close(graphed(images).clone(), expected[id(images)], **tolerance)
        with pytest.raises(ValueError, match="captured for"):
            graphed(first[:1])
    assert graphed.capture_peak_mib > 0
    with pytest.raises(ValueError, match="captured for"), torch.inference_mode():
        graphed(first)  # outside autocast: the captured kernels are bf16 ones


@pytest.mark.cuda
@requires_cuda
def test_cuda_bf16_autocast_channels_last(perturb_batchnorm, monkeypatch):
    """Under autocast every block's input and output are bfloat16: all fused ops run Triton."""
    model = _cuda_scnet50(perturb_batchnorm, torch.channels_last)
    optimized = optimize_for_inference(model)
    launches = _count_triton_launches(monkeypatch)
    images = torch.randn(8, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    with torch.inference_mode():
        ref = model(images)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = optimized(images)
    assert out.dtype == torch.bfloat16
    assert launches == {"relu_cat": 16, "add_relu_": 16, "relu_split_pool": 16}
    assert _relative_error(out.float(), ref) <= 3e-2  # bf16 roundings (measured 0.7 % on a CPU)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("layout", LAYOUTS)
# SCNet-50 at batch 256, 224 px: (channels of each relu_cat half, size, block output channels)
# of layer1 and layer4; the largest tensor holds 205 M elements.
@pytest.mark.parametrize("half, size, channels", [(32, 56, 256), (256, 7, 2048)])
def test_cuda_fused_ops_at_batch_256(half, size, channels, layout):
    a, b = (
        torch.randn(256, half, size, size, device="cuda", dtype=torch.bfloat16).contiguous(
            memory_format=layout
        )
        for _ in range(2)
    )
    expected = torch.relu(torch.cat([a, b], dim=1))
    torch.testing.assert_close(torch.ops.scconv.relu_cat(a, b), expected, rtol=0, atol=0)
    x = torch.randn(256, channels, size, size, device="cuda", dtype=torch.bfloat16)
    x, residual = x.contiguous(memory_format=layout), torch.randn_like(x)
    residual = residual.contiguous(memory_format=layout)
    expected = torch.relu(x + residual)
    torch.ops.scconv.add_relu_(x, residual)
    torch.testing.assert_close(x, expected, rtol=0, atol=0)
    # relu_split_pool on the block's merged conv1 output (both halves), SCNet's r = 4. On a GPU
    # the pool rounds to nearest like avg_pool2d: only float32 summation order can differ.
    m = torch.cat([a, b], dim=1).contiguous(memory_format=layout)
    outputs = torch.ops.scconv.relu_split_pool(m, half, 4)
    for out, ref in zip(outputs, _relu_split_pool_eager(m, half, 4), strict=True):
        assert out.is_contiguous(memory_format=layout)
        torch.testing.assert_close(out, ref, rtol=2**-7, atol=1e-6)
    torch.testing.assert_close(outputs[0], torch.relu(a), rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_cuda_fused_ops_on_a_second_gpu():
    """Tensors on cuda:1 while cuda:0 is current: the kernels launch on the tensors' GPU."""
    a, b, residual = (torch.randn(2, 4, 8, 8, device="cuda:1") for _ in range(3))
    assert torch.cuda.current_device() == 0
    out = torch.ops.scconv.relu_cat(a, b)
    torch.testing.assert_close(out, torch.relu(torch.cat([a, b], dim=1)), rtol=0, atol=0)
    x = out[:, :4].contiguous()
    expected = torch.relu(x + residual)
    torch.ops.scconv.add_relu_(x, residual)
    torch.testing.assert_close(x, expected, rtol=0, atol=0)
    for got, ref in zip(torch.ops.scconv.relu_split_pool(out, 4, 4),
                        _relu_split_pool_eager(out, 4, 4), strict=True):  # fmt: skip
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


def test_opcount_table_columns(capsys):
    opcount.main(["resnet50", "scnet50"])
    lines = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    assert lines["resnet50"][1:] == ["176", "105", "105", "40%"]  # no gate: triton = optimized
    assert lines["scnet50"][1:] == ["432", "217", "169", "50%"]
    table = opcount.breakdown("resnet50").set_index("op")
    assert table.loc["total"].tolist() == [176, 105]
    assert table.drop("total").sum().tolist() == [176, 105]


def test_bytes_breakdown_adds_reads_and_writes():
    table = opcount.bytes_table(("resnet50",), size=64)
    parts = opcount.bytes_breakdown("resnet50", size=64).set_index("op")
    for column in ("original_gb", "optimized_gb"):
        total = parts.loc["total", column]
        assert total == pytest.approx(table.loc[0, column], abs=1e-3)
        assert parts.drop("total")[column].sum() == pytest.approx(total, abs=0.002)
    assert 0 < int(table.loc[0, "saved"].rstrip("%")) < 50  # 9 %: folding saves, not keeps


def test_opcount_bytes_defaults_to_fp32(capsys):
    opcount.main(["resnet50", "--bytes", "--size", "64"])
    assert "fp32" in capsys.readouterr().out
