"""Tests of the fused Triton gating kernels (kernels/), against the one eager reference.

Without a GPU everything runs through Triton's interpreter (about 7 ms per program instance), so
tensors are tiny: N * C is at most 6 and planes at most 82 px. With a GPU the same tests run the
compiled kernels on CUDA tensors (``DEVICE``), and the tests marked ``cuda`` (SCNet-size shapes,
autotuning, the tuned table) run too; without one those are skipped.
"""

import json
import os
import re
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kernels
from kernels import configs, gate, op  # noqa: F401  (op registers the custom ops)
from kernels.reference import nearest_source_index, sc_gate_reference

REPO = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
# Where the kernels run: with CUDA they are compiled and take CUDA tensors only.
DEVICE = "cuda" if CUDA else "cpu"
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (compiled Triton kernels)")

# (atol, rtol) of the kernels against a float64 evaluation of the reference on the same (rounded)
# inputs. Low-precision results are rounded once from float32, so their error is about half an
# ulp: 2**-11 relative for float16, 2**-8 for bfloat16; rtol leaves a factor of two above that.
# float32: worst observed 4.8e-7 absolute on O(1) values (dk2 sums up to 11 terms).
TOLERANCES = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (2e-6, 2e-6),
    torch.float16: (1e-5, 2**-10),
    torch.bfloat16: (1e-4, 2**-7),
}


def make_tensor(shape, dtype, layout, generator):
    """A random tensor of ``shape`` on ``DEVICE`` in ``layout`` ("contiguous", "channels_last" or
    "slice"); drawn on the CPU, so the values do not depend on the device.

    "slice" is the channel-slice view ``t[:, 1:1 + C]`` of a larger contiguous tensor, the way
    SCBottleneck hands half of a projection to the gate; "slice_cl" is the same of channels_last.
    """
    n, c, h, w = shape
    if layout in ("slice", "slice_cl"):
        full = torch.randn((n, c + 3, h, w), generator=generator, dtype=torch.float64)
        if layout == "slice_cl":
            full = full.contiguous(memory_format=torch.channels_last)
        return full.to(DEVICE, dtype)[:, 1 : 1 + c]
    t = torch.randn(shape, generator=generator, dtype=torch.float64).to(DEVICE, dtype)
    if layout == "channels_last":
        t = t.contiguous(memory_format=torch.channels_last)
    return t


def make_inputs(N, C, H, W, h, w, dtype=torch.float32, layout="contiguous", seed=0):
    generator = torch.Generator().manual_seed(seed)
    layouts = layout if isinstance(layout, tuple) else (layout, layout, layout)
    x = make_tensor((N, C, H, W), dtype, layouts[0], generator)
    k2 = make_tensor((N, C, h, w), dtype, layouts[1], generator)
    k3 = make_tensor((N, C, H, W), dtype, layouts[2], generator)
    grad = make_tensor((N, C, H, W), dtype, "contiguous", generator)
    return x, k2, k3, grad


def source_index(small, big):
    """The source index of each of ``big`` outputs, read off F.interpolate itself (float32)."""
    probe = torch.arange(small, dtype=torch.float32).view(1, 1, small, 1)
    return F.interpolate(probe, size=(big, 1), mode="nearest").view(-1).long()


def reference_forward_backward(x, k2, k3, grad):
    """Output and (dx, dk2, dk3) of the eager reference, evaluated in float64.

    PyTorch's CPU float64 upsampling rounds its index arithmetic differently from the float32 one
    (which every other dtype, and CUDA, use) at some sizes, the first being H = 129, h = 45; the
    kernels use the float32 mapping for every dtype. Test sizes stay where the two agree, and this
    asserts it so a new size cannot silently compare against a different mapping.
    """
    (H, W), (h, w) = x.shape[-2:], k2.shape[-2:]
    # Checked on the real 2-D plane: PyTorch's float64 map along one axis can depend on the other.
    probe = torch.arange(h * w, dtype=torch.float64).view(1, 1, h, w)
    rows, cols = nearest_source_index(H, h), nearest_source_index(W, w)
    assert torch.equal(
        F.interpolate(probe, size=(H, W), mode="nearest"), probe[..., rows[:, None], cols]
    ), f"float64 and float32 nearest mappings differ for {h}x{w} -> {H}x{W}: pick another size"
    inputs = [t.detach().double().requires_grad_() for t in (x, k2, k3)]
    out = sc_gate_reference(*inputs)
    out.backward(grad.double())
    return out.detach(), tuple(t.grad for t in inputs)


def triton_forward_backward(x, k2, k3, grad):
    # detach() keeps each tensor's strides (views stay views), so the kernels see the layouts.
    inputs = [t.detach().requires_grad_() for t in (x, k2, k3)]
    out = kernels.sc_gate(*inputs)
    out.backward(grad)
    return out.detach(), tuple(t.grad for t in inputs)


def assert_close(actual, expected, dtype, what):
    atol, rtol = TOLERANCES[dtype]
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    torch.testing.assert_close(
        actual.double(), expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}"
    )


def check_against_reference(x, k2, k3, grad):
    out, grads = triton_forward_backward(x, k2, k3, grad)
    ref_out, ref_grads = reference_forward_backward(x, k2, k3, grad)
    assert_close(out, ref_out, x.dtype, "out")
    for name, actual, expected in zip(("dx", "dk2", "dk3"), grads, ref_grads, strict=True):
        assert_close(actual, expected, x.dtype, name)
    return out, grads


# (N, C, H, W, h, w), each with the reason it is here.
SHAPES = {
    "7x7_to_1x1": (1, 3, 7, 7, 1, 1),  # SCNet layer4 at 224 px with pooling_r 4
    "13x17_odd": (2, 3, 13, 17, 3, 4),  # non-square, sizes that do not divide
    "H74_h24": (1, 2, 74, 9, 24, 3),  # pooling_r 3: PyTorch maps row 37 to 11, i*h//H to 12
    "W82_w16": (1, 2, 9, 82, 3, 16),  # pooling_r 5: column 41 maps to 7, not 8
    "H46_h14": (1, 1, 46, 46, 14, 14),  # row and column 23 map to 6, not 7
    "identity": (2, 3, 6, 5, 6, 5),  # h == H: no upsampling
    "exact_2x": (1, 3, 12, 10, 6, 5),  # PyTorch's 2x shortcut (i >> 1)
    "wide_footprint": (1, 2, 5, 31, 1, 3),  # 10-11 columns per k2 pixel: two column chunks
    "single_row_col": (1, 2, 1, 1, 1, 1),
}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_matches_reference_float32(shape):
    check_against_reference(*make_inputs(*shape))


@pytest.mark.parametrize("layout", ["channels_last", "slice", "slice_cl"])
@pytest.mark.parametrize("shape", ["13x17_odd", "H74_h24"])
def test_layouts_match_reference(shape, layout):
    x, k2, k3, grad = make_inputs(*SHAPES[shape], layout=layout)
    out, _ = check_against_reference(x, k2, k3, grad)
    assert out.stride() == gate.empty_like_layout(x).stride()
    # (autograd may restride .grad of views, so the launcher's own outputs are checked)
    for g, t in zip(gate.gate_backward(grad, x, k2, k3), (x, k2, k3), strict=True):
        assert g.stride() == gate.empty_like_layout(t).stride()


def _padded(shape, pad, generator, where):
    """A random float32 view of a flat buffer with column stride 1 and ``pad`` extra elements
    after each sample (``where="sample"``: sample stride C*H*W + pad) or each row ("row": rows
    W + pad elements apart)."""
    n, c, h, w = shape
    row = w + pad if where == "row" else w
    sample = c * h * row + (pad if where == "sample" else 0)
    flat = torch.randn(n * sample, generator=generator, dtype=torch.float64)
    return flat.to(DEVICE, torch.float32).as_strided(shape, (sample, h * row, row, 1))


