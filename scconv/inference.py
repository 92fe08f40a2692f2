"""Inference fast path: ``optimize_for_inference(model)`` for SCNets and torchvision ResNets.

An eval-mode SCNet bottleneck dispatches 26 ATen ops (7 convolutions, 7 BatchNorms, 5 ReLUs, a
pool, 4 for the eager gating, a cat and an add), many of them small BatchNorm, ReLU and copy
launches. The optimized bottleneck dispatches 13 (10 with the Triton gate) for the same function,
at every batch size and in either layout:

- every BatchNorm is folded into the convolution before it (stem, ``conv1_a``, ``conv1_b``,
  ``k1``, ``k2``, ``k3``, ``k4``, ``conv3``, downsample): ``bn(conv(x)) = conv'(x)`` with
  ``W' = W * s``, ``b' = (b - mean) * s + beta``, ``s = gamma / sqrt(var + eps)`` (s and b' in
  float64, W * s in float32, or float64 for float64 weights; rounded once to the weight's dtype);
- ``conv1_a`` and ``conv1_b`` (both 1x1 on the block input) become one convolution ``conv1`` with
  concatenated weights, so the block input, the largest tensor of the block, is read once. Its
  output's two ReLUs and the average pool of SC-Conv's ``k2`` become one
  ``torch.ops.scconv.relu_split_pool``, which reads the merged output once and writes both halves
  dense (in its memory format) and the pool of the second; ``k2``'s convolution takes that pool
  (``SCConv.forward(x, pooled=...)``). Dense halves matter: a channel half of the merged output is
  strided (at batch > 1, and in channels_last at any batch), and PyTorch's convolution (``k1``,
  ``k3``) and ``avg_pool2d`` copy a strided input (``aten::contiguous`` -> ``clone`` ->
  ``copy_``, nested, so the op counter does not see them): 3 hidden copies per block, 48 per
  SCNet-50 forward. Bytes moved per SCNet-50 forward (bf16, channels_last, batch 256, 224 px;
  ``python -m bench.opcount --bytes``, a traffic model on the meta device): 30.8 GB with
  ``conv1_a`` and ``conv1_b`` as two convolutions (an earlier design), 27.9 GB with one
  convolution and an out-of-place ReLU per half, 27.4 GB with ``relu_split_pool`` (ResNet-50
  optimized: 24.8 GB). On a 2-core CPU (1 thread, batch 2, 128 px, median of 15 forwards) the
  three take the same time within noise (SCNet-50 in NCHW and channels_last: 64-73 ms for the
  first two in one comparison, 57-64 ms for the last two in another). The gating input ``x`` is
  ``out_b`` as it lies: the Triton gate and the eager gate both take it without a copy;
- the two ReLUs after ``k1`` and SC-Conv and the ``torch.cat`` before ``conv3`` become one
  ``torch.ops.scconv.relu_cat`` (each element read once and written once into the buffer
  ``conv3`` reads; with ``avd``, one average pool then runs on that buffer instead of two);
- the residual ``out += residual; relu(out)`` becomes one in-place ``torch.ops.scconv.add_relu_``;
- the classifier head ``fc(flatten(avgpool(x)))`` becomes one mean and one ``addmm``;
- a 1x1, stride-1 ``AvgPool2d`` (v1d's first downsample) returns its input and is dropped.

The fused ops (``kernels/fused.py``) launch Triton kernels on CUDA and run ATen ops elsewhere.
The gating still goes through ``scconv.gating.sc_gate`` with each SC-Conv's ``gate`` attribute:
the optimized model keeps its ``SCConv`` modules (with folded children), so ``scconv.set_gate``
works on it and the repr shows the gate.
"""

import copy
import itertools
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from scconv.models import SCNet
from scconv.modules import SCBottleneck, SCConv

__all__ = [
    "FusedBasicBlock",
    "FusedBottleneck",
    "FusedSCBottleneck",
    "GlobalAvgPool",
    "InferenceLinear",
    "fold_batchnorm",
    "optimize_for_inference",
]

_BATCHNORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)
# Modules whose eval forward is known and has nothing to fold: kept as they are, no warning.
_STATELESS = (
    nn.ReLU,
    nn.Identity,
    nn.AvgPool2d,
    nn.MaxPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Flatten,
    nn.Dropout,
)


# ---------------------------------------------------------------------------------------------
# Folded modules


