"""Element-wise fusions for the inference fast path (``scconv.optimize_for_inference``).

Three small memory-bound kernels that replace several ATen launches of an SCNet/ResNet bottleneck:

    relu_cat(a, b)     = relu(cat([a, b], dim=1))   reads a and b once, writes the result once
                         (eager: two ReLUs, then ``torch.cat`` reads and writes everything again)
    add_relu_(x, r)    : x <- relu(x + r)           in place, one pass (eager: ``add_`` + ``relu_``)
    relu_split_pool(m, ca, r) = (relu(m[:, :ca]), b, avg_pool2d(b, r, r)), b = relu(m[:, ca:])
                         reads m once and writes the two halves dense and b's r x r average pool
                         (eager: two ReLUs, then ``avg_pool2d`` reads b again)

All are ``torch.library`` custom ops in the ``scconv`` namespace (``torch.ops.scconv.relu_cat``,
``torch.ops.scconv.add_relu_``, ``torch.ops.scconv.relu_split_pool``) with fake implementations,
so ``torch.compile`` traces them. On CUDA tensors they launch the Triton kernels below; on other
devices (the CPU) they run a composite of ATen ops with the same results (``clamp_min`` into the
two halves of one buffer; ``add_`` then ``relu_``; two ``clamp_min`` and ``avg_pool2d``). The
launchers :func:`relu_cat_triton`, :func:`add_relu_triton_` and :func:`relu_split_pool_triton`
run the Triton kernels on any device Triton can use, which on a machine without a GPU means the
interpreter (slow: keep tensors small).

The kernels address memory as flat arrays, so they need dense inputs: both contiguous (NCHW) or
both channels_last. A dense 4-D tensor in either format is, per "outer" index, a run of channels
times "inner" elements:

    NCHW:           outer = N,          a row of a holds Ca * H * W elements
    channels_last:  outer = N * H * W,  a row of a holds Ca elements

and the output row is a's row followed by b's row. Other strides (and an ``add_relu_`` residual
of another dtype, as under autocast) take the composite path. (relu_split_pool, below, is
addressed by strides instead.)
Results are bit-identical to eager PyTorch: ReLU is exact, and x + r is computed in float32
(float64 for float64) and rounded once, as ATen's ``add`` does for half types. The one exception
is relu_split_pool's pool: it sums each window in float32 (float64) too, but column sums first,
so a float32 mean can differ from ``avg_pool2d``'s (row by row) in its last bit.

relu_split_pool addresses its tensors by strides (any 4-D layout; the custom op sends every
CUDA input to it when r is a power of two): each program takes one group of r rows of one image, a
block of channels and a block of columns (a multiple of r), ReLUs and stores each row into its
half, and sums the rows of the b channels for the pool. Row groups and columns past the last
whole window (H or W not a multiple of r, as at SCNet's 14x14 and 7x7 stages) are copied but not
pooled, as ``avg_pool2d`` (floor mode) drops them.
"""

import contextlib

import torch

from kernels import gate, runtime

runtime.configure_interpreter()  # before triton is imported here (no-op if already done)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT32_LIMIT = 2**31 - 1
# Elements per program. 1024 = 128 threads x 8 elements: one 16-byte vector per thread in bf16,
# two in float32. Not tuned on a GPU (none was available when this was written); under the
# interpreter larger blocks mean fewer (slow) program instances.
BLOCK_ELEMENTS = 1024
NUM_WARPS = 4
# relu_cat's row length is int32 in the kernel, and so is row + BLOCK_R - 1 (its block count).
_MAX_ROW = _INT32_LIMIT - BLOCK_ELEMENTS