@pytest.mark.parametrize(
    "shape, pad, align",
    [
        ((2, 3, 14, 14, 3, 3), 0, 4),  # SCNet layer3 planes: 196 = 4 * 49
        ((2, 3, 8, 8, 2, 2), 0, 16),  # 64: capped at 16
        ((2, 3, 6, 6, 2, 2), 0, 4),
        ((2, 3, 14, 14, 3, 3), 2, 2),  # the sample stride, 590, lowers it to 2
        ((2, 3, 14, 14, 3, 3), 1, 1),
        ((2, 3, 7, 7, 1, 1), 0, 1),
    ],
)
@pytest.mark.parametrize("padded", ["x", "k3"])
def test_forward_plane_alignment_holds_for_the_strides_it_is_given(shape, pad, align, padded):
    """PLANE_ALIGN divides H*W and the sample and channel strides of x, k3 and out; the kernel
    gets those divided by it and multiplies them back, so a wrong value gives wrong outputs."""
    n, c, H, W, h, w = shape
    x, k2, k3, grad = make_inputs(*shape)
    odd = _padded((n, c, H, W), pad, torch.Generator().manual_seed(5), "sample")
    x, k3 = (odd, k3) if padded == "x" else (x, odd)
    assert gate.plane_align(x, k3, gate.empty_like_layout(x)) == align
    check_against_reference(x, k2, k3, grad)


@pytest.mark.parametrize(
    "shape, pad, uniform, align",
    [
        ((2, 3, 8, 8, 2, 2), 0, 4, 8),  # 4-column footprints, rows of 8
        ((1, 2, 56, 56, 14, 14), 0, 4, 8),  # SCNet layer1: rows of 56 = 8 * 7
        ((2, 3, 8, 8, 2, 2), 2, 4, 2),  # rows 10 apart
        ((2, 3, 12, 12, 6, 6), 0, 2, 4),
        ((2, 3, 16, 16, 16, 16), 0, 1, 16),  # identity: one column per k2 pixel
        ((2, 3, 16, 16, 2, 2), 1, 8, 1),  # 8-column footprints, rows 17 apart
        ((2, 3, 14, 14, 3, 3), 0, 0, 2),  # footprints of 5, 5 and 4 columns: the general path
        ((2, 3, 1, 8, 1, 2), 3, 4, 1),  # one row: its stride (11) is passed as 0
    ],
)
@pytest.mark.parametrize("padded", ["x", "grad"])
def test_backward_uniform_footprints_and_row_alignment(shape, pad, uniform, align, padded):
    """UNIFORM_W addresses each footprint as q * UNIFORM_W + step, and ROW_ALIGN divides the
    strides the kernel gets: wrong values give wrong gradients."""
    n, c, H, W, h, w = shape
    x, k2, k3, grad = make_inputs(*shape)
    odd = _padded((n, c, H, W), pad, torch.Generator().manual_seed(6), "row")
    x, grad = (odd, grad) if padded == "x" else (x, odd)
    assert gate.uniform_footprint(W, w) == uniform
    grads = [gate.empty_like_layout(t) for t in (x, k3)]
    assert gate.row_align(grad, x, k3, *grads) == align
    check_against_reference(x, k2, k3, grad)


def test_alignments_leave_int64_strides_and_size_one_dimensions_alone():
    """A stride past int32 reaches the kernel as int64 only if it is passed undivided (divided,
    it would be int32 and wrap when multiplied back): such tensors get alignment 1. Strides of
    size-1 sample and channel dimensions are never used and do not lower the alignment."""
    huge = 2**32 + 16  # divisible by 16, and past int32

    def strided(shape, strides):
        return torch.empty_strided(shape, strides, device="meta")

    plane = strided((2, 3, 14, 14), (huge, 196, 14, 1))
    assert gate.plane_align(plane, plane, plane) == 1
    assert gate.row_align(plane, plane) == 1
    args, constexprs, _ = gate.forward_launch_arguments(plane, plane[..., :3, :3], plane, plane)
    assert constexprs["PLANE_ALIGN"] == 1 and huge in [a for a in args if isinstance(a, int)]
    one_plane = strided((1, 1, 1, huge), (0, 0, 0, 1))  # H*W alone is past int32
    assert gate.plane_align(one_plane, one_plane, one_plane) == 1
    one_sample = strided((1, 3, 14, 14), (huge + 7, 196, 14, 1))
    assert gate.plane_align(one_sample, one_sample, one_sample) == 4
    one_channel = strided((2, 1, 8, 8), (64, 999, 8, 1))
    assert gate.row_align(one_channel) == 8
    one_row = strided((2, 3, 1, 8), (24, 8, 5, 1))
    assert gate.row_align(one_row) == 8
    k2 = torch.empty(2, 1, 2, 2, device="meta")  # k2's strides are passed as they are
    t = one_channel
    args, constexprs, _ = gate.backward_launch_arguments(t, t, k2, t, t, k2, t)
    assert constexprs["ROW_ALIGN"] == 8
    assert 999 not in [a for a in args if isinstance(a, int)]  # the unused stride is passed as 0