class GlobalAvgPool(nn.Module):
    """Mean over H and W returning (N, C): replaces ``AdaptiveAvgPool2d(1)`` before
    ``torch.flatten(x, 1)``, which then has nothing left to do (one ATen op instead of two)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1))


class InferenceLinear(nn.Module):
    """``nn.Linear`` storing its weight transposed, ``weight_t`` of shape (in, out), so a 2-D input
    takes one ``addmm`` (``F.linear`` dispatches a transpose view and then ``addmm``)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and self.bias is not None:
            return torch.addmm(self.bias, x, self.weight_t)
        out = torch.matmul(x, self.weight_t)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def _relu(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x, inplace=True)


def _register_fused_ops() -> None:
    """Register ``torch.ops.scconv.relu_cat``, ``add_relu_`` and ``relu_split_pool`` (importing
    ``kernels.fused``, and with it triton, on first use only: ``import scconv`` stays free of
    triton)."""
    import kernels.fused  # noqa: F401


class _FusedBlock(nn.Module):
    """Base of the fused blocks: their forward calls the custom ops of ``kernels.fused``, which
    are registered when a block is built, copied or unpickled (``torch.load`` of a whole model in
    a fresh process)."""

    def __init__(self):
        super().__init__()
        _register_fused_ops()

    def __setstate__(self, state):
        _register_fused_ops()
        super().__setstate__(state)


class FusedSCBottleneck(_FusedBlock):
    """``SCBottleneck`` with BatchNorm folded, the twin 1x1 convolutions merged and the ReLUs,
    ``k2``'s pool, concatenation and residual addition fused (see the module docstring).

    Children: ``conv1`` (in -> Ca + Cb, the merged folded 1x1), ``k1`` (folded), ``scconv`` (the
    block's ``SCConv`` with folded ``k2``/``k3``/``k4``), ``conv3``, ``downsample`` (folded or
    None) and ``avd_layer`` (or None).
    """

    def __init__(self, conv1, split_sizes, k1, scconv, conv3, downsample, avd_layer):
        super().__init__()
        self.conv1 = conv1
        self.split_sizes = list(split_sizes)
        self.k1 = k1
        self.scconv = scconv
        self.conv3 = conv3
        self.downsample = downsample
        self.avd_layer = avd_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One read of conv1's output writes both halves dense (relu'd) and out_b's average pool,
        # which the SC-Conv's k2 takes instead of pooling out_b again. (The fused ops are called
        # through their .default overload: resolving the packet costs ~0.8 us a call.)
        out_a, out_b, pooled = torch.ops.scconv.relu_split_pool.default(
            self.conv1(x), self.split_sizes[0], self.scconv.pooling_r
        )
        out = torch.ops.scconv.relu_cat.default(self.k1(out_a), self.scconv(out_b, pooled=pooled))
        if self.avd_layer is not None:
            # Average pooling works channel by channel: pooling the buffer = pooling each half.
            out = self.avd_layer(out)
        out = self.conv3(out)
        residual = x if self.downsample is None else self.downsample(x)
        torch.ops.scconv.add_relu_.default(out, residual)
        return out


class FusedBottleneck(_FusedBlock):
    """torchvision's ``Bottleneck`` with BatchNorm folded and the residual add + ReLU fused."""

    def __init__(self, conv1, conv2, conv3, downsample):
        super().__init__()
        self.conv1 = conv1
        self.conv2 = conv2
        self.conv3 = conv3
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv3(_relu(self.conv2(_relu(self.conv1(x)))))
        residual = x if self.downsample is None else self.downsample(x)
        torch.ops.scconv.add_relu_.default(out, residual)
        return out


class FusedBasicBlock(_FusedBlock):
    """torchvision's ``BasicBlock`` with BatchNorm folded and the residual add + ReLU fused."""

    def __init__(self, conv1, conv2, downsample):
        super().__init__()
        self.conv1 = conv1
        self.conv2 = conv2
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(_relu(self.conv1(x)))
        residual = x if self.downsample is None else self.downsample(x)
        torch.ops.scconv.add_relu_.default(out, residual)
        return out


# ---------------------------------------------------------------------------------------------
# Folding


def _why_not_foldable(conv: nn.Module, bn: nn.Module) -> str | None:
    """None if ``bn(conv(x))`` can be folded into one convolution, else the reason."""
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} is not an nn.Conv2d"
    if type(bn) not in _BATCHNORMS:
        return f"{type(bn).__name__} is not a BatchNorm2d"
    if bn.running_mean is None or bn.running_var is None:
        return "BatchNorm without running statistics (track_running_stats=False)"
    if bn.num_features != conv.out_channels:
        return f"BatchNorm of {bn.num_features} channels after a {conv.out_channels}-channel conv"
    return None


