"""Fused Triton kernels for the SC-Conv gating, forward and backward, with their launchers.

With x, k3 of shape (N, C, H, W), k2 of shape (N, C, h, w) (1 <= h <= H, 1 <= w <= W) and
``up`` PyTorch's nearest upsampling of k2 to (H, W):

    z = x + up(k2),    s = sigmoid(z) = 1 / (1 + exp(-z)),    out = k3 * s

For an upstream gradient g = dL/dout the vector-Jacobian product is

    dL/dk3 = g * s
    dL/dx  = g * k3 * s * (1 - s)
    dL/dk2[n, c, p, q] = sum of dL/dx[n, c, i, j] over the (i, j) whose source pixel is (p, q)

The forward kernel reads x, k2 and k3 once and writes out once. The backward kernel recomputes s
from x, k2, k3 (nothing of x's size is saved), writes dL/dx and dL/dk3, and sums dL/dk2 in
registers while it walks each k2 pixel's footprint: every element of x belongs to exactly one
footprint, so there are no atomics and the summation order is fixed (bit-identical results on
every run). Arithmetic is float32 (float64 for float64 inputs, for ``gradcheck``); results are
stored in the input dtype.

Nearest upsampling is PyTorch's: destination row i reads source row
``min(floor(i * scale), h - 1)`` with ``scale = float32(h) / H`` in float32 (integer arithmetic
``i * h // H`` differs, e.g. at H = 74, h = 24, row 37). The backward finds each footprint's first
row by an exact rational estimate plus one correction step in each direction, evaluated with the
same float32 formula, so both kernels share one mapping.

Every tensor is addressed through its own four strides, so contiguous NCHW, channels_last and
channel-slice views (``t[:, c0:c1]``) run without a copy; outputs take x's (or k2's, k3's)
memory format.
"""

import contextlib
import functools
import math

import numpy as np
import torch

from kernels import configs, runtime

runtime.configure_interpreter()  # before triton is imported here (no-op if already done)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT32_LIMIT = 2**31 - 1
# The backward walks footprints in column chunks of at most this many columns (a power of two):
# enough for pooling_r <= 8 in one chunk while keeping the [BLOCK_C, BLOCK_Q, chunk] tile small.
MAX_FOOTPRINT_CHUNK = 8
# The backward locates footprint boundaries exactly while H, W < 2**22 (see _first_destination).
MAX_BACKWARD_SIZE = 2**22 - 1


# --------------------------------------------------------------------------------------------
# Device helpers. Only Triton builtins are used (no tl.sigmoid / tl.sum / tl.cdiv / tl.zeros,
# which are @triton.jit functions built when triton is imported): see kernels/runtime.py.
# --------------------------------------------------------------------------------------------
@triton.jit
def _add(a, b):
    return a + b


# tl.sum's own combine function where it exists (triton 3.6-3.8): the interpreter recognises it
# and reduces with one np.sum instead of calling the combine function per element (~100x
# faster), and it never calls it, so it works even if triton was imported before the
# interpreter was switched on. _add is the fallback.
_SUM_COMBINE = getattr(tl.standard, "_sum_combine", _add)


@triton.jit
def _sigmoid(z):
    # exp(-z) overflows to inf for very negative z, giving exactly 0; NaN stays NaN.
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _nearest_source(dst, scale, src_size):
    """PyTorch's nearest source index: min(floor(dst * scale), src_size - 1), in float32."""
    # dst >= 0, so truncation toward zero is floor.
    return tl.minimum((dst.to(tl.float32) * scale).to(tl.int32), src_size - 1)


@triton.jit
def _first_destination(src, dst_size, src_size, scale):
    """Smallest destination index whose unclamped source floor(dst * scale) is >= src.

    Returns dst_size when there is none. ceil(src * dst_size / src_size) is exact in rational
    arithmetic; float32 rounding of the scale and product moves the true boundary by less than
    one index while dst_size < 2**22, so one correction step each way makes it exact.
    """
    wide_src = src.to(tl.int64)
    estimate = (wide_src * dst_size + src_size - 1) // src_size
    estimate = tl.minimum(estimate, dst_size).to(tl.int32)
    before = estimate - 1
    step_back = (estimate > 0) & ((before.to(tl.float32) * scale).to(tl.int32) >= src)
    step_on = (estimate < dst_size) & ((estimate.to(tl.float32) * scale).to(tl.int32) < src)
    return tl.where(step_back, before, tl.where(step_on, estimate + 1, estimate))