def test_uniform_footprint_is_interpolates_own_map():
    """Where it says F, F.interpolate reads column j from j // F; every power of two up to
    the footprint chunk is recognised."""
    for big in range(1, 97):
        for small in range(1, big + 1):
            footprint = gate.uniform_footprint(big, small)
            if footprint:
                assert torch.equal(source_index(small, big), torch.arange(big) // footprint)
    for footprint in (1, 2, 4, 8):
        assert all(gate.uniform_footprint(footprint * s, s) == footprint for s in range(1, 65))
    assert gate.uniform_footprint(7, 1) == 0  # 7 columns: not a power of two
    assert gate.uniform_footprint(64, 4) == 0  # 16 columns: wider than one chunk
    assert gate.uniform_footprint(74, 24) == 0


def test_plane_alignment_is_one_without_a_contiguous_plane():
    x, _, k3, _ = make_inputs(2, 8, 14, 14, 3, 3, layout="channels_last")
    assert gate.plane_align(x, k3, x) == 1
    y, _, _, _ = make_inputs(2, 8, 14, 14, 3, 3)
    assert gate.plane_align(y, y, y) == 4
    assert gate.plane_align(y, x, y) == 1  # one channels_last tensor is enough
    assert gate.plane_align(y[..., ::2], y[..., ::2], y[..., ::2]) == 1  # column stride 2


def test_one_column_plane_with_padded_rows_is_not_flat():
    """A (H, 1) plane is flat only if its rows are adjacent: here each row is 3 elements apart."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 6, 3, generator=generator)[..., :1].to(DEVICE)
    k2 = torch.randn(1, 2, 2, 1, generator=generator).to(DEVICE)
    k3 = torch.randn(1, 2, 6, 3, generator=generator)[..., :1].to(DEVICE)
    torch.testing.assert_close(gate.gate_forward(x, k2, k3), sc_gate_reference(x, k2, k3))


def test_launch_plans_are_cached_by_every_input_of_the_plan(monkeypatch):
    """Launch arguments are cached by shapes, strides, dtype and the int32 limit: a cached plan is
    reused only where a fresh one would be the same, and a lowered ``_INT32_LIMIT`` (the int64
    tests) is not hidden by a plan cached at the real limit."""
    from kernels import runtime

    monkeypatch.setattr(gate, "_FORWARD_PLANS", runtime.LaunchPlans())
    monkeypatch.setattr(gate, "_BACKWARD_PLANS", runtime.LaunchPlans())

    def fresh_forward(x, k2, k3, out):
        scalars, constexprs, _, table_key = gate._forward_plan(x, k2, k3, out)
        return (x, k2, k3, out, *scalars), constexprs, table_key

    with torch.device("meta"):
        x = torch.empty(2, 8, 14, 14)
        k2 = torch.empty(2, 8, 4, 4)
    cases = [
        (x, k2, x, x),
        (x.to(memory_format=torch.channels_last), k2, x, x),  # same shapes, other strides
        (x.double(), k2.double(), x.double(), x.double()),  # same strides, other dtype
        (torch.empty(2, 8, 16, 14, device="meta")[:, :, :14], k2, x, x),  # a row-padded view
    ]
    seen = set()
    for inputs in cases:
        first = gate.forward_launch_arguments(*inputs)
        first[1]["PLANE_ALIGN"] = -1  # the caller's copy: must not reach the cache
        args, constexprs, _ = gate.forward_launch_arguments(*inputs)
        fresh_args, fresh_constexprs, table_key = fresh_forward(*inputs)
        assert args == fresh_args and constexprs == fresh_constexprs
        seen.add((args[4:], tuple(constexprs.items()), table_key))
    assert len(seen) == len(cases) == len(gate._FORWARD_PLANS)  # each case its own plan
    for x_, k2_, k3_, _ in cases:  # the backward's plans, by the same inputs
        tensors = (x_, x_, k2_, k3_, *(gate.empty_like_layout(t) for t in (x_, k2_, k3_)))
        args, constexprs, _ = gate.backward_launch_arguments(*tensors)
        scalars, fresh_constexprs, _, _ = gate._backward_plan(*tensors)
        assert args == (*tensors, *scalars) and constexprs == fresh_constexprs
    assert len(gate._BACKWARD_PLANS) == len(cases)

    grads = [gate.empty_like_layout(t) for t in (x, k2, x)]
    assert not gate.backward_launch_arguments(x, x, k2, x, *grads)[1]["WIDE_INDEX"]
    assert not gate.forward_launch_arguments(x, k2, x, x)[1]["WIDE_INDEX"]
    monkeypatch.setattr(gate, "_INT32_LIMIT", 16)
    assert gate.backward_launch_arguments(x, x, k2, x, *grads)[1]["WIDE_INDEX"]
    assert gate.forward_launch_arguments(x, k2, x, x)[1]["WIDE_INDEX"]


def test_launch_plans_stay_bounded():
    from kernels import runtime

    plans, built = runtime.LaunchPlans(max_plans=2), []

    def build(value):
        built.append(value)
        return value * 10

    assert [plans.get(key, build, key) for key in (1, 2, 1)] == [10, 20, 10]
    assert built == [1, 2] and len(plans) == 2
    assert plans.get(3, build, 3) == 30 and len(plans) == 1  # full: started over
    assert plans.get(1, build, 1) == 10 and built == [1, 2, 3, 1]


def test_output_keeps_memory_format():
    x, k2, k3, _ = make_inputs(2, 3, 8, 8, 2, 2, layout="channels_last")
    assert gate.gate_forward(x, k2, k3).is_contiguous(memory_format=torch.channels_last)
    x, k2, k3, _ = make_inputs(2, 3, 8, 8, 2, 2)
    assert gate.gate_forward(x, k2, k3).is_contiguous()
    x, k2, k3, _ = make_inputs(2, 3, 8, 8, 2, 2, layout="slice_cl")
    assert gate.gate_forward(x, k2, k3).is_contiguous(memory_format=torch.channels_last)


def test_mixed_layouts_and_expanded_grad():
    x, k2, k3, _ = make_inputs(2, 3, 13, 11, 3, 2, layout=("channels_last", "slice", "contiguous"))
    grad = torch.randn(1, 1, 1, 1, device=DEVICE).expand(2, 3, 13, 11)  # stride 0
    check_against_reference(x, k2, k3, grad)


def test_kernels_do_not_copy_inputs(monkeypatch):
    """Views reach the kernels as they are: no .contiguous() on the way."""

    def no_copy(*args, **kwargs):
        raise AssertionError("an input was copied")

    x, k2, k3, grad = make_inputs(1, 2, 9, 7, 3, 2, layout="slice")
    monkeypatch.setattr(torch.Tensor, "contiguous", no_copy)
    out = gate.gate_forward(x, k2, k3)
    grads = gate.gate_backward(grad, x, k2, k3)
    monkeypatch.undo()
    ref_out, ref_grads = reference_forward_backward(x, k2, k3, grad)
    assert_close(out, ref_out, torch.float32, "out")
    for actual, expected in zip(grads, ref_grads, strict=True):
        assert_close(actual, expected, torch.float32, "grad")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_dtypes_match_reference(dtype, layout):
    x, k2, k3, grad = make_inputs(*SHAPES["13x17_odd"], dtype=dtype, layout=layout)
    check_against_reference(x, k2, k3, grad)


def test_gradcheck_float64():
    x, k2, k3, _ = make_inputs(1, 1, 5, 4, 2, 3, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (x, k2, k3)]
    assert torch.autograd.gradcheck(kernels.sc_gate, inputs)


@settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    n=st.integers(1, 2),
    c=st.integers(1, 3),
    hh=st.integers(1, 40),
    ww=st.integers(1, 40),
    data=st.data(),
)
def test_property_random_sizes(n, c, hh, ww, data):
    h = data.draw(st.integers(1, hh), label="h")
    w = data.draw(st.integers(1, ww), label="w")
    layout = data.draw(st.sampled_from(["contiguous", "channels_last", "slice"]), label="layout")
    x, k2, k3, grad = make_inputs(n, c, hh, ww, h, w, layout=layout, seed=hh * 41 + ww)
    # Written out with F.interpolate's float32 index map and float64 arithmetic, independently
    # of the reference module.
    rows, cols = source_index(h, hh), source_index(w, ww)
    assert torch.equal(k2[:, :, rows][:, :, :, cols], F.interpolate(k2, size=(hh, ww)))
    inputs = [t.detach().double().requires_grad_() for t in (x, k2, k3)]
    expected = inputs[2] * torch.sigmoid(inputs[0] + inputs[1][:, :, rows][:, :, :, cols])
    expected.backward(grad.double())
    out, grads = triton_forward_backward(x, k2, k3, grad)
    assert_close(out, expected.detach(), torch.float32, "out")
    for name, actual, t in zip(("dx", "dk2", "dk3"), grads, inputs, strict=True):
        assert_close(actual, t.grad, torch.float32, name)


@triton.jit
def _first_destination_probe(src_ptr, dst_size_ptr, src_size_ptr, scale_ptr, out_ptr, count,
                             BLOCK: tl.constexpr):  # fmt: skip
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < count
    src = tl.load(src_ptr + offsets, mask=mask, other=0)
    dst_size = tl.load(dst_size_ptr + offsets, mask=mask, other=1)
    src_size = tl.load(src_size_ptr + offsets, mask=mask, other=1)
    scale = tl.load(scale_ptr + offsets, mask=mask, other=1.0)
    first = gate._first_destination(src, dst_size, src_size, scale)
    tl.store(out_ptr + offsets, first, mask=mask)


@pytest.mark.skipif(CUDA, reason="probes the device helper through the interpreter")
def test_footprint_starts_match_interpolate_for_all_small_sizes():
    """The backward's footprint boundaries against F.interpolate's own index map.

    Every (H, h) with h <= H <= 160, plus large sizes, every k2 row p: the first output row that
    F.interpolate reads from row >= p.
    """
    pairs = [(big, small) for big in range(1, 161) for small in range(1, big + 1)]
    generator = torch.Generator().manual_seed(0)
    for big in torch.randint(161, 5000, (40,), generator=generator).tolist():
        pairs += [(big, small) for small in torch.randint(1, big + 1, (5,), generator=generator)]
    srcs, dst_sizes, src_sizes, scales, expected = [], [], [], [], []
    for big, small in pairs:
        small = int(small)
        index = source_index(small, big)
        p = torch.arange(small)
        srcs.append(p)
        expected.append(torch.searchsorted(index, p))
        dst_sizes.append(torch.full((small,), big))
        src_sizes.append(torch.full((small,), small))
        scales.append(torch.full((small,), gate.nearest_scale(small, big), dtype=torch.float32))
    src = torch.cat(srcs).to(torch.int32)
    expected = torch.cat(expected).to(torch.int32)
    out = torch.empty_like(src)
    block = triton.next_power_of_2(src.numel())
    _first_destination_probe[(1,)](
        src, torch.cat(dst_sizes).to(torch.int32), torch.cat(src_sizes).to(torch.int32),
        torch.cat(scales), out, src.numel(), BLOCK=block,
    )  # fmt: skip
    mismatch = (out != expected).nonzero()
    assert mismatch.numel() == 0, f"{len(mismatch)} wrong boundaries, first at {mismatch[:3]}"


@pytest.mark.parametrize(("big", "small", "row", "source_row"), [(74, 24, 37, 11), (82, 16, 41, 7)])
def test_design_note_rows_map_like_pytorch(big, small, row, source_row):
    """DESIGN.md's cases where integer arithmetic is wrong: one-hot k2 rows locate the source."""
    k2 = torch.zeros(1, small, small, 1, device=DEVICE)
    k2[0, torch.arange(small), torch.arange(small), 0] = 50.0  # channel c lights k2 row c
    x = torch.zeros(1, small, big, 1, device=DEVICE)
    k3 = torch.ones(1, small, big, 1, device=DEVICE)
    out = gate.gate_forward(x, k2, k3)
    lit = out[0, :, row, 0] > 0.99  # sigmoid(50) vs sigmoid(0)
    assert lit.nonzero().view(-1).tolist() == [source_row]
    assert (row * small) // big != source_row  # the case really distinguishes the two formulas


@triton.jit
def _nearest_source_probe(dst_ptr, out_ptr, scale, src_size, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    dst = tl.load(dst_ptr + offsets)
    tl.store(out_ptr + offsets, gate._nearest_source(dst, scale, src_size))


@pytest.mark.skipif(CUDA, reason="probes the device helper through the interpreter")
def test_nearest_source_clamps_like_interpolate_at_large_sizes():
    """Past 2**23 rows float32 rounding can map the last row one past k2's end; PyTorch clamps it
    to h - 1, and so must the kernels' map and the reference's."""
    big, small = 12115276, 66617  # float32(big - 1) * float32(small / big) rounds up to small
    dst = torch.tensor([0, big // 2, big - 2, big - 1], dtype=torch.int32)
    out = torch.empty_like(dst)
    _nearest_source_probe[(1,)](dst, out, gate.nearest_scale(small, big), small, BLOCK=4)
    probe = torch.arange(small, dtype=torch.float32).view(1, 1, small, 1)
    expected = F.interpolate(probe, size=(big, 1), mode="nearest").view(-1)[dst.long()].int()
    assert out.tolist() == expected.tolist()
    assert expected[-1] == small - 1
    assert nearest_source_index(big, small)[-1] == small - 1


@pytest.mark.parametrize("shape", ["13x17_odd", "exact_2x"])  # exact_2x: UNIFORM_W 2
@pytest.mark.parametrize("layout", ["contiguous", "slice_cl"])
def test_int64_index_path_matches(monkeypatch, layout, shape):
    """The WIDE_INDEX code path (offsets past 2**31), forced on small tensors."""
    monkeypatch.setattr(gate, "_INT32_LIMIT", 16)
    x, k2, k3, grad = make_inputs(*SHAPES[shape], layout=layout)
    assert gate._needs_wide_index(x)
    check_against_reference(x, k2, k3, grad)


def test_wide_index_counts_every_dimension_of_a_sample():
    assert gate._needs_wide_index(torch.empty(1, 2**16, 256, 256, device="meta"))  # channels
    assert not gate._needs_wide_index(torch.empty(1, 2**10, 256, 256, device="meta"))
    # Samples stay apart: n * stride_n is int64 in the kernels whatever WIDE_INDEX says.
    assert not gate._needs_wide_index(torch.empty(2**16, 2**10, 64, 64, device="meta"))


def test_backward_is_deterministic():
    x, k2, k3, grad = make_inputs(2, 3, 13, 17, 3, 4, layout="channels_last")
    first = gate.gate_backward(grad, x, k2, k3)
    second = gate.gate_backward(grad, x, k2, k3)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_backward_does_not_write_inputs():
    x, k2, k3, grad = make_inputs(1, 2, 9, 7, 3, 2)
    copies = [t.clone() for t in (x, k2, k3, grad)]
    gate.gate_backward(grad, x, k2, k3)
    for t, c in zip((x, k2, k3, grad), copies, strict=True):
        assert torch.equal(t, c)


def test_zero_batch_returns_empty():
    x, k2, k3, _ = make_inputs(0, 3, 8, 8, 2, 2)
    inputs = [t.requires_grad_() for t in (x, k2, k3)]
    out = kernels.sc_gate(*inputs)
    assert out.shape == (0, 3, 8, 8)
    out.sum().backward()
    assert [tuple(t.grad.shape) for t in inputs] == [(0, 3, 8, 8), (0, 3, 2, 2), (0, 3, 8, 8)]


@pytest.mark.filterwarnings("error::RuntimeWarning")  # no numpy warnings from the interpreter
def test_nan_and_inf_propagate_like_eager():
    x, k2, k3, grad = make_inputs(1, 2, 8, 8, 2, 2)
    x[0, 0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    k2[0, 1, 1, 1] = float("inf")
    k2[0, 1, 0, 0] = -float("inf")
    k3[0, 0, 1, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    k3[0, 0, 0, 2] = float("inf")  # inf * sigmoid(-inf) = inf * 0 = nan, as in eager
    out, grads = triton_forward_backward(x, k2, k3, grad)
    inputs = [t.detach().requires_grad_() for t in (x, k2, k3)]
    expected = sc_gate_reference(*inputs)
    expected.backward(grad)
    torch.testing.assert_close(out, expected.detach(), equal_nan=True, atol=2e-6, rtol=2e-6)
    assert out.isnan().sum() >= 2 and out.isinf().sum() >= 2  # the test does hit non-finite paths
    for actual, t in zip(grads, inputs, strict=True):
        torch.testing.assert_close(actual, t.grad, equal_nan=True, atol=2e-6, rtol=2e-6)


def _bytes_saved(fn, *inputs):
    """Bytes of the tensors autograd saves for backward while running fn (each save counted)."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(saved)


def test_saves_only_inputs_for_backward():
    x, k2, k3, _ = make_inputs(2, 3, 16, 16, 4, 4)
    inputs = [t.requires_grad_() for t in (x, k2, k3)]
    triton_bytes = _bytes_saved(kernels.sc_gate, *inputs)
    eager_bytes = _bytes_saved(sc_gate_reference, *inputs)
    limit = sum(t.numel() * t.element_size() for t in inputs)
    assert 0 < triton_bytes <= limit
    assert triton_bytes < eager_bytes  # eager saves sigmoid's output (twice) and k3


BAD_INPUTS = {
    # name: (x shape, k2 shape, k3 shape, dtypes, exception, words the message must contain)
    "k2_wrong_batch": ((2, 3, 8, 8), (1, 3, 2, 2), (2, 3, 8, 8), None, ValueError, "(1, 3, 2, 2)"),
    "k2_wrong_channels": ((2, 3, 8, 8), (2, 4, 2, 2), (2, 3, 8, 8), None, ValueError, "(2, 4"),
    "k3_wrong_shape": ((2, 3, 8, 8), (2, 3, 2, 2), (2, 3, 8, 9), None, ValueError, "(2, 3, 8, 9)"),
    "k2_taller_than_x": ((1, 3, 4, 8), (1, 3, 5, 2), (1, 3, 4, 8), None, ValueError, "h <= H"),
    "k2_wider_than_x": ((1, 3, 8, 4), (1, 3, 2, 5), (1, 3, 8, 4), None, ValueError, "w <= W"),
    "x_rank_3": ((3, 8, 8), (1, 3, 2, 2), (3, 8, 8), None, ValueError, "4-D"),
    "k2_rank_5": ((1, 3, 8, 8), (1, 1, 3, 2, 2), (1, 3, 8, 8), None, ValueError, "4-D"),
    "mixed_dtypes": (
        (1, 3, 8, 8), (1, 3, 2, 2), (1, 3, 8, 8),
        (torch.float32, torch.float16, torch.float32), TypeError, "torch.float16",
    ),
    "integer": (
        (1, 3, 8, 8), (1, 3, 2, 2), (1, 3, 8, 8),
        (torch.int32, torch.int32, torch.int32), TypeError, "torch.int32",
    ),
    "bool": (
        (1, 3, 8, 8), (1, 3, 2, 2), (1, 3, 8, 8),
        (torch.float32, torch.bool, torch.float32), TypeError, "torch.bool",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
@pytest.mark.parametrize("entry", ["sc_gate", "gate_forward", "gate_backward"])
def test_bad_inputs_raise(case, entry):
    x_shape, k2_shape, k3_shape, dtypes, exception, words = case
    dtypes = dtypes or (torch.float32,) * 3
    x, k2, k3 = (
        torch.ones(s, device=DEVICE, dtype=d)
        for s, d in zip((x_shape, k2_shape, k3_shape), dtypes, strict=True)
    )
    with pytest.raises(exception) as info:
        if entry == "sc_gate":
            kernels.sc_gate(x, k2, k3)
        elif entry == "gate_forward":
            gate.gate_forward(x, k2, k3)
        else:
            gate.gate_backward(torch.ones_like(x), x, k2, k3)
    assert words in str(info.value)


def test_zero_sized_k2_raises():
    with pytest.raises(ValueError, match="1 <= h"):
        gate.gate_forward(torch.ones(1, 1, 4, 4), torch.ones(1, 1, 0, 2), torch.ones(1, 1, 4, 4))


def test_non_tensor_raises():
    with pytest.raises(TypeError, match="numpy|ndarray|list"):
        gate.gate_forward([[1.0]], torch.ones(1, 1, 1, 1), torch.ones(1, 1, 1, 1))
    array = np.ones((1, 1, 4, 4), dtype=np.float32)
    with pytest.raises(TypeError, match="sc_gate: k3 must be a torch.Tensor, got ndarray"):
        kernels.sc_gate(torch.ones(1, 1, 4, 4), torch.ones(1, 1, 2, 2), array)


def test_double_backward_raises_a_clear_error():
    x, k2, k3, grad = make_inputs(1, 2, 4, 4, 2, 2)
    inputs = [t.requires_grad_() for t in (x, k2, k3)]
    out = kernels.sc_gate(*inputs)
    grads = torch.autograd.grad(out, inputs, grad, create_graph=True)
    with pytest.raises(RuntimeError, match="sc_gate: double backward .* is not supported"):
        grads[0].sum().backward()


@pytest.mark.skipif(not CUDA, reason="needs a second device type")
def test_mixed_devices_raise():
    x = torch.ones(1, 3, 8, 8, device="cuda")
    with pytest.raises(ValueError, match="cuda"):
        kernels.sc_gate(x, torch.ones(1, 3, 2, 2), x)


def test_mixed_devices_raise_on_meta():
    # Without a GPU, a meta tensor is the second device: the check runs before any launch.
    x = torch.ones(1, 3, 8, 8)
    with pytest.raises(ValueError, match="meta"):
        gate.gate_forward(x, torch.ones(1, 3, 2, 2, device="meta"), x)


def test_bad_grad_out_raises():
    x, k2, k3, _ = make_inputs(1, 2, 8, 8, 2, 2)
    with pytest.raises(ValueError, match=r"\(1, 2, 8, 7\)"):
        gate.gate_backward(torch.ones(1, 2, 8, 7, device=DEVICE), x, k2, k3)
    with pytest.raises(ValueError, match="grad_out must match x.*meta"):
        gate.gate_backward(torch.ones(1, 2, 8, 8, device="meta"), x, k2, k3)


def test_backward_rejects_sizes_past_exact_footprints(monkeypatch):
    x = torch.ones(1, 1, gate.MAX_BACKWARD_SIZE + 1, 1, dtype=torch.float16)
    k2 = torch.ones(1, 1, 1, 1, dtype=torch.float16)
    with pytest.raises(ValueError, match="at most 4194303"):
        gate.gate_backward(x, x, k2, x)
    launches = []  # the limit itself is accepted (not launched: 4M rows in the interpreter)
    monkeypatch.setattr(gate, "_launch", lambda *args: launches.append(args))
    x = x[:, :, : gate.MAX_BACKWARD_SIZE]
    gate.gate_backward(x, x, k2, x)
    assert len(launches) == 1


def test_custom_op_passes_opcheck():
    x, k2, k3, _ = make_inputs(1, 2, 7, 6, 2, 3)
    inputs = [t.requires_grad_() for t in (x, k2, k3)]
    torch.library.opcheck(torch.ops.scconv.sc_gate.default, inputs)
    x, k2, k3, _ = make_inputs(1, 2, 7, 6, 2, 3, layout="channels_last")
    torch.library.opcheck(torch.ops.scconv.sc_gate.default, [x, k2, k3])


def test_backward_fake_strides_match_the_real_ones_for_mixed_layouts():
    """torch.compile plans the backward from the fake kernel: each gradient takes its own
    input's layout (grad_k3 that of k3, not of x)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, k2, k3, grad = make_inputs(1, 3, 6, 5, 2, 2, layout=("channels_last", "contiguous",
                                                            "contiguous"))  # fmt: skip
    real = torch.ops.scconv.sc_gate_backward(grad, x, k2, k3)
    with FakeTensorMode() as mode:
        fakes = torch.ops.scconv.sc_gate_backward(*(mode.from_tensor(t) for t in (grad, x, k2, k3)))
    assert [f.stride() for f in fakes] == [r.stride() for r in real]
    assert real[0].stride() != real[2].stride()  # the layouts really differ


def test_fake_kernels_check_inputs():
    """torch.compile meets the fake kernels only: they raise the real errors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, k2, k3, grad = make_inputs(1, 2, 6, 5, 2, 2)
    k2 = k2[:, :1].clone()  # one channel for x's two
    with pytest.raises(ValueError) as real:
        gate.check_inputs(x, k2, k3)
    with FakeTensorMode() as mode:
        fx, fk2, fk3, fg = (mode.from_tensor(t) for t in (x, k2, k3, grad))
        with pytest.raises(ValueError, match=re.escape(str(real.value))):
            torch.ops.scconv.sc_gate(fx, fk2, fk3)
        with pytest.raises(ValueError, match=re.escape(str(real.value))):
            torch.ops.scconv.sc_gate_backward(fg, fx, fk2, fk3)


def test_torch_compile_fullgraph_matches():
    x, k2, k3, grad = make_inputs(2, 3, 9, 10, 3, 2)

    def block(x, k2, k3):
        return torch.relu(kernels.sc_gate(x * 2.0, k2, k3) + 1.0)

    inputs = [t.clone().requires_grad_() for t in (x, k2, k3)]
    compiled = torch.compile(block, fullgraph=True)
    out = compiled(*inputs)
    out.backward(grad)
    ref_inputs = [t.double().requires_grad_() for t in (x, k2, k3)]
    expected = torch.relu(sc_gate_reference(ref_inputs[0] * 2.0, *ref_inputs[1:]) + 1.0)
    expected.backward(grad.double())
    assert_close(out.detach(), expected.detach(), torch.float32, "out")
    for a, t in zip(inputs, ref_inputs, strict=True):
        assert_close(a.grad, t.grad, torch.float32, "grad")


# ------------------------------------------------------------------ configurations and table
@pytest.mark.parametrize("kernel", configs.KERNELS)
def test_every_search_space_config_is_correct(kernel):
    """Each configuration the sweep may pick gives the right answer (through the interpreter)."""
    space = configs.search_space(kernel)
    assert len(space) > 1
    x, k2, k3, grad = make_inputs(1, 2, 9, 10, 3, 2, layout="channels_last")
    ref_out, ref_grads = reference_forward_backward(x, k2, k3, grad)
    for config in space:
        if kernel == "forward":
            assert_close(gate.gate_forward(x, k2, k3, config=config), ref_out, x.dtype, config)
        else:
            grads = gate.gate_backward(grad, x, k2, k3, config=config)
            for actual, expected in zip(grads, ref_grads, strict=True):
                assert_close(actual, expected, x.dtype, str(config))


def test_interpreter_uses_one_config():
    if not gate.INTERPRETED:
        pytest.skip("kernels are compiled on this machine")
    assert gate._gate_forward_autotuned.configs == [configs.interpreter_config("forward")]
    assert gate._gate_backward_autotuned.configs == [configs.interpreter_config("backward")]
    assert len(configs.autotune_configs("forward", interpreted=False)) > 1


def test_search_space_has_no_duplicates_and_every_family_keeps_its_tiles():
    for kernel in configs.KERNELS:
        ids = [configs._config_id(c) for c in configs.search_space(kernel)]
        assert len(ids) == len(set(ids)), kernel
    # (32, 4) is both a channels_last tile and a uniform-footprint one: it stays in both.
    prune = configs.prune_for_layout("backward")
    space = configs.search_space("backward")
    channels_last = prune(space, {"C": 32, "H": 56, "W": 56, "w": 14, "stride_xc": 1})
    assert {"BLOCK_C": 32, "BLOCK_Q": 4} in [c.kwargs for c in channels_last]


def test_prune_reads_the_launch_arguments():
    """Fed what the launchers pass (kernels.codegen.pruned_configs): a channel stride divided to
    1 by PLANE_ALIGN (NCHW 2x2 planes: 4 // 4) or ROW_ALIGN (rows of 8, H = 1: 8 // 8) still
    counts as NCHW, and the uniform-footprint tiles come only with UNIFORM_W (56x56 from 14x14,
    not 14x14 from 3x3)."""
    from kernels import codegen

    plane = {
        kernel: {configs._config_id(c) for c in configs._plane_configs(kernel)}
        for kernel in configs.KERNELS
    }
    x = torch.empty(4, 8, 2, 2, device="meta")
    args, constexprs, _ = gate.forward_launch_arguments(x, x[..., :1, :1], x, x)
    assert args[gate._gate_forward_kernel.arg_names.index("stride_xc")] == 1
    assert constexprs["PLANE_ALIGN"] == 4
    kept = codegen.pruned_configs("forward", x, x[..., :1, :1], x)
    assert kept and all(configs._config_id(c) in plane["forward"] for c in kept)
    x, k2 = torch.empty(2, 4, 1, 8, device="meta"), torch.empty(2, 4, 1, 2, device="meta")
    args, constexprs, _ = gate.backward_launch_arguments(x, x, k2, x, x, k2, x)
    assert args[gate._gate_backward_kernel.arg_names.index("stride_xc")] == 1
    assert constexprs["ROW_ALIGN"] == 8
    kept = codegen.pruned_configs("backward", x, k2, x)
    assert kept and all(configs._config_id(c) in plane["backward"] for c in kept)
    wide = {configs._config_id(c) for c in configs._uniform_footprint_configs()}
    for (H, h), uniform in (((56, 14), True), ((14, 3), False)):
        x, k2 = torch.empty(2, 32, H, H, device="meta"), torch.empty(2, 32, h, h, device="meta")
        kept = codegen.pruned_configs("backward", x, k2, x)
        assert any(configs._config_id(c) in wide for c in kept) == uniform, (H, kept)


def test_autotune_key_holds_the_alignments():
    """stride_xc arrives divided by them: without them the key can be equal for an NCHW and a
    channels-contiguous launch, and one would run the other's tuned configuration."""
    for autotuned in (gate._gate_forward_autotuned, gate._gate_backward_autotuned):
        assert {"stride_xc", "PLANE_ALIGN", "ROW_ALIGN"} <= set(autotuned.keys)


@pytest.mark.parametrize("kernel", configs.KERNELS)
def test_prune_picks_layout_family(kernel):
    prune = configs.prune_for_layout(kernel)
    space = configs.search_space(kernel)
    spatial = "BLOCK_HW" if kernel == "forward" else "BLOCK_Q"
    common = {"C": 64, "H": 56, "W": 56, "w": 14}
    nchw = prune(space, {**common, "stride_xc": 56 * 56})
    nhwc = prune(space, {**common, "stride_xc": 1})
    plane = [configs.config_to_entry(c) for c in configs._plane_configs(kernel)]
    channel = [configs.config_to_entry(c) for c in configs._channel_configs(kernel)]
    nchw, nhwc = ([configs.config_to_entry(c) for c in kept] for kept in (nchw, nhwc))
    assert nchw and all(c in plane for c in nchw)
    assert nhwc and all(c in channel for c in nhwc)
    # A tile may be in both families ((32, 64) forward), but each layout gets some of its own.
    assert any(c not in plane for c in nhwc) and any(c not in channel for c in nchw)
    # C == 1: strides cannot tell layouts apart, plane tiles; none fits, so the smallest stays.
    tiny = prune(space, {"C": 1, "H": 1, "W": 1, "w": 1, "stride_xc": 1})
    smallest = min(c.kwargs["BLOCK_C"] * c.kwargs[spatial] for c in configs._plane_configs(kernel))
    assert [c.kwargs["BLOCK_C"] * c.kwargs[spatial] for c in tiny] == [smallest]


def test_prune_keeps_tiles_up_to_the_next_power_of_two():
    """A tile as large as the sizes rounded up to a power of two fits (5 channels: BLOCK_C 8)."""
    prune = configs.prune_for_layout("backward")
    arguments = {"C": 5, "H": 16, "W": 16, "w": 16, "stride_xc": 256}
    kept = [c.kwargs for c in prune(configs.search_space("backward"), arguments)]
    assert {"BLOCK_C": 8, "BLOCK_Q": 8} in kept


def test_table_key_format():
    x = torch.empty(256, 32, 56, 56, dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last
    )
    k2 = torch.empty(256, 32, 14, 14, dtype=torch.bfloat16)
    assert configs.table_key(x, k2) == "bfloat16|256,32,56,56|14,14|channels_last"
    assert configs.table_key(x.float().contiguous(), k2).endswith("|contiguous")
    assert configs.table_key(torch.empty(2, 6, 4, 4)[:, :3], k2).endswith("|strided")


def test_table_round_trip_and_lookup(tmp_path):
    path = tmp_path / "tuned.json"
    assert configs.load_table(path) == {}
    assert configs.lookup("forward", "GPU", "key", path=path) is None
    winner = triton.Config({"BLOCK_C": 2, "BLOCK_HW": 512}, num_warps=8, num_stages=1)
    table = {"GPU": {"forward": {"key": configs.config_to_entry(winner)}}}
    configs.save_table(table, path)
    assert configs.load_table(path) == table
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    found = configs.lookup("forward", "GPU", "key", path=path)
    assert (found.kwargs, found.num_warps, found.num_stages) == (winner.kwargs, 8, 1)
    assert configs.lookup("backward", "GPU", "key", path=path) is None
    # a rewrite is seen by the next lookup
    table["GPU"]["forward"]["key"]["num_warps"] = 4
    configs.save_table(table, path)
    os.utime(path, ns=(0, 10**18))  # force a new modification time on coarse clocks
    assert configs.lookup("forward", "GPU", "key", path=path).num_warps == 4


def test_table_errors_name_the_problem(tmp_path):
    path = tmp_path / "tuned.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        configs.load_table(path)
    path.write_text(json.dumps({"GPU": {"forward": {"key": {"kwargs": {"BLOCK": 1}}}}}))
    with pytest.raises(ValueError, match="BLOCK_C"):
        configs.lookup("forward", "GPU", "key", path=path)
    with pytest.raises(ValueError, match="unknown kernel"):
        configs.search_space("sideways")
    with pytest.raises(TypeError):
        configs.save_table([], path)


def test_table_rejects_non_objects_and_malformed_entries(tmp_path):
    path = tmp_path / "tuned.json"
    path.write_text("[]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        configs.load_table(path)
    full = {"kwargs": {"BLOCK_C": 1, "BLOCK_HW": 1024}, "num_warps": 4, "num_stages": 3}
    assert configs.entry_to_config("forward", full).num_stages == 3
    bad = [
        {**full, "kwargs": {**full["kwargs"], "BLOCK_Q": 4}},  # a backward parameter too
        {k: v for k, v in full.items() if k != "num_stages"},
        {**full, "num_warps": "four"},
        {**full, "num_warps": True},
        {**full, "kwargs": {**full["kwargs"], "BLOCK_C": 0}},
    ]
    for entry in bad:
        with pytest.raises(ValueError, match="where: expected .* of positive integers"):
            configs.entry_to_config("forward", entry, where="where")
    with pytest.raises(ValueError, match="unknown kernel"):
        configs.lookup("sideways", "GPU", "key", path=tmp_path / "absent.json")


def test_save_table_is_world_readable_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "tuned.json"
    old = os.umask(0o022)
    try:
        configs.save_table({}, path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's 0600

    def full_disk(*args):
        raise OSError("disk full")

    monkeypatch.setattr(configs.os, "replace", full_disk)
    with pytest.raises(OSError, match="disk full"):
        configs.save_table({"GPU": {}}, path)
    assert list(tmp_path.iterdir()) == [path] and configs.load_table(path) == {}


def test_table_key_calls_ambiguous_strides_contiguous():
    k2 = torch.empty(1, 1, 2, 2)
    for shape in ((1, 1, 4, 4), (2, 8, 1, 1)):  # both NCHW- and channels_last-contiguous
        assert configs.table_key(torch.empty(shape), k2).endswith("|contiguous"), shape


def test_prune_bounds_backward_tiles_by_k2_width_rounded_up():
    prune = configs.prune_for_layout("backward")
    space = configs.search_space("backward")
    common = {"C": 64, "H": 56, "W": 56, "stride_xc": 56 * 56}
    assert {"BLOCK_C": 1, "BLOCK_Q": 16} in [c.kwargs for c in prune(space, {**common, "w": 14})]
    assert max(c.kwargs["BLOCK_Q"] for c in prune(space, {**common, "w": 2})) == 2


def test_shipped_table_is_valid():
    table = configs.load_table()
    assert isinstance(table, dict)
    for gpu, kernels_ in table.items():
        for kernel, entries in kernels_.items():
            for key, entry in entries.items():
                configs.entry_to_config(kernel, entry, where=f"{gpu}/{kernel}/{key}")


# ------------------------------------------------------------------ import orders
def _run_python(code, env_changes=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_changes or {})
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


_CHECK = """
    shapes = [(1, 2, 6, 5), (1, 2, 2, 2), (1, 2, 6, 5)]
    x, k2, k3 = (torch.randn(s, requires_grad=True) for s in shapes)
    out = {call}
    out.sum().backward()  # forward and backward kernels both run
    grads = [t.grad for t in (x, k2, k3)]
    for t in (x, k2, k3):
        t.grad = None
    kernels.reference.sc_gate_reference(x, k2, k3).sum().backward()
    torch.testing.assert_close(out, kernels.reference.sc_gate_reference(x, k2, k3))
    torch.testing.assert_close(grads, [t.grad for t in (x, k2, k3)])
    print("ok")
"""

IMPORT_ORDERS = {
    "torch_first": "import torch\nimport kernels\nimport kernels.reference",
    "torchvision_first": "import torch, torchvision\nimport kernels\nimport kernels.reference",
    "triton_first": "import torch, triton\nimport kernels\nimport kernels.reference",
    "kernels_first": "import kernels\nimport torch\nimport kernels.reference",
    "scconv_first": "import scconv\nimport torch\nimport kernels, kernels.reference",
}


@pytest.mark.skipif(CUDA, reason="checks the interpreter set-up of machines without a GPU")
@pytest.mark.parametrize("order", IMPORT_ORDERS.values(), ids=IMPORT_ORDERS.keys())
def test_import_orders_run_through_interpreter(order):
    call = (
        "scconv.sc_gate(x, k2, k3, 'triton')" if "scconv" in order else "kernels.sc_gate(x, k2, k3)"
    )
    result = _run_python(order + "\n" + textwrap.dedent(_CHECK.format(call=call)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


@pytest.mark.skipif(CUDA, reason="the error is for machines without a GPU")
def test_interpreter_switched_off_without_gpu_raises_helpful_error():
    code = "import torch, kernels\n" + textwrap.dedent(
        _CHECK.format(call="kernels.sc_gate(x, k2, k3)")
    )
    result = _run_python(code, {"TRITON_INTERPRET": "0"})
    assert result.returncode != 0
    assert "RuntimeError" in result.stderr
    assert "TRITON_INTERPRET=1" in result.stderr and "import `kernels`" in result.stderr


@pytest.mark.parametrize(
    "value, expected", [("TRUE", True), (" on", True), ("0", False), ("", False)]
)
def test_interpreter_requested_reads_triton_words(monkeypatch, value, expected):
    from kernels import runtime

    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert runtime.interpreter_requested() is expected


def test_compiled_kernels_need_a_gpu_and_cuda_tensors(monkeypatch):
    from kernels import runtime

    monkeypatch.setattr(runtime, "cuda_present", lambda: True)
    runtime.require_launchable(False, torch.device("cuda"), "op", "use X")
    runtime.require_launchable(True, torch.device("cpu"), "op", "use X")
    for device in ("cpu", "meta"):
        with pytest.raises(ValueError, match=f"op: .* got tensors on {device}; .* or use X"):
            runtime.require_launchable(False, torch.device(device), "op", "use X")
    monkeypatch.setattr(runtime, "cuda_present", lambda: False)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        runtime.require_runnable(False)


@pytest.mark.skipif(CUDA, reason="the interpreter is checked only where it runs")
def test_interpreter_that_cannot_loop_is_named(monkeypatch):
    # What Triton 3.6's interpreter raises under NumPy >= 2.4 (see gate._check_interpreter_loops);
    # `make test-compat` also checks the real failure with Triton 3.6.
    from triton.runtime.errors import InterpreterError

    def failing_launch(*args):
        raise InterpreterError(repr(TypeError("only 0-dimensional arrays can be converted")))

    monkeypatch.setattr(gate, "_loop_bound_probe", {(1,): failing_launch})
    gate._check_interpreter_loops.cache_clear()
    x, k2, k3 = torch.randn(1, 2, 6, 5), torch.randn(1, 2, 2, 2), torch.randn(1, 2, 6, 5)
    try:
        with pytest.raises(RuntimeError, match=r"interpreter cannot run .*numpy<2\.4"):
            kernels.sc_gate(x, k2, k3)
    finally:
        gate._check_interpreter_loops.cache_clear()
    monkeypatch.undo()
    torch.testing.assert_close(kernels.sc_gate(x, k2, k3), sc_gate_reference(x, k2, k3))


# The folder holding the GPU machine's torch, torchvision and Triton 3.6 (`make test-compat`).
COMPAT_SITE = os.environ.get("SCCONV_COMPAT_SITE")


@pytest.mark.skipif(not COMPAT_SITE, reason="needs `make test-compat` (Triton 3.6 unpacked)")
@pytest.mark.skipif(CUDA, reason="the interpreter is checked only where it runs")
def test_triton36_interpreter_with_new_numpy_raises_named_error():
    # The GPU machine's stack first on the path, with this venv's own NumPy (>= 2.4, as there)
    # rather than the older one that `make test-compat` puts beside it.
    path = {"PYTHONPATH": f"{REPO}{os.pathsep}{COMPAT_SITE}"}
    numpy_version = _run_python("import numpy; print(numpy.__version__)", path).stdout.strip()
    if tuple(int(v) for v in numpy_version.split(".")[:2]) < (2, 4):
        pytest.skip(f"this venv's NumPy {numpy_version} still converts 1-element arrays")
    code = "import torch, kernels\n" + textwrap.dedent(
        _CHECK.format(call="kernels.sc_gate(x, k2, k3)")
    )
    result = _run_python(code, path)
    assert result.returncode != 0
    assert "Triton 3.6" in result.stderr and "numpy<2.4" in result.stderr, result.stderr[-3000:]


def test_importing_kernels_does_not_import_triton():
    result = _run_python(
        "import sys, kernels\nprint('triton' in sys.modules, 'kernels.gate' in sys.modules)"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["False", "False"]


_CODEGEN_CHECK = """
import re, torch, triton
from kernels import codegen


def meta(shape, dtype=torch.bfloat16, layout=torch.contiguous_format):
    return torch.empty(shape, dtype=dtype, device="meta").contiguous(memory_format=layout)


def compiled(kernel, x, k2, **kwargs):
    config = triton.Config(kwargs, num_warps=4)
    return codegen.summary(codegen.compile_kernel(kernel, x, k2, x, config))


x, k2 = meta((2, 32, 56, 56)), meta((2, 32, 14, 14))
forward = compiled("forward", x, k2, BLOCK_C=2, BLOCK_HW=1024)
assert "ld.global.v4.b32" in forward["loads"], forward  # 16-byte loads of x and k3 (NCHW)
assert "st.global.v4.b32" in forward["stores"], forward
x, k2 = meta((2, 128, 14, 14)), meta((2, 128, 3, 3))  # 196 = 4 * 49: PLANE_ALIGN 4
forward = compiled("forward", x, k2, BLOCK_C=4, BLOCK_HW=256)
assert "ld.global.v2.b32" in forward["loads"], forward  # 8-byte loads of x and k3 (4 bf16)
assert set(forward["stores"]) == {"st.global.v2.b32"}, forward
cl = torch.channels_last
x, k2 = meta((2, 32, 56, 56), layout=cl), meta((2, 32, 14, 14), layout=cl)
forward = compiled("forward", x, k2, BLOCK_C=32, BLOCK_HW=32)
assert set(forward["loads"]) == {"ld.global.v4.b32"}, forward  # x, k3 and k2 along channels
backward = compiled("backward", x, k2, BLOCK_C=32, BLOCK_Q=4)
assert any(".v" in kind for kind in backward["loads"]), backward
backward = compiled("backward", x, k2, BLOCK_C=32, BLOCK_Q=8)  # 8 channels a thread
assert backward["loads"].get("ld.global.v4.b32") == 3, backward  # 16-byte g, x, k3
x, k2 = meta((2, 32, 56, 56)), meta((2, 32, 14, 14))  # NCHW, 4-column footprints
backward = compiled("backward", x, k2, BLOCK_C=8, BLOCK_Q=16)
assert backward["loads"].get("ld.global.v2.b32") == 3, backward  # 8-byte g, x, k3 (4 bf16)
assert backward["stores"].get("st.global.v2.b32") == 2, backward  # dx, dk3
x, k2 = meta((2, 3, 13, 17), torch.float64), meta((2, 3, 3, 4), torch.float64)
compiled("forward", x, k2, BLOCK_C=4, BLOCK_HW=256)
compiled("backward", x, k2, BLOCK_C=4, BLOCK_Q=8)
uniform = meta((2, 3, 16, 16), torch.float64), meta((2, 3, 4, 4), torch.float64)
compiled("backward", *uniform, BLOCK_C=4, BLOCK_Q=4)


def ttir_lines(ir, pattern):
    return [line.strip() for line in ir.splitlines() if re.search(pattern, line)]


def ttir(kernel, x, k2, **kwargs):
    return codegen.compile_kernel(kernel, x, k2, x, triton.Config(kwargs, num_warps=4)).asm["ttir"]


I32_ADDPTR = "tt[.]addptr .*: .*, (tensor<[0-9x]+xi32>|i32)( |$)"
I32_SCALAR_ADDPTR = "tt[.]addptr .*: !tt[.]ptr<[a-z0-9]+>, i32( |$)"
I32_TENSOR_MUL = "arith[.]muli .*: tensor<[0-9x]+xi32>"
# Without WIDE_INDEX a sample's offsets are int32, but the sample's own offset n * stride_n is
# int64: N samples may pass 2**31 elements when none does alone.
assert not ttir_lines(ttir("forward", x, k2, BLOCK_C=4, BLOCK_HW=256), I32_SCALAR_ADDPTR)
assert not ttir_lines(ttir("backward", x, k2, BLOCK_C=4, BLOCK_Q=8), I32_SCALAR_ADDPTR)
codegen.gate._INT32_LIMIT = 16  # the int64 index path compiles too
# With WIDE_INDEX no pointer arithmetic is left on an int32 offset (it wraps past 2**31), and no
# index product is int32 (c * stride_c would wrap before it is widened by the sum).
for kernel, inputs, tile in (("forward", (x, k2), {"BLOCK_C": 4, "BLOCK_HW": 256}),
                             ("backward", (x, k2), {"BLOCK_C": 4, "BLOCK_Q": 8}),
                             ("backward", uniform, {"BLOCK_C": 4, "BLOCK_Q": 4})):  # fmt: skip
    ir = ttir(kernel, *inputs, **tile)
    assert not ttir_lines(ir, I32_ADDPTR), (kernel, ir)
    assert not ttir_lines(ir, I32_TENSOR_MUL), (kernel, ir)


# The fused inference kernels (kernels/fused.py), as their launchers launch them.
for layout in (torch.contiguous_format, cl):
    a, b = meta((2, 32, 28, 28), layout=layout), meta((2, 64, 28, 28), layout=layout)
    for kernel, inputs in (("relu_cat", (a, b)), ("add_relu", (b, b))):
        info = codegen.summary(codegen.compile_fused(kernel, *inputs))
        assert "ld.global.v4.b32" in info["loads"], (kernel, layout, info)
        assert "st.global.v4.b32" in info["stores"], (kernel, layout, info)
# relu_split_pool on SCNet-50's layer1 conv1 output (two halves of 32 channels at 56x56):
# 16-byte accesses along channels (channels_last) and along rows of 56 = 8 * 7 (NCHW, ALIGN 8).
for layout in (torch.contiguous_format, cl):
    a = meta((2, 32, 56, 56), layout=layout)
    info = codegen.summary(codegen.compile_fused("relu_split_pool", a, a))
    assert "ld.global.v4.b32" in info["loads"], (layout, info)
    assert info["stores"].get("st.global.v4.b32", 0) >= 2, (layout, info)  # a and b
a = meta((2, 128, 14, 14))  # rows of 14 = 2 * 7: ALIGN 2, 4-byte bf16 pairs
info = codegen.summary(codegen.compile_fused("relu_split_pool", a, a))
assert set(info["loads"]) == {"ld.global.b32"}, info
a, b = meta((1, 3, 5, 7), torch.float64), meta((1, 2, 5, 7), torch.float64)
codegen.compile_fused("relu_cat", a, b)
codegen.compile_fused("add_relu", a, a)
codegen.compile_fused("relu_split_pool", a, b)
codegen.fused._INT32_LIMIT = 16  # the int64 index paths, checked as the gate's are
for kernel, inputs in (("relu_cat", (a, b)), ("add_relu", (a, a)), ("relu_split_pool", (a, b))):
    ir = codegen.compile_fused(kernel, *inputs).asm["ttir"]
    assert not ttir_lines(ir, I32_TENSOR_MUL), (kernel, ir)
    if kernel != "relu_cat":  # its offset within a row stays int32: rows are below _MAX_ROW
        assert not ttir_lines(ir, I32_ADDPTR), (kernel, ir)
print("ok")
"""


def test_kernels_compile_for_sm90_with_vector_loads():
    """The compiled (GPU) path, checked without a GPU: build PTX for sm_90 and read the loads
    (the gating kernels and the fused inference kernels)."""
    result = _run_python(_CODEGEN_CHECK, {"TRITON_INTERPRET": "0"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


# ------------------------------------------------------------------ CUDA only
SCNET50_SHAPES = [  # (C, H, W, h, w) of SCNet-50's gates at 224 px
    (32, 56, 56, 14, 14),
    (64, 28, 28, 7, 7),
    (128, 14, 14, 3, 3),
    (256, 7, 7, 1, 1),
]


def _cuda_inputs(N, C, H, W, h, w, dtype, layout):
    return [t.cuda() for t in make_inputs(N, C, H, W, h, w, dtype=dtype, layout=layout)]


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "slice"])
@pytest.mark.parametrize("shape", SCNET50_SHAPES)
def test_cuda_scnet_shapes_match_reference(shape, layout, dtype):
    check_against_reference(*_cuda_inputs(8, *shape, dtype, layout))


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_cuda_odd_shapes_match_reference(shape):
    check_against_reference(*[t.cuda() for t in make_inputs(*shape)])


@pytest.mark.cuda
@requires_cuda
def test_cuda_gradcheck_and_determinism():
    x, k2, k3, grad = _cuda_inputs(2, 3, 13, 17, 3, 4, torch.float64, "contiguous")
    assert torch.autograd.gradcheck(kernels.sc_gate, [t.requires_grad_() for t in (x, k2, k3)])
    x, k2, k3, grad = _cuda_inputs(8, 64, 28, 28, 7, 7, torch.bfloat16, "channels_last")
    first = gate.gate_backward(grad, x, k2, k3)
    second = gate.gate_backward(grad, x, k2, k3)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.cuda
@requires_cuda
def test_cuda_autotunes_over_several_configs(monkeypatch, tmp_path):
    monkeypatch.setattr(configs, "TUNED_TABLE_PATH", tmp_path / "none.json")
    assert len(gate._gate_forward_autotuned.configs) > 1
    x, k2, k3, grad = _cuda_inputs(4, 48, 20, 20, 5, 5, torch.float32, "contiguous")
    check_against_reference(x, k2, k3, grad)
    tuners = {"forward": gate._gate_forward_autotuned, "backward": gate._gate_backward_autotuned}
    for kernel, tuned in tuners.items():
        space = [configs.config_to_entry(c) for c in configs.search_space(kernel)]
        assert configs.config_to_entry(tuned.best_config) in space


@pytest.mark.cuda
@requires_cuda
def test_cuda_table_winner_skips_autotuning(monkeypatch, tmp_path):
    x, k2, k3, grad = _cuda_inputs(2, 24, 18, 18, 6, 6, torch.float32, "contiguous")
    winner = triton.Config({"BLOCK_C": 2, "BLOCK_HW": 256}, num_warps=2, num_stages=1)
    table = {
        torch.cuda.get_device_name(): {
            "forward": {configs.table_key(x, k2): configs.config_to_entry(winner)}
        }
    }
    path = tmp_path / "tuned.json"
    configs.save_table(table, path)
    monkeypatch.setattr(configs, "TUNED_TABLE_PATH", path)

    def fail(*args, **kwargs):
        raise AssertionError("autotuner ran for a shape in the table")

    monkeypatch.setattr(gate._gate_forward_autotuned, "run", fail)
    out = gate.gate_forward(x, k2, k3)
    torch.testing.assert_close(out, sc_gate_reference(x, k2, k3), atol=2e-6, rtol=2e-6)


@pytest.mark.cuda
@requires_cuda
def test_cuda_compile_fullgraph():
    x, k2, k3, grad = _cuda_inputs(4, 64, 28, 28, 7, 7, torch.bfloat16, "channels_last")
    inputs = [t.requires_grad_() for t in (x, k2, k3)]
    out = torch.compile(kernels.sc_gate, fullgraph=True)(*inputs)
    out.backward(grad)
    ref_out, ref_grads = reference_forward_backward(x, k2, k3, grad)
    assert_close(out.detach(), ref_out, torch.bfloat16, "out")
    for t, expected in zip(inputs, ref_grads, strict=True):
        assert_close(t.grad, expected, torch.bfloat16, "grad")