def _why_not_plain_pool(sc: SCConv) -> str | None:
    """None if ``sc.k2`` starts with the pool ``relu_split_pool`` computes (``AvgPool2d(r, r)``,
    r = pooling_r, no padding, floor mode, no divisor override), else the reason."""
    r = sc.pooling_r
    if len(sc.k2) == 0:
        return f"scconv.k2 is empty, not AvgPool2d({r}, {r}) and a convolution"
    pool = sc.k2[0]
    if type(pool) is not nn.AvgPool2d:
        return f"scconv.k2 starts with a {type(pool).__name__}, not AvgPool2d({r}, {r})"
    pair = lambda v: tuple(v) if isinstance(v, tuple | list) else (v, v)  # noqa: E731
    settings = {
        "kernel_size": (pair(pool.kernel_size), (r, r)),
        "stride": (pair(pool.stride), (r, r)),
        "padding": (pair(pool.padding), (0, 0)),
        "ceil_mode": (pool.ceil_mode, False),
        "divisor_override": (pool.divisor_override, None),
    }
    wrong = [f"{name}={got}" for name, (got, wanted) in settings.items() if got != wanted]
    if wrong:
        return f"scconv.k2's AvgPool2d has {', '.join(wrong)}, not AvgPool2d({r}, {r})'s"
    return None


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    if (
        t.dim() == 4
        and t.is_contiguous(memory_format=torch.channels_last)
        and not t.is_contiguous()
    ):
        return torch.channels_last
    return torch.contiguous_format


