"""SC-Conv and the SCNet bottleneck, with the official parameter names.

SC-Conv (Liu et al., CVPR 2020) on an input x of C channels:

    k2 = BN(conv3x3(avgpool_r(x)))           # (N, C, H/r, W/r)
    out = BN(conv3x3_stride(k3(x) * sigmoid(x + upsample_nearest(k2, size=(H, W)))))

The gating ``k3 * sigmoid(x + up(k2))`` is delegated to ``scconv.gating.sc_gate`` so that one
place decides whether eager PyTorch or the fused Triton kernels run it.
"""

import itertools

import torch
from torch import nn

from scconv.gating import check_gate, default_gate, sc_gate


class SCConv(nn.Module):
    """Self-calibrated 3x3 convolution.

    Args mirror the official code: ``inplanes`` and ``planes`` (equal in SCNet), the ``stride``,
    ``padding``, ``dilation`` and ``groups`` of the three 3x3 convolutions, ``pooling_r`` (the
    down-sampling rate r of the calibration branch), ``norm_layer`` (a BatchNorm-like class) and
    ``gate``, the name of the gating implementation (``"eager"``, ``"triton"`` or ``"auto"``;
    ``None`` takes ``$SCCONV_GATE`` or ``"auto"``).
    """

    def __init__(
        self,
        inplanes,
        planes,
        stride,
        padding,
        dilation,
        groups,
        pooling_r,
        norm_layer=nn.BatchNorm2d,
        gate=None,
    ):
        super().__init__()
        if inplanes != planes:
            # The identity branch x is added to up(k2), which has `planes` channels.
            raise ValueError(f"SCConv needs inplanes == planes, got {inplanes} and {planes}")
        self.pooling_r = pooling_r
        self.gate = check_gate(gate) if gate is not None else default_gate()

        def conv3x3(conv_stride):
            return nn.Conv2d(
                inplanes,
                planes,
                kernel_size=3,
                stride=conv_stride,
                padding=padding,
                dilation=dilation,
                groups=groups,
                bias=False,
            )

        self.k2 = nn.Sequential(
            nn.AvgPool2d(kernel_size=pooling_r, stride=pooling_r), conv3x3(1), norm_layer(planes)
        )
        self.k3 = nn.Sequential(conv3x3(1), norm_layer(planes))
        self.k4 = nn.Sequential(conv3x3(stride), norm_layer(planes))

    def forward(self, x: torch.Tensor, pooled: torch.Tensor | None = None) -> torch.Tensor:
        """``k4(k3(x) * sigmoid(x + up(k2(x))))``. ``pooled``: ``k2``'s average pool of x when
        the caller has computed it already (the inference fast path pools in the same pass that
        writes x); ``k2``'s layers after its pool then take it (each layer's hooks run, those
        of ``k2`` as a whole do not)."""
        if x.shape[-2] < self.pooling_r or x.shape[-1] < self.pooling_r:
            raise ValueError(
                f"SCConv input of spatial size {tuple(x.shape[-2:])} is smaller than its "
                f"pooling_r={self.pooling_r}: the calibration branch cannot pool it"
            )
        if pooled is None:
            k2 = self.k2(x)
        else:
            r = self.pooling_r
            expected = (*x.shape[:2], x.shape[-2] // r, x.shape[-1] // r)
            if tuple(pooled.shape) != expected:
                raise ValueError(
                    f"SCConv: pooled must be x average-pooled by {r}x{r} windows, shape "
                    f"{expected}, got {tuple(pooled.shape)}"
                )
            # The layers one by one: slicing (self.k2[1:]) would build a new Sequential on
            # every call (about 9 us each on a CPU).
            k2 = pooled
            for layer in itertools.islice(self.k2, 1, None):
                k2 = layer(k2)
        return self.k4(sc_gate(x, k2, self.k3(x), self.gate))

    def extra_repr(self) -> str:
        return f"pooling_r={self.pooling_r}, gate={self.gate!r}"


class SCBottleneck(nn.Module):
    """SCNet bottleneck: a 1x1 projection split in two halves; half ``a`` takes a plain 3x3
    convolution ``k1``, half ``b`` an SC-Conv; both are concatenated and projected by ``conv3``."""

    expansion = 4
    pooling_r = 4  # down-sampling rate of SC-Conv, as in the paper

    def __init__(
        self,
        inplanes,
        planes,
        stride=1,
        downsample=None,
        cardinality=1,
        bottleneck_width=32,
        avd=False,
        dilation=1,
        is_first=False,
        norm_layer=nn.BatchNorm2d,
        gate=None,
    ):
        super().__init__()
        group_width = int(planes * (bottleneck_width / 64.0)) * cardinality
        self.conv1_a = nn.Conv2d(inplanes, group_width, kernel_size=1, bias=False)
        self.bn1_a = norm_layer(group_width)
        self.conv1_b = nn.Conv2d(inplanes, group_width, kernel_size=1, bias=False)
        self.bn1_b = norm_layer(group_width)
        # avd: down-sample with an average pool after the 3x3 convolutions instead of striding.
        self.avd = avd and (stride > 1 or is_first)
        if self.avd:
            self.avd_layer = nn.AvgPool2d(3, stride, padding=1)
            stride = 1
        self.k1 = nn.Sequential(
            nn.Conv2d(
                group_width,
                group_width,
                kernel_size=3,
                stride=stride,
                padding=dilation,
                dilation=dilation,
                groups=cardinality,
                bias=False,
            ),
            norm_layer(group_width),
        )
        self.scconv = SCConv(
            group_width,
            group_width,
            stride=stride,
            padding=dilation,
            dilation=dilation,
            groups=cardinality,
            pooling_r=self.pooling_r,
            norm_layer=norm_layer,
            gate=gate,
        )
        self.conv3 = nn.Conv2d(group_width * 2, planes * 4, kernel_size=1, bias=False)
        self.bn3 = norm_layer(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.dilation = dilation
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        out_a = self.relu(self.bn1_a(self.conv1_a(x)))
        out_b = self.relu(self.bn1_b(self.conv1_b(x)))
        out_a = self.relu(self.k1(out_a))
        out_b = self.relu(self.scconv(out_b))
        if self.avd:
            out_a = self.avd_layer(out_a)
            out_b = self.avd_layer(out_b)
        out = self.bn3(self.conv3(torch.cat([out_a, out_b], dim=1)))
        if self.downsample is not None:
            residual = self.downsample(x)
        out += residual
        return self.relu(out)