# --------------------------------------------------------------------------------------------
# Kernels. Only Triton builtins (no @triton.jit helpers such as tl.cdiv): see kernels/runtime.py.
# --------------------------------------------------------------------------------------------
@triton.jit
def _relu_cat_kernel(
    a_ptr,  # (outer, row_a) dense
    b_ptr,  # (outer, row_b) dense
    out_ptr,  # (outer, row_a + row_b) dense
    outer,  # number of rows: N for NCHW, N * H * W for channels_last
    row_a,  # elements of a per row: Ca * H * W (NCHW) or Ca (channels_last)
    row_b,  # the same for b
    BLOCK_O: tl.constexpr,  # rows per program
    BLOCK_R: tl.constexpr,  # elements of a row per program
    WIDE_INDEX: tl.constexpr,  # int64 offsets (tensors of 2**31 elements or more)
):
    row = row_a + row_b
    blocks_per_row = (row + BLOCK_R - 1) // BLOCK_R
    # One flat grid (axis 0 takes 2**31 programs; axes 1 and 2 only 65535).
    pid = tl.program_id(0)
    pid_o = pid // blocks_per_row
    pid_r = pid - pid_o * blocks_per_row
    o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    if WIDE_INDEX:
        o = o.to(tl.int64)
    o = o[:, None]
    r = r[None, :]
    inside = (o < outer) & (r < row)
    from_a = r < row_a
    va = tl.load(a_ptr + o * row_a + r, mask=inside & from_a, other=0.0)
    vb = tl.load(b_ptr + o * row_b + (r - row_a), mask=inside & (r >= row_a), other=0.0)
    v = tl.where(from_a, va, vb)
    # `v < 0` keeps NaN as NaN, like torch.relu.
    v = tl.where(v < 0, 0.0, v)
    tl.store(out_ptr + o * row + r, v.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _add_relu_kernel(
    x_ptr,  # dense, read and overwritten with relu(x + r)
    r_ptr,  # dense, same strides as x
    numel,
    BLOCK: tl.constexpr,
    WIDE_INDEX: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,  # float32, or float64 for float64 tensors
):
    pid = tl.program_id(0)
    if WIDE_INDEX:
        start = pid.to(tl.int64) * BLOCK
    else:
        start = pid * BLOCK
    offs = start + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    v = x + r
    v = tl.where(v < 0, 0.0, v)
    tl.store(x_ptr + offs, v.to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _relu_split_pool_kernel(
    m_ptr,  # (N, C, H, W): the merged projection
    a_ptr,  # (N, CA, H, W) <- relu(m[:, :CA])
    b_ptr,  # (N, C - CA, H, W) <- relu(m[:, CA:])
    pool_ptr,  # (N, C - CA, HP, WP) <- avg_pool2d(b, R, R)
    C,
    CA,
    H,
    W,  # divided by ALIGN (as are the sample, channel and row strides of m, a and b)
    HP,  # H // R
    WP,  # W // R
    stride_mn,
    stride_mc,
    stride_mh,
    stride_mw,
    stride_an,
    stride_ac,
    stride_ah,
    stride_aw,
    stride_bn,
    stride_bc,
    stride_bh,
    stride_bw,
    stride_pn,
    stride_pc,
    stride_ph,
    stride_pw,
    R: tl.constexpr,  # pooling window and stride, a power of two
    BLOCK_C: tl.constexpr,
    BLOCK_W: tl.constexpr,  # a multiple of R
    WIDE_INDEX: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    ALIGN: tl.constexpr,  # a power of two dividing W and those strides (NCHW rows), else 1
):
    # Multiplied back here, so Triton knows each row starts ALIGN-aligned and the row mask is
    # constant over ALIGN columns: vector accesses in NCHW (as the gating's PLANE_ALIGN does).
    W = W * ALIGN
    stride_mn = stride_mn * ALIGN
    stride_mc = stride_mc * ALIGN
    stride_mh = stride_mh * ALIGN
    stride_an = stride_an * ALIGN
    stride_ac = stride_ac * ALIGN
    stride_ah = stride_ah * ALIGN
    stride_bn = stride_bn * ALIGN
    stride_bc = stride_bc * ALIGN
    stride_bh = stride_bh * ALIGN
    # One flat grid: (image, group of R rows, channel block, column block), columns fastest.
    pid = tl.program_id(0)
    blocks_w = (W + BLOCK_W - 1) // BLOCK_W
    blocks_c = (C + BLOCK_C - 1) // BLOCK_C
    groups_h = (H + R - 1) // R
    pid_w = pid % blocks_w
    rest = pid // blocks_w
    pid_c = rest % blocks_c
    rest = rest // blocks_c
    group = rest % groups_h
    n = rest // groups_h
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    w = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    pw = pid_w * (BLOCK_W // R) + tl.arange(0, BLOCK_W // R)
    if WIDE_INDEX:
        n = n.to(tl.int64)
        group = group.to(tl.int64)
        c = c.to(tl.int64)
        w = w.to(tl.int64)
        pw = pw.to(tl.int64)
    c = c[:, None]
    w = w[None, :]
    cb = c - CA  # b's channel (negative for a's channels, whose b lanes are masked)
    in_a = c < CA
    in_b = (c >= CA) & (c < C)
    m_row = m_ptr + n * stride_mn + c * stride_mc + w * stride_mw
    a_row = a_ptr + n * stride_an + c * stride_ac + w * stride_aw
    b_row = b_ptr + n * stride_bn + cb * stride_bc + w * stride_bw
    window = tl.zeros([BLOCK_C, BLOCK_W], dtype=COMPUTE_DTYPE)
    for i in tl.static_range(R):
        h = group * R + i
        inside = (c < C) & (w < W) & (h < H)
        v = tl.load(m_row + h * stride_mh, mask=inside, other=0.0)
        # `v < 0` keeps NaN as NaN, like torch.relu.
        v = tl.where(v < 0, 0.0, v)
        tl.store(a_row + h * stride_ah, v.to(a_ptr.dtype.element_ty), mask=inside & in_a)
        tl.store(b_row + h * stride_bh, v.to(b_ptr.dtype.element_ty), mask=inside & in_b)
        window += v.to(COMPUTE_DTYPE)
    # Column j of the tile is column j % R of window j // R.
    pooled = tl.sum(tl.reshape(window, [BLOCK_C, BLOCK_W // R, R]), axis=2) / (R * R)
    pw = pw[None, :]
    pool_mask = in_b & (pw < WP) & (group < HP)
    pool_at = pool_ptr + n * stride_pn + cb * stride_pc + group * stride_ph + pw * stride_pw
    tl.store(pool_at, pooled.to(pool_ptr.dtype.element_ty), mask=pool_mask)


INTERPRETED = isinstance(_add_relu_kernel, InterpretedFunction)


# --------------------------------------------------------------------------------------------
# Layout helpers (metadata only: they run on fake tensors too)
# --------------------------------------------------------------------------------------------
def dense_layout(*tensors: torch.Tensor) -> torch.memory_format | None:
    """The memory format in which all ``tensors`` (4-D) are dense, or None if there is none."""
    if all(t.is_contiguous() for t in tensors):
        return torch.contiguous_format
    if all(t.is_contiguous(memory_format=torch.channels_last) for t in tensors):
        return torch.channels_last
    return None


def relu_cat_memory_format(a: torch.Tensor, b: torch.Tensor) -> torch.memory_format:
    """Memory format of ``relu_cat(a, b)``: the inputs' common dense format, else a's."""
    common = dense_layout(a, b)
    if common is not None:
        return common
    if a.is_contiguous(memory_format=torch.channels_last) and not a.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _check_dtype_device(
    op: str, first: str, x: torch.Tensor, second: str, y: torch.Tensor, same_dtype: bool = True
):
    for name, t in ((first, x), (second, y)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"{op}: {name} has dtype {t.dtype}; supported dtypes are "
                f"{', '.join(str(d) for d in SUPPORTED_DTYPES)}"
            )
    if same_dtype and x.dtype != y.dtype:
        raise TypeError(
            f"{op}: {first} and {second} must share one dtype, got {x.dtype}, {y.dtype}"
        )
    if x.device != y.device:
        raise ValueError(
            f"{op}: {first} and {second} must be on one device, got {x.device}, {y.device}"
        )


def check_relu_cat_inputs(a: torch.Tensor, b: torch.Tensor) -> None:
    """Raise ``TypeError``/``ValueError`` naming the problem if ``relu_cat(a, b)`` is undefined."""
    _check_dtype_device("relu_cat", "a", a, "b", b)
    if a.dim() != 4 or b.dim() != 4:
        raise ValueError(
            f"relu_cat: a and b must be 4-D (N, C, H, W), got {tuple(a.shape)}, {tuple(b.shape)}"
        )
    if a.shape[0] != b.shape[0] or a.shape[2:] != b.shape[2:]:
        raise ValueError(
            "relu_cat: a and b must agree in every dimension but channels, got "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )


def check_add_relu_inputs(x: torch.Tensor, residual: torch.Tensor, same_dtype: bool = True) -> None:
    """Raise ``TypeError``/``ValueError`` naming the problem if ``add_relu_(x, residual)`` is
    undefined (no broadcasting: the result is written into x). ``same_dtype=False`` lets
    residual have another floating dtype, as ``x += residual`` does (the custom op allows it)."""
    _check_dtype_device("add_relu_", "x", x, "residual", residual, same_dtype)
    if x.shape != residual.shape:
        raise ValueError(
            f"add_relu_: x and residual must have one shape, got {tuple(x.shape)} and "
            f"{tuple(residual.shape)}"
        )


def check_relu_split_pool_inputs(m: torch.Tensor, split: int, r: int) -> None:
    """Raise ``TypeError``/``ValueError`` naming the problem if ``relu_split_pool(m, split, r)``
    is undefined."""
    _check_dtype_device("relu_split_pool", "m", m, "m", m)
    if m.dim() != 4:
        raise ValueError(f"relu_split_pool: m must be 4-D (N, C, H, W), got {tuple(m.shape)}")
    if not 0 < split < m.shape[1]:
        raise ValueError(
            f"relu_split_pool: split must leave channels on both sides, 0 < split < "
            f"{m.shape[1]}, got {split}"
        )
    if r < 1 or m.shape[2] < r or m.shape[3] < r:
        raise ValueError(
            f"relu_split_pool: the {m.shape[2]}x{m.shape[3]} map cannot be average-pooled by "
            f"windows of {r}x{r} (r must be at least 1 and at most H and W)"
        )


def relu_split_pool_memory_format(m: torch.Tensor) -> torch.memory_format:
    """Memory format of relu_split_pool's outputs: channels_last for a channels_last m, else
    NCHW."""
    if m.is_contiguous(memory_format=torch.channels_last) and not m.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _relu_split_pool_empty(m: torch.Tensor, split: int, r: int):
    n, c, h, w = m.shape
    like = {"dtype": m.dtype, "device": m.device,
            "memory_format": relu_split_pool_memory_format(m)}  # fmt: skip
    a = torch.empty((n, split, h, w), **like)
    b = torch.empty((n, c - split, h, w), **like)
    return a, b, torch.empty((n, c - split, h // r, w // r), **like)


def _relu_cat_empty(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    n, ca, h, w = a.shape
    return torch.empty(
        (n, ca + b.shape[1], h, w),
        dtype=a.dtype,
        device=a.device,
        memory_format=relu_cat_memory_format(a, b),
    )


def _device_context(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _check_launchable(op: str, t: torch.Tensor) -> None:
    off_cuda = "call the torch.ops.scconv op (ATen ops off CUDA)"
    runtime.require_launchable(INTERPRETED, t.device, op, off_cuda)


# --------------------------------------------------------------------------------------------
# Launchers (any device Triton runs on: CUDA, or the CPU through the interpreter)
# --------------------------------------------------------------------------------------------
def relu_cat_triton(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``relu(cat([a, b], dim=1))`` in one Triton kernel.

    Args:
        a: (N, Ca, H, W) float16, bfloat16, float32 or float64.
        b: (N, Cb, H, W), same dtype and device; a and b both contiguous or both channels_last.

    Returns:
        (N, Ca + Cb, H, W) in the inputs' memory format. No autograd.
    """
    check_relu_cat_inputs(a, b)
    if dense_layout(a, b) is None:
        raise ValueError(
            "relu_cat_triton: a and b must both be contiguous or both channels_last, got strides "
            f"{a.stride()} and {b.stride()} (torch.ops.scconv.relu_cat accepts any strides)"
        )
    out = _relu_cat_empty(a, b)
    if out.numel() == 0:
        return out
    args, constexprs, grid = relu_cat_launch_arguments(a, b, out)
    _check_launchable("relu_cat_triton", a)
    with _device_context(a):
        _relu_cat_kernel[grid](*args, **constexprs, num_warps=NUM_WARPS)
    return out


_RELU_CAT_PLANS = runtime.LaunchPlans()


def relu_cat_launch_arguments(a, b, out):
    """(args, constexprs, grid) of ``_relu_cat_kernel`` for a and b dense in out's memory
    format, NCHW or channels_last (also used by ``kernels.codegen``). The part derived from
    metadata is cached (``runtime.LaunchPlans``)."""
    key = (_INT32_LIMIT, runtime.layout_key(a, b, out))
    scalars, constexprs, grid = _RELU_CAT_PLANS.get(key, _relu_cat_plan, a, b, out)
    return (a, b, out, *scalars), dict(constexprs), grid


def _relu_cat_plan(a, b, out):
    """(scalar arguments, constexprs, grid) of a relu_cat launch on these tensors."""
    n, ca, h, w = a.shape
    cb = b.shape[1]
    if out.is_contiguous():
        outer, row_a, row_b = n, ca * h * w, cb * h * w
    else:  # channels_last
        outer, row_a, row_b = n * h * w, ca, cb
    row = row_a + row_b
    if row > _MAX_ROW:
        # Row lengths are int32 inside the kernel (one image of ~2**31 elements in NCHW).
        raise ValueError(f"relu_cat_triton: {row} elements per image is too many for the kernel")
    block_r = min(BLOCK_ELEMENTS, triton.next_power_of_2(row))
    block_o = BLOCK_ELEMENTS // block_r
    programs = triton.cdiv(outer, block_o) * triton.cdiv(row, block_r)
    constexprs = {"BLOCK_O": block_o, "BLOCK_R": block_r, "WIDE_INDEX": out.numel() > _INT32_LIMIT}
    return (outer, row_a, row_b), constexprs, (programs,)


def add_relu_triton_(x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``x <- relu(x + residual)`` in place, in one Triton kernel; returns x.

    Args:
        x: float16, bfloat16, float32 or float64, dense (contiguous or channels_last).
        residual: same shape, dtype, device and strides as x.
    """
    check_add_relu_inputs(x, residual)
    if dense_layout(x) is None or x.stride() != residual.stride():
        raise ValueError(
            "add_relu_triton_: x and residual must be dense with equal strides, got "
            f"{x.stride()} and {residual.stride()} (torch.ops.scconv.add_relu_ accepts any)"
        )
    numel = x.numel()
    if numel == 0:
        return x
    _check_launchable("add_relu_triton_", x)
    args, constexprs, grid = add_relu_launch_arguments(x, residual)
    with _device_context(x):
        _add_relu_kernel[grid](*args, **constexprs, num_warps=NUM_WARPS)
    return x


def add_relu_launch_arguments(x, residual):
    """(args, constexprs, grid) of ``_add_relu_kernel`` (also used by ``kernels.codegen``)."""
    numel = x.numel()
    constexprs = {
        "BLOCK": BLOCK_ELEMENTS,
        "WIDE_INDEX": numel > _INT32_LIMIT,
        "COMPUTE_DTYPE": tl.float64 if x.dtype == torch.float64 else tl.float32,
    }
    return (x, residual, numel), constexprs, (triton.cdiv(numel, BLOCK_ELEMENTS),)


def relu_split_pool_triton(m: torch.Tensor, split: int, r: int):
    """``relu(m[:, :split])``, ``b = relu(m[:, split:])`` and ``avg_pool2d(b, r, r)`` in one
    Triton kernel (one read of m).

    Args:
        m: (N, C, H, W) float16, bfloat16, float32 or float64, any strides.
        split: channels of the first half, 0 < split < C.
        r: the pooling window and stride, a power of two, at most H and W.

    Returns:
        (a, b, pooled) in m's memory format (channels_last or NCHW), dense. No autograd.
    """
    check_relu_split_pool_inputs(m, split, r)
    if r & (r - 1):
        raise ValueError(
            f"relu_split_pool_triton: r must be a power of two, got {r} "
            "(torch.ops.scconv.relu_split_pool takes any r)"
        )
    outputs = _relu_split_pool_empty(m, split, r)
    if m.numel() == 0:
        return outputs
    _check_launchable("relu_split_pool_triton", m)
    args, constexprs, grid = relu_split_pool_launch_arguments(m, split, r, *outputs)
    with _device_context(m):
        _relu_split_pool_kernel[grid](*args, **constexprs, num_warps=NUM_WARPS)
    return outputs


_RELU_SPLIT_POOL_PLANS = runtime.LaunchPlans()


def relu_split_pool_launch_arguments(m, split, r, a, b, pooled):
    """(args, constexprs, grid) of ``_relu_split_pool_kernel`` (also used by
    ``kernels.codegen``). The part derived from metadata is cached (``runtime.LaunchPlans``)."""
    key = (m.dtype, split, r, _INT32_LIMIT, runtime.layout_key(m, a, b, pooled))
    scalars, constexprs, grid = _RELU_SPLIT_POOL_PLANS.get(
        key, _relu_split_pool_plan, m, split, r, a, b, pooled
    )
    return (m, a, b, pooled, *scalars), dict(constexprs), grid


def _relu_split_pool_plan(m, split, r, a, b, pooled):
    """(scalar arguments, constexprs, grid) of a relu_split_pool launch on these tensors."""
    n, c, h, w = m.shape
    if m.stride(1) == 1 and c > 1:  # channels contiguous: long along C
        block_c = min(64, triton.next_power_of_2(c))
        block_w = BLOCK_ELEMENTS // block_c
    else:  # rows contiguous (NCHW): long along W
        block_w = min(256, triton.next_power_of_2(w))
        block_c = BLOCK_ELEMENTS // block_w
    # At least one window wide, and no wider than a power of two past the row.
    block_w = max(r, min(block_w, triton.next_power_of_2(w)))
    block_c = max(1, min(block_c, triton.next_power_of_2(c)))
    programs = n * triton.cdiv(h, r) * triton.cdiv(c, block_c) * triton.cdiv(w, block_w)
    span = max(sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
               for t in (m, a, b, pooled))  # fmt: skip
    dense_rows = (m, a, b)
    align = 1
    if all(t.stride(3) == 1 for t in dense_rows):
        row_strides = [s for t in dense_rows for s in gate._index_strides(t)[:3]]
        align = gate._power_of_two_divisor([w, *row_strides])
    aligned = [gate._aligned_strides(t, align, 3) for t in dense_rows]
    constexprs = {
        "R": r,
        "BLOCK_C": block_c,
        "BLOCK_W": block_w,
        # The last program's channel and column blocks reach past the tensor (masked), and
        # b's offsets of a's channels are negative: margin for both.
        "WIDE_INDEX": span + (block_c + block_w) * max(m.stride()) > _INT32_LIMIT,
        "COMPUTE_DTYPE": tl.float64 if m.dtype == torch.float64 else tl.float32,
        "ALIGN": align,
    }
    strides = [s for t_strides in aligned for s in t_strides] + list(gate._index_strides(pooled))
    scalars = (c, split, h, w // align, h // r, w // r, *strides)
    return scalars, constexprs, (programs,)


# --------------------------------------------------------------------------------------------
# Composite versions (the custom ops' path off CUDA, and for strides the kernels do not take)
# --------------------------------------------------------------------------------------------
def relu_cat_composite(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``relu(cat([a, b], dim=1))`` with ATen ops, each half written once (no cat copy)."""
    out = _relu_cat_empty(a, b)
    ca = a.shape[1]
    # clamp_min(x, 0) is what torch.relu computes; out= writes straight into each half.
    torch.clamp_min(a, 0, out=out[:, :ca])
    torch.clamp_min(b, 0, out=out[:, ca:])
    return out


def add_relu_composite_(x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``x <- relu(x + residual)`` in place with two ATen ops; returns x."""
    return x.add_(residual).relu_()


def relu_split_pool_composite(m: torch.Tensor, split: int, r: int):
    """relu_split_pool with ATen ops: a ReLU into each half, then ``avg_pool2d`` of b."""
    a, b, pooled = _relu_split_pool_empty(m, split, r)
    torch.clamp_min(m[:, :split], 0, out=a)
    torch.clamp_min(m[:, split:], 0, out=b)
    torch.ops.aten.avg_pool2d.out(b, [r, r], [r, r], out=pooled)
    return a, b, pooled


# --------------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("scconv::relu_cat", mutates_args=())
def relu_cat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``relu(cat([a, b], dim=1))``: Triton on CUDA for dense inputs, ATen ops otherwise."""
    check_relu_cat_inputs(a, b)
    per_image = (a.shape[1] + b.shape[1]) * a.shape[2] * a.shape[3]
    if a.device.type == "cuda" and dense_layout(a, b) is not None and per_image <= _MAX_ROW:
        return relu_cat_triton(a, b)
    return relu_cat_composite(a, b)


@relu_cat.register_fake
def _relu_cat_fake(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    check_relu_cat_inputs(a, b)
    return _relu_cat_empty(a, b)


@torch.library.custom_op("scconv::add_relu_", mutates_args=("x",))
def add_relu_(x: torch.Tensor, residual: torch.Tensor) -> None:
    """``x <- relu(x + residual)`` in place: Triton on CUDA for dense x with residual's strides
    and dtype, ATen ``add_`` + ``relu_`` otherwise. Like ``x += residual``, residual may have
    another floating dtype (under autocast a block's input can be float32 while its convolutions
    give bfloat16); the sum is then rounded to x's dtype."""
    check_add_relu_inputs(x, residual, same_dtype=False)
    if (
        x.device.type == "cuda"
        and x.dtype == residual.dtype
        and dense_layout(x) is not None
        and x.stride() == residual.stride()
    ):
        add_relu_triton_(x, residual)
    else:
        add_relu_composite_(x, residual)


@add_relu_.register_fake
def _add_relu_fake(x: torch.Tensor, residual: torch.Tensor) -> None:
    check_add_relu_inputs(x, residual, same_dtype=False)


@torch.library.custom_op("scconv::relu_split_pool", mutates_args=())
def relu_split_pool(
    m: torch.Tensor, split: int, r: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(relu(m[:, :split]), b, avg_pool2d(b, r, r))`` with ``b = relu(m[:, split:])``, each dense
    in m's memory format: Triton on CUDA (r a power of two), ATen ops otherwise."""
    check_relu_split_pool_inputs(m, split, r)
    if m.device.type == "cuda" and not r & (r - 1):
        return relu_split_pool_triton(m, split, r)
    return relu_split_pool_composite(m, split, r)


@relu_split_pool.register_fake
def _relu_split_pool_fake(m: torch.Tensor, split: int, r: int):
    check_relu_split_pool_inputs(m, split, r)
    return _relu_split_pool_empty(m, split, r)