@triton.jit
def _plane_offset(hw, row, col, stride_h, stride_w, FLAT: tl.constexpr):
    """Offset of spatial position (row, col) = divmod(hw, W) in one tensor.

    FLAT means stride_h == W * stride_w, so the plane is one run of stride stride_w and the offset
    is hw * stride_w: Triton then sees consecutive hw as contiguous and vectorizes the access.
    """
    if FLAT:
        offset = hw * stride_w
    else:
        offset = row * stride_h + col * stride_w
    return offset


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------
@triton.jit
def _gate_forward_kernel(
    x_ptr,  # (N, C, H, W) input
    k2_ptr,  # (N, C, h, w) calibration map, upsampled on the fly
    k3_ptr,  # (N, C, H, W) gated branch
    out_ptr,  # (N, C, H, W) output, x's dtype
    N,  # batch size (only for the autotune key)
    C,  # channels
    H,  # x rows
    W,  # x columns
    HW,  # H * W / PLANE_ALIGN (see PLANE_ALIGN)
    h,  # k2 rows
    w,  # k2 columns
    scale_h,  # float32(h) / H, PyTorch's nearest scale
    scale_w,  # float32(w) / W
    stride_xn,  # x's sample and channel strides, like k3's and out's: divided by PLANE_ALIGN
    stride_xc,
    stride_xh,
    stride_xw,
    stride_k2n,
    stride_k2c,
    stride_k2h,
    stride_k2w,
    stride_k3n,
    stride_k3c,
    stride_k3h,
    stride_k3w,
    stride_on,
    stride_oc,
    stride_oh,
    stride_ow,
    X_FLAT: tl.constexpr,  # stride_xh == W * stride_xw (see _plane_offset)
    K3_FLAT: tl.constexpr,
    OUT_FLAT: tl.constexpr,
    PLANE_ALIGN: tl.constexpr,  # divides H*W and the n, c strides of x, k3, out (plane_align)
    WIDE_INDEX: tl.constexpr,  # some per-sample offset may pass 2**31: index in int64
    COMPUTE_DTYPE: tl.constexpr,  # tl.float32, or tl.float64 for float64 tensors
    BLOCK_C: tl.constexpr,  # channels per program
    BLOCK_HW: tl.constexpr,  # spatial positions (flattened H*W) per program
):
    # H*W and the sample and channel strides of x, k3 and out arrive divided by PLANE_ALIGN:
    # multiplied back by a constexpr, Triton knows them to be multiples of it, so planes whose
    # size is not a multiple of 16 (14x14 = 4 * 49) still get vector loads and stores.
    HW = HW * PLANE_ALIGN
    stride_xn = stride_xn * PLANE_ALIGN
    stride_xc = stride_xc * PLANE_ALIGN
    stride_k3n = stride_k3n * PLANE_ALIGN
    stride_k3c = stride_k3c * PLANE_ALIGN
    stride_on = stride_on * PLANE_ALIGN
    stride_oc = stride_oc * PLANE_ALIGN
    # One program: sample n, BLOCK_C channels x BLOCK_HW positions; hw blocks vary fastest.
    pid = tl.program_id(0)
    num_hw_blocks = (HW + BLOCK_HW - 1) // BLOCK_HW
    num_c_blocks = (C + BLOCK_C - 1) // BLOCK_C
    hw_block = pid % num_hw_blocks
    c_block = (pid // num_hw_blocks) % num_c_blocks
    n = (pid // num_hw_blocks // num_c_blocks).to(tl.int64)

    c = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
    hw = hw_block * BLOCK_HW + tl.arange(0, BLOCK_HW)
    mask = (c < C)[:, None] & (hw < HW)[None, :]
    if WIDE_INDEX:
        c = c.to(tl.int64)
        hw = hw.to(tl.int64)
    row = hw // W
    col = hw - row * W
    # Source pixel of each position; computed once per position, shared by BLOCK_C channels.
    src_row = _nearest_source(row, scale_h, h)
    src_col = _nearest_source(col, scale_w, w)
    if WIDE_INDEX:
        src_row = src_row.to(tl.int64)
        src_col = src_col.to(tl.int64)

    x_plane = _plane_offset(hw, row, col, stride_xh, stride_xw, X_FLAT)
    k3_plane = _plane_offset(hw, row, col, stride_k3h, stride_k3w, K3_FLAT)
    out_plane = _plane_offset(hw, row, col, stride_oh, stride_ow, OUT_FLAT)
    x_off = c[:, None] * stride_xc + x_plane[None, :]
    k3_off = c[:, None] * stride_k3c + k3_plane[None, :]
    k2_off = c[:, None] * stride_k2c + (src_row * stride_k2h + src_col * stride_k2w)[None, :]
    out_off = c[:, None] * stride_oc + out_plane[None, :]

    x = tl.load(x_ptr + n * stride_xn + x_off, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    k2 = tl.load(k2_ptr + n * stride_k2n + k2_off, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    k3 = tl.load(k3_ptr + n * stride_k3n + k3_off, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    out = k3 * _sigmoid(x + k2)
    tl.store(out_ptr + n * stride_on + out_off, out.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------
@triton.jit
def _gate_backward_kernel(
    grad_ptr,  # (N, C, H, W) dL/dout, any strides (also stride 0 from expand)
    x_ptr,  # (N, C, H, W)
    k2_ptr,  # (N, C, h, w)
    k3_ptr,  # (N, C, H, W)
    dx_ptr,  # (N, C, H, W) output dL/dx
    dk2_ptr,  # (N, C, h, w) output dL/dk2
    dk3_ptr,  # (N, C, H, W) output dL/dk3
    N,  # batch size (only for the autotune key)
    C,
    H,
    W,
    h,
    w,
    scale_h,  # float32(h) / H
    scale_w,  # float32(w) / W
    max_footprint_w,  # widest column footprint of a k2 pixel (columns of x)
    stride_gn,  # the n, c and h strides of g, x, k3, dx and dk3 arrive divided by ROW_ALIGN
    stride_gc,
    stride_gh,
    stride_gw,
    stride_xn,
    stride_xc,
    stride_xh,
    stride_xw,
    stride_k2n,
    stride_k2c,
    stride_k2h,
    stride_k2w,
    stride_k3n,
    stride_k3c,
    stride_k3h,
    stride_k3w,
    stride_dxn,
    stride_dxc,
    stride_dxh,
    stride_dxw,
    stride_dk2n,
    stride_dk2c,
    stride_dk2h,
    stride_dk2w,
    stride_dk3n,
    stride_dk3c,
    stride_dk3h,
    stride_dk3w,
    WIDE_INDEX: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    FOOTPRINT_CHUNK: tl.constexpr,  # columns per step inside a footprint (power of two)
    UNIFORM_W: tl.constexpr,  # every column footprint is this many columns (== chunk), else 0
    ROW_ALIGN: tl.constexpr,  # divides the n, c, h strides of g, x, k3, dx, dk3 (row_align)
    BLOCK_C: tl.constexpr,  # channels per program
    BLOCK_Q: tl.constexpr,  # k2 columns per program
):
    # Multiplied back by a constexpr, the strides are known multiples of ROW_ALIGN: with
    # UNIFORM_W, a footprint row of UNIFORM_W columns then starts on a multiple of it, and
    # Triton uses vector access along it (NCHW rows of 56 or 28 columns are not multiples of 16).
    stride_gn = stride_gn * ROW_ALIGN
    stride_gc = stride_gc * ROW_ALIGN
    stride_gh = stride_gh * ROW_ALIGN
    stride_xn = stride_xn * ROW_ALIGN
    stride_xc = stride_xc * ROW_ALIGN
    stride_xh = stride_xh * ROW_ALIGN
    stride_k3n = stride_k3n * ROW_ALIGN
    stride_k3c = stride_k3c * ROW_ALIGN
    stride_k3h = stride_k3h * ROW_ALIGN
    stride_dxn = stride_dxn * ROW_ALIGN
    stride_dxc = stride_dxc * ROW_ALIGN
    stride_dxh = stride_dxh * ROW_ALIGN
    stride_dk3n = stride_dk3n * ROW_ALIGN
    stride_dk3c = stride_dk3c * ROW_ALIGN
    stride_dk3h = stride_dk3h * ROW_ALIGN
    # One program: sample n, k2 row p, BLOCK_C channels x BLOCK_Q k2 columns. It walks the x rows
    # of p's footprint and, per row, a [BLOCK_C, BLOCK_Q, FOOTPRINT_CHUNK] tile of x columns
    # (column q's footprint starts at col_start[q]); dL/dk2 accumulates in registers.
    pid = tl.program_id(0)
    num_q_blocks = (w + BLOCK_Q - 1) // BLOCK_Q
    num_c_blocks = (C + BLOCK_C - 1) // BLOCK_C
    q_block = pid % num_q_blocks
    c_block = (pid // num_q_blocks) % num_c_blocks
    p = (pid // num_q_blocks // num_c_blocks) % h
    n = (pid // num_q_blocks // num_c_blocks // h).to(tl.int64)

    c = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
    q = q_block * BLOCK_Q + tl.arange(0, BLOCK_Q)
    c_mask = c < C
    q_mask = q < w

    row_start = _first_destination(p, H, h, scale_h)
    row_end = tl.where(p + 1 < h, _first_destination(p + 1, H, h, scale_h), H)
    col_start = _first_destination(q, W, w, scale_w)
    col_end = tl.where(q + 1 < w, _first_destination(q + 1, W, w, scale_w), W)
    col_width = tl.where(q_mask, col_end - col_start, 0)
    step = tl.arange(0, FOOTPRINT_CHUNK)
    k2_row = p
    k2_col = q
    if WIDE_INDEX:
        c = c.to(tl.int64)
        col_start = col_start.to(tl.int64)
        k2_row = p.to(tl.int64)
        k2_col = q.to(tl.int64)

    k2_off = c[:, None] * stride_k2c + k2_row * stride_k2h + k2_col[None, :] * stride_k2w
    k2_mask = c_mask[:, None] & q_mask[None, :]
    k2 = tl.load(k2_ptr + n * stride_k2n + k2_off, mask=k2_mask, other=0.0).to(COMPUTE_DTYPE)
    k2 = k2[:, :, None]

    # Per-(sample, channel) bases, hoisted out of the footprint loops.
    c3 = c[:, None, None]
    g_base = grad_ptr + n * stride_gn + c3 * stride_gc
    x_base = x_ptr + n * stride_xn + c3 * stride_xc
    k3_base = k3_ptr + n * stride_k3n + c3 * stride_k3c
    dx_base = dx_ptr + n * stride_dxn + c3 * stride_dxc
    dk3_base = dk3_ptr + n * stride_dk3n + c3 * stride_dk3c
    dk2 = tl.full([BLOCK_C, BLOCK_Q], 0.0, COMPUTE_DTYPE)
    for chunk in range(0, max_footprint_w, FOOTPRINT_CHUNK):
        # Column part of every address, fixed while the rows of the footprint are walked.
        if UNIFORM_W:
            # One chunk (chunk == 0) covers each footprint, columns q * UNIFORM_W + step: the
            # same addresses, written so that Triton sees runs of UNIFORM_W starting on a
            # multiple of UNIFORM_W, and a mask constant along each run.
            col = (k2_col[:, None] * UNIFORM_W + step[None, :])[None, :, :]  # int64 if WIDE
            mask = c_mask[:, None, None] & (q_mask[:, None] & (step < UNIFORM_W)[None, :])[None]
        else:
            col = (col_start[:, None] + chunk + step[None, :])[None, :, :]
            mask = c_mask[:, None, None] & ((chunk + step)[None, :] < col_width[:, None])[None]
        g_cols = g_base + col * stride_gw
        x_cols = x_base + col * stride_xw
        k3_cols = k3_base + col * stride_k3w
        dx_cols = dx_base + col * stride_dxw
        dk3_cols = dk3_base + col * stride_dk3w
        for row_index in range(row_start, row_end):
            row = row_index
            if WIDE_INDEX:
                row = tl.cast(row_index, tl.int64)  # (a Python int under the interpreter)
            # Masked lanes load zeros, so their dx is exactly 0 and adds nothing to dk2.
            g = tl.load(g_cols + row * stride_gh, mask=mask, other=0.0).to(COMPUTE_DTYPE)
            x = tl.load(x_cols + row * stride_xh, mask=mask, other=0.0).to(COMPUTE_DTYPE)
            k3 = tl.load(k3_cols + row * stride_k3h, mask=mask, other=0.0).to(COMPUTE_DTYPE)
            s = _sigmoid(x + k2)
            dk3 = g * s
            dx = g * k3 * s * (1.0 - s)
            tl.store(dk3_cols + row * stride_dk3h, dk3.to(dk3_ptr.dtype.element_ty), mask=mask)
            tl.store(dx_cols + row * stride_dxh, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            dk2 += tl.reduce(dx, 2, _SUM_COMBINE)
    dk2_off = c[:, None] * stride_dk2c + k2_row * stride_dk2h + k2_col[None, :] * stride_dk2w
    tl.store(dk2_ptr + n * stride_dk2n + dk2_off, dk2.to(dk2_ptr.dtype.element_ty), mask=k2_mask)


INTERPRETED = isinstance(_gate_forward_kernel, InterpretedFunction)


def _autotune_timer(kernel_call, quantiles):
    # Triton's default spends 25 ms warming up and 100 ms timing each config. A gate call at
    # SCNet-50's batch-256 shapes moves about 0.15 GB in bf16, about 0.05 ms at an H100's copy
    # bandwidth (an estimate: not yet measured), so 5 + 20 ms still times hundreds of calls and
    # the timing part of autotuning a new shape takes a fifth as long (compiling each config,
    # once per machine thanks to Triton's disk cache, is not changed).
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


_AUTOTUNE = {
    # The alignments too: stride_xc arrives divided by them, so alone it can be equal for an
    # NCHW and a channels-contiguous tensor (triton keeps the names that the kernel takes).
    "key": ["N", "C", "H", "W", "h", "w", "stride_xc", "stride_xw", "PLANE_ALIGN", "ROW_ALIGN"],
    "do_bench": _autotune_timer,
    # Winners are kept in Triton's cache folder, so a new process (each benchmark stage, each
    # training run) does not autotune the same shape again.
    "cache_results": True,
}

_gate_forward_autotuned = triton.autotune(
    configs=configs.autotune_configs("forward", INTERPRETED),
    prune_configs_by={"early_config_prune": configs.prune_for_layout("forward")},
    **_AUTOTUNE,
)(_gate_forward_kernel)

_gate_backward_autotuned = triton.autotune(
    configs=configs.autotune_configs("backward", INTERPRETED),
    prune_configs_by={"early_config_prune": configs.prune_for_layout("backward")},
    **_AUTOTUNE,
)(_gate_backward_kernel)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------
def check_inputs(x: torch.Tensor, k2: torch.Tensor, k3: torch.Tensor) -> None:
    """Raise ``TypeError``/``ValueError`` naming the problem if (x, k2, k3) cannot be gated.

    Works on fake tensors too (shapes, dtypes and devices only), so the custom op's fake
    implementation raises the same errors under ``torch.compile``.
    """
    for name, t in (("x", x), ("k2", k2), ("k3", k3)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"sc_gate: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("x", x), ("k2", k2), ("k3", k3)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"sc_gate: {name} has dtype {t.dtype}; supported dtypes are "
                f"{', '.join(str(d) for d in SUPPORTED_DTYPES)}"
            )
    if not x.dtype == k2.dtype == k3.dtype:
        raise TypeError(
            f"sc_gate: x, k2, k3 must share one dtype, got {x.dtype}, {k2.dtype}, {k3.dtype}"
        )
    if not x.device == k2.device == k3.device:
        raise ValueError(
            f"sc_gate: x, k2, k3 must be on one device, got {x.device}, {k2.device}, {k3.device}"
        )
    if x.dim() != 4 or k2.dim() != 4 or k3.dim() != 4:
        problem = "x, k2, k3 must be 4-D (N, C, H, W) tensors"
    elif k3.shape != x.shape:
        problem = "k3 must have x's shape"
    elif k2.shape[:2] != x.shape[:2]:
        problem = "k2 must have x's batch size and channels (N, C)"
    elif not (1 <= k2.shape[2] <= x.shape[2] and 1 <= k2.shape[3] <= x.shape[3]):
        problem = "k2's spatial size must satisfy 1 <= h <= H and 1 <= w <= W"
    else:
        return
    # The message is formatted only here: this check runs on every launch.
    shapes = f"x {tuple(x.shape)}, k2 {tuple(k2.shape)}, k3 {tuple(k3.shape)}"
    raise ValueError(f"sc_gate: {problem}, got {shapes}")


@triton.jit
def _loop_bound_probe(out_ptr, n):
    # The kernels loop over ranges bounded by kernel arguments and values derived from
    # tl.program_id; this is the smallest kernel that does the same.
    count = tl.full([1], 0, tl.int32)
    for _ in range(0, n):
        count += 1
    tl.store(out_ptr + tl.arange(0, 1), count)


@functools.cache
def _check_interpreter_loops() -> None:
    """Raise ``RuntimeError`` if Triton's interpreter cannot run a loop bounded by a kernel value.

    Triton 3.6's interpreter turns such a bound into a Python int with ``int(array)`` on a
    one-element NumPy array, which NumPy 2.4 made an error ("only 0-dimensional arrays can be
    converted to Python scalars"): every launch would fail deep inside the interpreter. Seen with
    Triton 3.6 + NumPy 2.4 (NumPy 2.3 works, with deprecation warnings); Triton 3.8 works with both.
    """
    out = torch.zeros(1, dtype=torch.int32)
    try:
        _loop_bound_probe[(1,)](out, 3)
    except Exception as error:  # the interpreter wraps the cause in its own InterpreterError
        raise RuntimeError(
            f"Triton {triton.__version__}'s interpreter cannot run the SC-Conv kernels with "
            f"NumPy {np.__version__}: it failed on a loop bounded by a kernel argument ({error}). "
            "Triton 3.6's interpreter needs numpy<2.4 ('pip install \"numpy<2.4\"'); Triton 3.8 "
            "works with either. Or use gate='eager' for CPU tensors."
        ) from error
    if int(out) != 3:
        raise RuntimeError(f"Triton's interpreter ran a 3-step loop {int(out)} times")


def _check_launchable(x: torch.Tensor) -> None:
    runtime.require_launchable(INTERPRETED, x.device, "sc_gate", "use gate='eager' for CPU tensors")
    if INTERPRETED:
        _check_interpreter_loops()


def empty_like_layout(t: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor like ``t`` in its memory format (dense strides for views)."""
    return torch.empty_like(t, memory_format=torch.preserve_format)


def nearest_scale(src_size: int, dst_size: int) -> float:
    """PyTorch's nearest-upsampling scale ``float32(src_size) / dst_size``, rounded to float32."""
    return float(np.float32(src_size) / np.float32(dst_size))


def _nearest_sources(dst_size: int, src_size: int) -> np.ndarray:
    """The source index of every destination index under PyTorch's float32 nearest mapping."""
    dst = np.arange(dst_size, dtype=np.float32) * np.float32(nearest_scale(src_size, dst_size))
    return np.minimum(dst.astype(np.int64), src_size - 1)


@functools.lru_cache(maxsize=1024)
def max_footprint(dst_size: int, src_size: int) -> int:
    """The most destination indices that share one source index under nearest upsampling."""
    return int(np.bincount(_nearest_sources(dst_size, src_size), minlength=src_size).max())


def _flat_plane(t: torch.Tensor) -> bool:
    return t.shape[2] == 1 or t.stride(2) == t.shape[3] * t.stride(3)


# Triton passes an int argument of at most this as int32. A literal, not _INT32_LIMIT (which tests
# lower to reach the int64 index paths on small tensors).
_INT32_ARGUMENT_MAX = 2**31 - 1


def _index_strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    """``t``'s strides with those of a size-1 sample, channel or row dimension as 0: its index
    is always 0, so the stride is never used, and 0 neither lowers an alignment nor needs int64.
    (The column stride is kept: a flat plane's offset is ``hw * stride_w``.)"""
    sn, sc, sh, sw = t.stride()
    n, c, h, _ = t.shape
    return (0 if n == 1 else sn, 0 if c == 1 else sc, 0 if h == 1 else sh, sw)


def _aligned_strides(t: torch.Tensor, align: int, divided: int) -> tuple[int, int, int, int]:
    """``_index_strides(t)`` with the first ``divided`` (sample, channel[, row]) divided by
    ``align``, as a kernel that multiplies them back by its alignment constexpr takes them."""
    strides = _index_strides(t)
    return tuple(s // align if i < divided else s for i, s in enumerate(strides))


def _power_of_two_divisor(values) -> int:
    """The largest power of two up to 16 dividing every value; 1 if a value needs int64: divided,
    it would reach the kernel as int32, and multiplying it back would wrap."""
    if any(v > _INT32_ARGUMENT_MAX for v in values):
        return 1
    return math.gcd(16, *values)


def plane_align(*tensors: torch.Tensor) -> int:
    """The largest power of two up to 16 dividing H*W and every sample and channel stride of
    ``tensors`` (each with a flat, stride-1 plane), else 1: the forward kernel's PLANE_ALIGN.

    The contiguous run of a flat plane then starts on a multiple of it, which is what a vector
    access of that many elements needs (with an aligned base pointer, which Triton checks)."""
    if not all(_flat_plane(t) and t.stride(3) == 1 for t in tensors):
        return 1  # no contiguous run along H*W: nothing to vectorize
    height, width = tensors[0].shape[-2:]
    strides = (s for t in tensors for s in _index_strides(t)[:2])
    return _power_of_two_divisor([height * width, *strides])


def row_align(*tensors: torch.Tensor) -> int:
    """The largest power of two up to 16 dividing the sample, channel and row strides of
    ``tensors`` (each with column stride 1), else 1: the backward kernel's ROW_ALIGN."""
    if not all(t.stride(3) == 1 for t in tensors):
        return 1  # columns are not contiguous: nothing to vectorize along a row
    return _power_of_two_divisor([s for t in tensors for s in _index_strides(t)[:3]])


@functools.lru_cache(maxsize=1024)
def uniform_footprint(dst_size: int, src_size: int) -> int:
    """F when nearest upsampling maps destination i to source i // F for every i (each source
    index owns F consecutive destinations, F a power of two up to MAX_FOOTPRINT_CHUNK), else 0:
    the backward kernel's UNIFORM_W."""
    if dst_size % src_size:
        return 0
    footprint = dst_size // src_size
    if footprint > MAX_FOOTPRINT_CHUNK or footprint & (footprint - 1):
        return 0
    uniform = np.array_equal(_nearest_sources(dst_size, src_size), np.arange(dst_size) // footprint)
    return footprint if uniform else 0


def _needs_wide_index(*tensors: torch.Tensor) -> bool:
    # Per-sample offsets are int32 unless the farthest element of a sample could pass 2**31.
    for t in tensors:
        dims = zip(t.shape[1:], t.stride()[1:], strict=True)
        span = sum((size - 1) * abs(stride) for size, stride in dims)
        if span + 1 > _INT32_LIMIT or t.shape[2] * t.shape[3] > _INT32_LIMIT:
            return True
    return False


def _compute_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@functools.lru_cache(maxsize=16)
def _gpu_name(device_index: int) -> str:
    return torch.cuda.get_device_name(device_index)


def _stored_config(kernel: str, device: torch.device, table_key: str):
    """The table's winner for this call, or None (always None under the interpreter)."""
    if INTERPRETED or device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return configs.lookup(kernel, _gpu_name(index), table_key)


def _launch(kernel, autotuned, kernel_name, args, plan, config, device):
    """Launch ``config``, else the table's winner, else the autotuner, with a plan's
    constexprs and grid."""
    _, constexprs, grid, table_key = plan
    if config is None:
        config = _stored_config(kernel_name, device, table_key)
    with contextlib.ExitStack() as stack:
        if device.type == "cuda":
            stack.enter_context(torch.cuda.device(device))
        if INTERPRETED:
            # The interpreter evaluates in numpy, which warns where exp overflows to inf or
            # inf * 0 gives NaN; both are the intended IEEE results (eager PyTorch is silent).
            stack.enter_context(np.errstate(over="ignore", invalid="ignore"))
        if config is None:
            autotuned[grid](*args, **constexprs)
        else:
            launch = {"num_warps": config.num_warps, "num_stages": config.num_stages}
            kernel[grid](*args, **constexprs, **config.kwargs, **launch)


_FORWARD_PLANS = runtime.LaunchPlans()
_BACKWARD_PLANS = runtime.LaunchPlans()


def forward_launch_arguments(x, k2, k3, out):
    """(positional arguments, constexpr keywords, grid function) of ``_gate_forward_kernel``.

    Shared by the launcher and ``kernels/codegen.py``, so inspected code is launched code. The
    part derived from metadata is cached (see ``runtime.LaunchPlans``).
    """
    scalars, constexprs, grid, _ = _cached_forward_plan(x, k2, k3, out)
    return (x, k2, k3, out, *scalars), dict(constexprs), grid


def _cached_forward_plan(x, k2, k3, out):
    key = (x.dtype, _INT32_LIMIT, runtime.layout_key(x, k2, k3, out))
    return _FORWARD_PLANS.get(key, _forward_plan, x, k2, k3, out)


def _forward_plan(x, k2, k3, out):
    """(scalar arguments, constexprs, grid, table key) of a forward launch on these tensors."""
    N, C, H, W = x.shape
    h, w = k2.shape[-2:]
    align = plane_align(x, k3, out)

    def aligned(t):  # sample and channel strides divided by the kernel's PLANE_ALIGN
        return _aligned_strides(t, align, divided=2)

    scalars = (
        N, C, H, W, H * W // align, h, w,
        nearest_scale(h, H), nearest_scale(w, W),
        *aligned(x), *k2.stride(), *aligned(k3), *aligned(out),
    )  # fmt: skip
    constexprs = dict(
        X_FLAT=_flat_plane(x),
        K3_FLAT=_flat_plane(k3),
        OUT_FLAT=_flat_plane(out),
        PLANE_ALIGN=align,
        WIDE_INDEX=_needs_wide_index(x, k2, k3, out),
        COMPUTE_DTYPE=_compute_dtype(x.dtype),
    )

    def grid(meta):
        return (N * triton.cdiv(C, meta["BLOCK_C"]) * triton.cdiv(H * W, meta["BLOCK_HW"]),)

    return scalars, constexprs, grid, configs.table_key(x, k2)


def backward_launch_arguments(grad_out, x, k2, k3, grad_x, grad_k2, grad_k3):
    """(positional arguments, constexpr keywords, grid function) of ``_gate_backward_kernel``."""
    tensors = (grad_out, x, k2, k3, grad_x, grad_k2, grad_k3)
    scalars, constexprs, grid, _ = _cached_backward_plan(*tensors)
    return (*tensors, *scalars), dict(constexprs), grid


def _cached_backward_plan(*tensors):
    key = (tensors[1].dtype, _INT32_LIMIT, runtime.layout_key(*tensors))
    return _BACKWARD_PLANS.get(key, _backward_plan, *tensors)


def _backward_plan(grad_out, x, k2, k3, grad_x, grad_k2, grad_k3):
    """(scalar arguments, constexprs, grid, table key) of a backward launch on these tensors."""
    N, C, H, W = x.shape
    h, w = k2.shape[-2:]
    footprint_w = max_footprint(W, w)
    align = row_align(grad_out, x, k3, grad_x, grad_k3)

    def aligned(t):  # sample, channel and row strides divided by the kernel's ROW_ALIGN
        return _aligned_strides(t, align, divided=3)

    scalars = (
        N, C, H, W, h, w,
        nearest_scale(h, H), nearest_scale(w, W), footprint_w,
        *aligned(grad_out), *aligned(x), *k2.stride(), *aligned(k3),
        *aligned(grad_x), *grad_k2.stride(), *aligned(grad_k3),
    )  # fmt: skip
    constexprs = dict(
        WIDE_INDEX=_needs_wide_index(grad_out, x, k2, k3, grad_x, grad_k2, grad_k3),
        COMPUTE_DTYPE=_compute_dtype(x.dtype),
        FOOTPRINT_CHUNK=min(triton.next_power_of_2(footprint_w), MAX_FOOTPRINT_CHUNK),
        UNIFORM_W=uniform_footprint(W, w),
        ROW_ALIGN=align,
    )

    def grid(meta):
        return (N * h * triton.cdiv(C, meta["BLOCK_C"]) * triton.cdiv(w, meta["BLOCK_Q"]),)

    return scalars, constexprs, grid, configs.table_key(x, k2)


def gate_forward(
    x: torch.Tensor, k2: torch.Tensor, k3: torch.Tensor, config: triton.Config | None = None
) -> torch.Tensor:
    """``k3 * sigmoid(x + upsample_nearest(k2, size=x.shape[-2:]))`` in one fused kernel.

    Args:
        x: (N, C, H, W) float16, bfloat16, float32 or float64; any strides (NCHW, channels_last,
            channel-slice views), never copied.
        k2: (N, C, h, w) with 1 <= h <= H, 1 <= w <= W; same dtype and device; any strides.
        k3: (N, C, H, W); same dtype and device; any strides.
        config: a ``triton.Config`` with ``BLOCK_C`` and ``BLOCK_HW`` to launch directly (the
            sweep times each); ``None`` uses the stored table, else autotuning.

    Returns:
        out: (N, C, H, W) in x's dtype and memory format. float16/bfloat16/float32 are computed
        in float32, float64 in float64. A zero-size batch returns an empty tensor. No autograd:
        use ``kernels.sc_gate`` for that.
    """
    check_inputs(x, k2, k3)
    out = empty_like_layout(x)
    if out.numel() == 0:
        return out
    _check_launchable(x)
    plan = _cached_forward_plan(x, k2, k3, out)
    args = (x, k2, k3, out, *plan[0])
    _launch(_gate_forward_kernel, _gate_forward_autotuned, "forward", args, plan, config, x.device)
    return out


def gate_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    k2: torch.Tensor,
    k3: torch.Tensor,
    config: triton.Config | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`gate_forward` with respect to x, k2 and k3, in one fused kernel.

    Args:
        grad_out: (N, C, H, W), dL/dout; x's dtype and device; any strides (also expanded).
        x, k2, k3: the forward's inputs (see :func:`gate_forward`), with H, W < 2**22; the
            sigmoid is recomputed.
        config: a ``triton.Config`` with ``BLOCK_C`` and ``BLOCK_Q`` to launch directly;
            ``None`` uses the stored table, else autotuning.

    Returns:
        (grad_x, grad_k2, grad_k3), each in the dtype and memory format of x, k2, k3. grad_k2 sums
        grad_x over each k2 pixel's footprint in float32 (float64 for float64) in a fixed order:
        deterministic, no atomics.
    """
    check_inputs(x, k2, k3)
    if not isinstance(grad_out, torch.Tensor):
        raise TypeError(f"sc_gate backward: grad_out must be a tensor, got {type(grad_out)}")
    if grad_out.shape != x.shape or grad_out.dtype != x.dtype or grad_out.device != x.device:
        raise ValueError(
            f"sc_gate backward: grad_out must match x, got {tuple(grad_out.shape)} "
            f"{grad_out.dtype} on {grad_out.device} for x {tuple(x.shape)} {x.dtype} on {x.device}"
        )
    if max(x.shape[-2:]) > MAX_BACKWARD_SIZE:
        raise ValueError(
            f"sc_gate backward: H and W must be at most {MAX_BACKWARD_SIZE}, got x {tuple(x.shape)}"
        )
    grad_x, grad_k2, grad_k3 = empty_like_layout(x), empty_like_layout(k2), empty_like_layout(k3)
    if grad_x.numel() == 0:
        return grad_x, grad_k2, grad_k3
    _check_launchable(x)
    tensors = (grad_out, x, k2, k3, grad_x, grad_k2, grad_k3)
    plan = _cached_backward_plan(*tensors)
    _launch(
        _gate_backward_kernel, _gate_backward_autotuned, "backward", (*tensors, *plan[0]), plan,
        config, x.device,
    )  # fmt: skip
    return grad_x, grad_k2, grad_k3