def _folded_weights(conv: nn.Conv2d, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', b') with ``conv'(x) = bn(conv(x))`` in eval mode.

    The per-channel scale and the bias are computed in float64; the weight is multiplied in
    float32 (float64 for float64 weights): one rounding of W * s, no float64 copy of every weight.
    """
    compute = torch.float64 if conv.weight.dtype == torch.float64 else torch.float32
    weight = conv.weight.detach().to(compute)
    mean = bn.running_mean.detach().double()
    inv_std = torch.rsqrt(bn.running_var.detach().double() + bn.eps)
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma * inv_std
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(mean)
    return weight * scale.to(compute).reshape(-1, 1, 1, 1), (bias - mean) * scale + beta


def _conv_like(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    """A Conv2d with ``conv``'s geometry, the given weight and bias cast to ``conv``'s
    dtype and memory format, and frozen parameters."""
    original = conv.weight
    new = nn.Conv2d(
        conv.in_channels,
        weight.shape[0],
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
        device="meta",  # no initialisation work: both parameters are replaced below
    )
    new.weight = nn.Parameter(
        weight.to(original.dtype).contiguous(memory_format=_memory_format(original)),
        requires_grad=False,
    )
    new.bias = nn.Parameter(bias.to(original.dtype), requires_grad=False)
    return new


def fold_batchnorm(conv: nn.Conv2d, bn: nn.Module) -> nn.Conv2d:
    """A new ``nn.Conv2d`` (with bias) computing ``bn(conv(x))`` for eval-mode ``bn``.

    ``conv`` must be an ``nn.Conv2d`` and ``bn`` a ``BatchNorm2d``/``SyncBatchNorm`` with running
    statistics; raises ``ValueError`` otherwise. Folding is done in float64; the result has
    ``conv``'s dtype, device and weight memory format. Neither argument is modified.
    """
    reason = _why_not_foldable(conv, bn)
    if reason is not None:
        raise ValueError(f"cannot fold: {reason}")
    return _conv_like(conv, *_folded_weights(conv, bn))


def _merge_convs(first: nn.Conv2d, second: nn.Conv2d, bn_first, bn_second) -> nn.Conv2d | None:
    """One convolution computing ``cat([bn_first(first(x)), bn_second(second(x))], dim=1)``, or
    None when the two convolutions differ in anything but their output channels."""
    geometry = ("in_channels", "kernel_size", "stride", "padding", "dilation", "padding_mode")
    # Grouped convolutions do not merge by concatenation: it would regroup the output channels.
    if any(getattr(first, g) != getattr(second, g) for g in geometry):
        return None
    if first.groups != 1 or second.groups != 1:
        return None
    if first.weight.dtype != second.weight.dtype or first.weight.device != second.weight.device:
        return None
    weight_a, bias_a = _folded_weights(first, bn_first)
    weight_b, bias_b = _folded_weights(second, bn_second)
    return _conv_like(first, torch.cat([weight_a, weight_b]), torch.cat([bias_a, bias_b]))


# ---------------------------------------------------------------------------------------------
# The conversion walk. Children are replaced only inside modules whose forward is known (the
# types handled below); anything else is kept whole and reported.


class _Walk:
    def __init__(self):
        self.left_alone: list[str] = []

    def report(self, path: str, module: nn.Module, reason: str) -> None:
        self.left_alone.append(f"{path or '<model>'} ({type(module).__name__}): {reason}")

    def convert(self, module: nn.Module, path: str) -> nn.Module:
        kind = type(module)
        if kind in (SCNet, ResNet):
            return self.network(module, path)
        if kind is SCBottleneck:
            return self.sc_bottleneck(module, path)
        if kind is Bottleneck:
            return self.bottleneck(module, path)
        if kind is BasicBlock:
            return self.basic_block(module, path)
        if kind is nn.Sequential:
            return self.sequential(module, path)
        if kind is SCConv:
            # SCConv.forward only calls k2, k3 and k4 (Sequentials of conv and BN) and the gate.
            for name in ("k2", "k3", "k4"):
                setattr(module, name, self.convert(getattr(module, name), _join(path, name)))
            return module
        if kind in _BATCHNORMS:
            self.report(path, module, "BatchNorm with no convolution right before it; not folded")
            return module
        if kind in (nn.Conv2d, nn.Linear, *_STATELESS) or kind in _OPTIMIZED:
            return module
        self.report(path, module, "unknown module type, left unchanged")
        return module

    def sequential(self, seq: nn.Sequential, path: str) -> nn.Sequential:
        """Fold each (Conv2d, BatchNorm) pair of ``seq`` in place; the BatchNorm's slot becomes an
        ``nn.Identity`` so later members keep their indices (and state-dict names)."""
        names = list(seq._modules)
        i = 0
        while i < len(names):
            child = seq._modules[names[i]]
            following = seq._modules[names[i + 1]] if i + 1 < len(names) else None
            if (
                type(child) is nn.Conv2d
                and following is not None
                and type(following) in _BATCHNORMS
                and _why_not_foldable(child, following) is None
            ):
                seq._modules[names[i]] = fold_batchnorm(child, following)
                seq._modules[names[i + 1]] = nn.Identity()
                i += 2
                continue
            if _is_identity_pool(child):
                child = nn.Identity()  # v1d's 1x1 stride-1 AvgPool2d returns its input
            seq._modules[names[i]] = self.convert(child, _join(path, names[i]))
            i += 1
        return seq

    def network(self, model: nn.Module, path: str) -> nn.Module:
        """SCNet and torchvision ResNet: stem conv1 (+ bn1), layer1..4, avgpool, fc."""
        stem = model.conv1
        if type(stem) is nn.Sequential and len(stem) > 0:
            # SCNet's deep stem: bn1 follows its last convolution
            self.sequential(stem, _join(path, "conv1"))
            last_name = list(stem._modules)[-1]
            last = stem._modules[last_name]
        else:
            last_name, last = None, stem
        if type(model.bn1) is not nn.Identity:  # Identity: already optimized
            reason = _why_not_foldable(last, model.bn1)
            if reason is None:
                folded = fold_batchnorm(last, model.bn1)
                if last_name is None:
                    model.conv1 = folded
                else:
                    stem._modules[last_name] = folded
                model.bn1 = nn.Identity()
            else:
                self.report(_join(path, "bn1"), model.bn1, f"stem conv1/bn1 not folded: {reason}")
        for name, child in list(model.named_children()):
            if name in ("conv1", "bn1"):
                continue
            if name == "avgpool" and type(child) is nn.AdaptiveAvgPool2d:
                if _is_global(child.output_size):
                    # forward() flattens the pooled (N, C, 1, 1) to (N, C): a mean gives that.
                    model.avgpool = GlobalAvgPool()
                continue
            if name == "fc" and type(child) is nn.Linear:
                model.fc = InferenceLinear(child)
                continue
            setattr(model, name, self.convert(child, _join(path, name)))
        return model

    # Blocks are checked completely before anything in them changes: a block that cannot be
    # converted as a whole is left exactly as it was.

    def _check_pairs(self, block: nn.Module, pairs) -> str | None:
        for conv_name, bn_name in pairs:
            reason = _why_not_foldable(getattr(block, conv_name), getattr(block, bn_name))
            if reason is not None:
                return f"{conv_name}/{bn_name}: {reason}"
        return None

    def _check_block(self, block: nn.Module, pairs, sequentials) -> str | None:
        """Why ``block`` cannot be converted, or None. ``sequentials``: (name, module or None)."""
        if type(block.relu) is not nn.ReLU:
            return f"its relu is a {type(block.relu).__name__}, not an nn.ReLU"
        reason = self._check_pairs(block, pairs)
        if reason is not None:
            return reason
        for name, seq in sequentials:
            reason = None if seq is None else _why_not_foldable_sequential(seq)
            if reason is not None:
                return f"{name}: {reason}"
        return None

    def _fold_sequential(self, seq: nn.Sequential | None) -> nn.Sequential | None:
        return None if seq is None else self.sequential(seq, "")

    def sc_bottleneck(self, block: SCBottleneck, path: str) -> nn.Module:
        sc = block.scconv
        if type(sc) is not SCConv:
            self.report(path, block, f"its scconv is a {type(sc).__name__}; left unchanged")
            return block
        reason = self._check_block(
            block,
            [("conv1_a", "bn1_a"), ("conv1_b", "bn1_b"), ("conv3", "bn3")],
            [("k1", block.k1), ("scconv.k2", sc.k2), ("scconv.k3", sc.k3), ("scconv.k4", sc.k4)]
            + [("downsample", block.downsample)],
        )
        if reason is None:
            reason = _why_not_plain_pool(sc)
        if reason is None:
            conv1 = _merge_convs(block.conv1_a, block.conv1_b, block.bn1_a, block.bn1_b)
            if conv1 is None:
                reason = "conv1_a and conv1_b differ in more than their output channels"
        if reason is not None:
            self.report(path, block, f"{reason}; left unchanged")
            return block
        for name in ("k2", "k3", "k4"):
            self.sequential(getattr(sc, name), "")
        return FusedSCBottleneck(
            conv1,
            (block.conv1_a.out_channels, block.conv1_b.out_channels),
            self.sequential(block.k1, ""),
            sc,
            fold_batchnorm(block.conv3, block.bn3),
            self._fold_sequential(block.downsample),
            block.avd_layer if block.avd else None,
        )

    def bottleneck(self, block: Bottleneck, path: str) -> nn.Module:
        pairs = [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")]
        reason = self._check_block(block, pairs, [("downsample", block.downsample)])
        if reason is not None:
            self.report(path, block, f"{reason}; left unchanged")
            return block
        convs = [fold_batchnorm(getattr(block, c), getattr(block, b)) for c, b in pairs]
        return FusedBottleneck(*convs, self._fold_sequential(block.downsample))

    def basic_block(self, block: BasicBlock, path: str) -> nn.Module:
        pairs = [("conv1", "bn1"), ("conv2", "bn2")]
        reason = self._check_block(block, pairs, [("downsample", block.downsample)])
        if reason is not None:
            self.report(path, block, f"{reason}; left unchanged")
            return block
        convs = [fold_batchnorm(getattr(block, c), getattr(block, b)) for c, b in pairs]
        return FusedBasicBlock(*convs, self._fold_sequential(block.downsample))


def _why_not_foldable_sequential(seq: nn.Module) -> str | None:
    """None if every member of ``seq`` is a convolution (with a foldable BatchNorm after it, or
    none) or a stateless layer, so that folding leaves no BatchNorm and nothing unknown."""
    if type(seq) is not nn.Sequential:
        return f"a {type(seq).__name__}, not an nn.Sequential"
    members = list(seq)
    i = 0
    while i < len(members):
        member = members[i]
        following = members[i + 1] if i + 1 < len(members) else None
        if type(member) is nn.Conv2d and type(following) in _BATCHNORMS:
            reason = _why_not_foldable(member, following)
            if reason is not None:
                return reason
            i += 2
            continue
        if type(member) not in (nn.Conv2d, *_STATELESS):
            return f"holds a {type(member).__name__}"
        i += 1
    return None


_OPTIMIZED = (FusedSCBottleneck, FusedBottleneck, FusedBasicBlock, GlobalAvgPool, InferenceLinear)
_ROOTS = (SCNet, ResNet, SCBottleneck, Bottleneck, BasicBlock, SCConv, nn.Sequential)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _is_identity_pool(module: nn.Module) -> bool:
    """An AvgPool2d that averages one element per output (kernel 1, stride 1, no padding)."""
    if type(module) is not nn.AvgPool2d:
        return False
    return all(
        (v if isinstance(v, tuple) else (v, v)) == (size, size)
        for v, size in ((module.kernel_size, 1), (module.stride, 1), (module.padding, 0))
    ) and module.divisor_override in (None, 1)


def _is_global(output_size) -> bool:
    sizes = output_size if isinstance(output_size, tuple) else (output_size, output_size)
    return all(s == 1 for s in sizes)


def _tensors(model: nn.Module):
    return itertools.chain(model.parameters(), model.buffers())


def _copy_sharing_tensors(model: nn.Module) -> nn.Module:
    """A deep copy of the modules that shares every parameter and buffer with ``model``.

    Folding replaces almost all of them, so copying them first would be wasted work; the walk
    never writes into an existing tensor, and :func:`_unshare_tensors` copies the ones that
    survive.
    """
    memo = {id(t): t for t in _tensors(model)}
    return copy.deepcopy(model, memo)


def _unshare_tensors(model: nn.Module, original: nn.Module) -> None:
    """Give ``model`` its own copy of every parameter/buffer it still shares with ``original``
    (ties between modules of ``model`` are kept)."""
    shared = {id(t) for t in _tensors(original)}
    copies = {}
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for key, t in store.items():
                if t is None or id(t) not in shared:
                    continue
                if id(t) not in copies:
                    clone = t.detach().clone()
                    if isinstance(t, nn.Parameter):
                        clone = nn.Parameter(clone, requires_grad=t.requires_grad)
                    copies[id(t)] = clone
                store[key] = copies[id(t)]


def optimize_for_inference(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """An inference-only version of ``model`` computing the same outputs with fewer ATen ops.

    Returns a NEW model (a deep copy; ``model`` is not modified) unless ``inplace=True``, which
    converts ``model`` itself and returns it.

    Supports SCNets (``scconv.SCNet``, all four variants, with any gate) and torchvision ResNets
    (``Bottleneck`` and ``BasicBlock``), and also ``SCBottleneck``, ``SCConv`` or an
    ``nn.Sequential`` of such blocks. See the module docstring for what changes: BatchNorm folded
    into the preceding convolutions, ``conv1_a``/``conv1_b`` merged, ReLU + concatenation and
    residual add + ReLU fused, a one-``addmm`` head. The model's class, attributes (``arch``,
    ``min_input_size``), ``forward_features``, device, dtype and memory format are kept; new
    (folded) parameters have ``requires_grad=False``, and the fused ops have no autograd: the
    result is for inference only. Each ``SCConv`` keeps its ``gate``: ``scconv.set_gate`` works on
    the result as on the original.

    Raises:
        ValueError: ``model`` (or any submodule) is in training mode; folding uses the BatchNorm
            running statistics, so call ``model.eval()`` first.
        TypeError: ``model`` is none of the supported types.

    Warns:
        UserWarning listing every module left unchanged (unknown types, BatchNorms without a
        convolution before them, blocks with unexpected members); they still run as before.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize_for_inference expects an nn.Module, got {type(model).__name__}")
    if type(model) not in _ROOTS and type(model) not in _OPTIMIZED:
        supported = ", ".join(t.__name__ for t in _ROOTS)
        raise TypeError(
            f"optimize_for_inference supports {supported} (SCNets and torchvision ResNets), got "
            f"{type(model).__name__}"
        )
    training = [name or "<model>" for name, m in model.named_modules() if m.training]
    if training:
        listed = ", ".join(training[:3]) + (" ..." if len(training) > 3 else "")
        raise ValueError(
            "optimize_for_inference folds BatchNorm running statistics, which is only valid in "
            f"eval mode, but these modules are in training mode: {listed}. Call model.eval() first."
        )
    original = model
    if not inplace:
        model = _copy_sharing_tensors(original)
    walk = _Walk()
    with torch.no_grad():
        model = walk.convert(model, "")
        if not inplace:
            _unshare_tensors(model, original)
    model.eval()  # the new modules (fused blocks, Identity, ...) are built in training mode
    if walk.left_alone:
        warnings.warn(
            "optimize_for_inference left these modules unchanged (they run as before): "
            + "; ".join(walk.left_alone),
            UserWarning,
            stacklevel=2,
        )
    return model
