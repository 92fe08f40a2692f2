"""SCNet models (official parameter names), the ResNet baselines, and checkpoint loading."""

import contextlib
import hashlib
import os
import pickle
import re
import urllib.error
import urllib.parse
import zipfile
from collections.abc import Callable, Mapping

import torch
import torchvision
from torch import nn

from scconv.gating import check_gate
from scconv.modules import SCBottleneck, SCConv

# The checkpoints released with the paper (scnet101_v1d was never released).
OFFICIAL_URLS = {
    "scnet50": "https://backseason.oss-cn-beijing.aliyuncs.com/scnet/scnet50-dc6a7e87.pth",
    "scnet50_v1d": "https://backseason.oss-cn-beijing.aliyuncs.com/scnet/scnet50_v1d-4109d1e1.pth",
    "scnet101": "https://backseason.oss-cn-beijing.aliyuncs.com/scnet/scnet101-44c5b751.pth",
}


class InputTooSmallError(ValueError):
    """An input too small for an SCNet; the message names the smallest size that works."""


class SCNet(nn.Module):
    """SCNet (ResNet with SC-Conv bottlenecks), options as in the paper's code.

    Args:
        block: the residual block class (``SCBottleneck``).
        layers: number of blocks in each of the four stages.
        groups: cardinality of the 3x3 convolutions.
        bottleneck_width: width of each bottleneck half per group, relative to 64.
        num_classes: outputs of the classifier.
        dilated / dilation: dilate stages 3 and 4 (``dilated`` or ``dilation=4``) or only stage 4
            (``dilation=2``) instead of striding, for dense prediction.
        deep_stem / stem_width: three 3x3 stem convolutions of ``stem_width`` channels instead
            of one 7x7.
        avg_down: average-pool before the 1x1 downsample convolution instead of striding it.
        avd: average-pool after the 3x3 convolutions in strided blocks instead of striding them.
        norm_layer: BatchNorm-like class.
        gate: gating implementation of every SC-Conv (``"eager"``, ``"triton"``, ``"auto"``).
    """

    def __init__(
        self,
        block=SCBottleneck,
        layers=(3, 4, 6, 3),
        groups=1,
        bottleneck_width=32,
        num_classes=1000,
        dilated=False,
        dilation=1,
        deep_stem=False,
        stem_width=64,
        avg_down=False,
        avd=False,
        norm_layer=nn.BatchNorm2d,
        gate=None,
    ):
        super().__init__()
        self.cardinality = groups
        self.bottleneck_width = bottleneck_width
        self.inplanes = stem_width * 2 if deep_stem else 64
        self.avg_down = avg_down
        self.avd = avd
        self.gate = gate
        if deep_stem:
            self.conv1 = nn.Sequential(
                nn.Conv2d(3, stem_width, kernel_size=3, stride=2, padding=1, bias=False),
                norm_layer(stem_width),
                nn.ReLU(inplace=True),
                nn.Conv2d(stem_width, stem_width, kernel_size=3, stride=1, padding=1, bias=False),
                norm_layer(stem_width),
                nn.ReLU(inplace=True),
                nn.Conv2d(
                    stem_width, stem_width * 2, kernel_size=3, stride=1, padding=1, bias=False
                ),
            )
        else:
            self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        make = self._make_layer
        self.layer1 = make(block, 64, layers[0], norm_layer=norm_layer, is_first=False)
        self.layer2 = make(block, 128, layers[1], stride=2, norm_layer=norm_layer)
        if dilated or dilation == 4:
            self.layer3 = make(block, 256, layers[2], stride=1, dilation=2, norm_layer=norm_layer)
            self.layer4 = make(block, 512, layers[3], stride=1, dilation=4, norm_layer=norm_layer)
        elif dilation == 2:
            self.layer3 = make(block, 256, layers[2], stride=2, dilation=1, norm_layer=norm_layer)
            self.layer4 = make(block, 512, layers[3], stride=1, dilation=2, norm_layer=norm_layer)
        elif dilation == 1:
            self.layer3 = make(block, 256, layers[2], stride=2, norm_layer=norm_layer)
            self.layer4 = make(block, 512, layers[3], stride=2, norm_layer=norm_layer)
        else:
            raise ValueError(f"dilation must be 1, 2 or 4, got {dilation}")
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, norm_layer):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        self.min_input_size = _min_input_size(self)

    def _make_layer(
        self, block, planes, blocks, stride=1, dilation=1, norm_layer=None, is_first=True
    ):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            down_layers = []
            if self.avg_down:
                pool = stride if dilation == 1 else 1
                down_layers.append(
                    nn.AvgPool2d(pool, stride=pool, ceil_mode=True, count_include_pad=False)
                )
                down_layers.append(
                    nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, bias=False)
                )
            else:
                down_layers.append(
                    nn.Conv2d(
                        self.inplanes,
                        planes * block.expansion,
                        kernel_size=1,
                        stride=stride,
                        bias=False,
                    )
                )
            down_layers.append(norm_layer(planes * block.expansion))
            downsample = nn.Sequential(*down_layers)

        common = dict(
            cardinality=self.cardinality,
            bottleneck_width=self.bottleneck_width,
            avd=self.avd,
            norm_layer=norm_layer,
            gate=self.gate,
        )
        # The official code runs the first block of a dilation-4 stage at dilation 2.
        first_dilation = 2 if dilation == 4 else 1
        layers = [
            block(
                self.inplanes,
                planes,
                stride,
                downsample=downsample,
                dilation=first_dilation,
                is_first=is_first,
                **common,
            )
        ]
        self.inplanes = planes * block.expansion
        layers += [
            block(self.inplanes, planes, dilation=dilation, **common) for _ in range(1, blocks)
        ]
        return nn.Sequential(*layers)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"SCNet expects images of shape (N, 3, H, W), got {tuple(x.shape)}")
        if min(x.shape[-2:]) < self.min_input_size:
            raise InputTooSmallError(
                f"input of {x.shape[-2]}x{x.shape[-1]} pixels is too small for this SCNet: a "
                f"stage's feature map would be smaller than SC-Conv's pooling_r; the smallest "
                f"input that works is {self.min_input_size}x{self.min_input_size}"
            )

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four stage outputs C2, C3, C4, C5 (strides 4, 8, 16, 32), for detection."""
        self._check_input(x)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        features = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            features.append(x)
        return features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)[-1]
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _out_size(module: nn.Module, n: int) -> int:
    """Spatial output size of a Conv2d or pooling layer along one (square) dimension."""

    def first(v):
        return v[0] if isinstance(v, tuple) else v

    dilation = first(getattr(module, "dilation", 1))
    kernel, stride, padding = (
        first(module.kernel_size),
        first(module.stride),
        first(module.padding),
    )
    span = n + 2 * padding - dilation * (kernel - 1) - 1
    if getattr(module, "ceil_mode", False):
        return -(-span // stride) + 1
    return span // stride + 1


def _smallest_scconv_input(model: SCNet, n: int) -> int:
    """Through the network for an n x n input: the smallest SC-Conv input minus its pooling_r."""
    stem = list(model.conv1) if isinstance(model.conv1, nn.Sequential) else [model.conv1]
    for m in [*stem, model.maxpool]:
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d)):
            n = _out_size(m, n)
    margin = n
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            margin = min(margin, n - block.scconv.pooling_r)
            n = _out_size(block.scconv.k4[0], n)
            if block.avd:
                n = _out_size(block.avd_layer, n)
    return margin


def _min_input_size(model: SCNet, largest: int = 4096) -> int:
    for n in range(1, largest + 1):
        if _smallest_scconv_input(model, n) >= 0:
            return n
    raise ValueError(f"no input up to {largest} px fits this SCNet")


# ---------------------------------------------------------------------------------------------
# Weights


def _extract_state_dict(checkpoint) -> Mapping[str, torch.Tensor]:
    """Accept a bare state dict, {"state_dict": ...} / {"model": ...}, and DDP/compile prefixes."""
    if isinstance(checkpoint, Mapping):
        for key in ("state_dict", "model"):
            if key in checkpoint and isinstance(checkpoint[key], Mapping):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in checkpoint.values()
    ):
        raise ValueError("checkpoint holds no state dict (a mapping of names to tensors)")
    state = dict(checkpoint)
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


# The sentence of torch's weights-only error that names the object it refused to unpickle.
_REFUSED_GLOBAL = re.compile(r"WeightsUnpickler error:\s*(Unsupported global[^\n]+?\.)(\s|$)")


def unreadable_checkpoint_reason(path: str, error: Exception) -> str:
    """Why ``torch.load(path, weights_only=True)`` raised ``error``, in words for the user
    (torch's own messages suggest ``weights_only=False`` even for a file that is no checkpoint)."""
    if os.path.getsize(path) == 0:
        return "the file is empty"
    with open(path, "rb") as file:
        head = file.read(2)
    if not zipfile.is_zipfile(path):
        if head == b"PK":
            return "a damaged or truncated torch.save archive (no zip central directory)"
        if len(head) == 2 and head[:1] == b"\x80" and head != b"\x80\x02":
            # torch.save writes a zip archive, or (legacy format) pickles of protocol 2.
            return f"a pickle of protocol {head[1]}, not a file written by torch.save"
        if head[:1] != b"\x80":
            return "not a file written by torch.save"
    if isinstance(error, pickle.UnpicklingError):
        refused = _REFUSED_GLOBAL.search(str(error))
        if refused:
            return (
                "it holds Python objects that weights-only loading refuses; scconv reads only "
                f"tensors and plain containers ({refused[1]})"
            )
        # Anything else the unpickler trips on ("Unsupported operand 0") is damaged data.
        detail = re.search(r"WeightsUnpickler error:\s*([^\n]*\S)", str(error))
        return "its pickled data is damaged" + (f" ({detail[1]})" if detail else "")
    first_line = str(error).split("\n", 1)[0]
    detail = f"{type(error).__name__}: {first_line}" if first_line else type(error).__name__
    if not zipfile.is_zipfile(path):  # torch.save's legacy format, which ends early or is broken
        return f"a damaged or truncated torch.save file of the legacy format ({detail})"
    return detail


def _load_checkpoint_file(path: str, shown_as: str):
    """``torch.load`` of a local file, tensors and plain containers only; ``ValueError`` saying
    why a file cannot be read, naming it as ``shown_as``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = unreadable_checkpoint_reason(path, error)
        raise ValueError(f"{shown_as} is not a readable torch checkpoint: {reason}") from error


# The official files' names hold the first hex digits of their SHA-256 ("scnet50-dc6a7e87.pth").
_OFFICIAL_FILE_NAMES = frozenset(os.path.basename(url) for url in OFFICIAL_URLS.values())


def _download_checkpoint(url: str, name: str) -> str:
    """The local copy of ``url`` in torch hub's checkpoint cache, downloaded if absent (torch
    downloads to a temporary file and renames it: no half-written file is left in the cache).

    A file named like an official checkpoint, from any host, is checked against the SHA-256
    prefix in its name when it is downloaded, and cached under that name (as torchvision
    caches its weights). Any other URL is cached under a name that holds a digest of the whole
    URL, so two URLs ending in the same file name (``.../model.pth``) never share a copy.
    """
    file_name = os.path.basename(urllib.parse.urlparse(url).path)
    if not file_name:
        raise ValueError(f"the URL {url!r} names no file (its path ends in '/' or is empty)")
    official = file_name in _OFFICIAL_FILE_NAMES
    if not official:
        file_name = f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{file_name}"
    cache = os.path.join(torch.hub.get_dir(), "checkpoints")
    os.makedirs(cache, exist_ok=True)
    path = os.path.join(cache, file_name)
    if os.path.exists(path):
        return path
    hash_prefix = torch.hub.HASH_REGEX.search(file_name)[1] if official else None
    try:
        torch.hub.download_url_to_file(url, path, hash_prefix, progress=False)
    except urllib.error.URLError as error:  # no network, DNS, HTTP status: not a cache error
        reason = error if isinstance(error, urllib.error.HTTPError) else error.reason
        raise OSError(f"cannot download the checkpoint of {name} from {url}: {reason}") from error
    except RuntimeError as error:  # the SHA-256 of what arrived does not match the file name
        raise ValueError(f"the checkpoint of {name} from {url} is corrupt: {error}") from error
    return path


def _read_checkpoint(source: str | os.PathLike, name: str):
    if source == "official":
        if name not in OFFICIAL_URLS:
            raise ValueError(
                f"no official checkpoint for {name!r}; released: {', '.join(OFFICIAL_URLS)}"
            )
        source = OFFICIAL_URLS[name]
    if source.startswith(("http://", "https://")):
        path = _download_checkpoint(source, name)
        try:
            return _load_checkpoint_file(path, f"{source!r} (downloaded to {path!r})")
        except ValueError as error:
            # A later call downloads again rather than reading the bad copy (which another
            # process may have deleted already).
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            raise ValueError(f"{error}; the downloaded copy was deleted") from error.__cause__
    if os.path.isdir(source):
        raise IsADirectoryError(f"checkpoint {source!r} is a directory, not a checkpoint file")
    if not os.path.isfile(source):
        raise FileNotFoundError(f"checkpoint {source!r} does not exist")
    return _load_checkpoint_file(source, repr(source))


def load_weights(model: nn.Module, source, name: str | None = None) -> nn.Module:
    """Load ``source`` into ``model`` strictly and return the model.

    ``source`` is a path, an http(s) URL, ``"official"`` (the paper's released checkpoint for
    ``name``), or an already loaded checkpoint/state dict. Any missing or unexpected key or wrong
    shape raises ``ValueError`` naming the model and the first offending keys.
    """
    name = name or getattr(model, "arch", type(model).__name__)
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    checkpoint = _read_checkpoint(source, name) if isinstance(source, str) else source
    try:
        state = _extract_state_dict(checkpoint)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = [
        f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''} ({len(keys)} in all)"
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("wrong shapes", wrong_shape),
        )
        if keys
    ]
    if problems:
        raise ValueError(f"checkpoint does not fit {name}: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)
    return model


# ---------------------------------------------------------------------------------------------
# Constructors and the registry

_SCNET_CONFIGS = {
    "scnet50": dict(layers=(3, 4, 6, 3), deep_stem=False, stem_width=32, avg_down=False, avd=False),
    "scnet101": dict(
        layers=(3, 4, 23, 3), deep_stem=False, stem_width=64, avg_down=False, avd=False
    ),
    "scnet50_v1d": dict(
        layers=(3, 4, 6, 3), deep_stem=True, stem_width=32, avg_down=True, avd=True
    ),
    "scnet101_v1d": dict(
        layers=(3, 4, 23, 3), deep_stem=True, stem_width=64, avg_down=True, avd=True
    ),
}


def _build_scnet(arch: str, weights=None, gate=None, **kwargs) -> SCNet:
    model = SCNet(SCBottleneck, **{**_SCNET_CONFIGS[arch], **kwargs}, gate=gate)
    model.arch = arch
    if weights is not None:
        load_weights(model, weights, arch)
    return model


def scnet50(weights=None, gate=None, **kwargs) -> SCNet:
    """SCNet-50 (25.56 M parameters, 3.93 GMACs at 224 px)."""
    return _build_scnet("scnet50", weights, gate, **kwargs)


def scnet101(weights=None, gate=None, **kwargs) -> SCNet:
    """SCNet-101 (44.57 M parameters, 7.17 GMACs at 224 px)."""
    return _build_scnet("scnet101", weights, gate, **kwargs)


def scnet50_v1d(weights=None, gate=None, **kwargs) -> SCNet:
    """SCNet-50 v1d: deep stem, avg_down and avd (25.58 M parameters, 4.69 GMACs at 224 px)."""
    return _build_scnet("scnet50_v1d", weights, gate, **kwargs)


def scnet101_v1d(weights=None, gate=None, **kwargs) -> SCNet:
    """SCNet-101 v1d: deep stem, avg_down and avd (44.69 M parameters, 9.04 GMACs at 224 px)."""
    return _build_scnet("scnet101_v1d", weights, gate, **kwargs)


def _torchvision_resnet(arch: str) -> Callable[..., nn.Module]:
    def build(weights=None, gate=None, **kwargs) -> nn.Module:
        if gate is not None:
            raise ValueError(f"{arch} has no SC-Conv, so it takes no gate (got gate={gate!r})")
        model = getattr(torchvision.models, arch)(weights=None, **kwargs)
        model.arch = arch
        if weights == "official":
            # torchvision's own ImageNet weights play the role of the "official" baseline.
            weights = torchvision.models.get_model_weights(arch).IMAGENET1K_V1.url
        if weights is not None:
            load_weights(model, weights, arch)
        return model

    build.__doc__ = f"torchvision's {arch} (the baseline); weights: path, URL or 'official'."
    return build


_MODELS: dict[str, Callable[..., nn.Module]] = {
    "scnet50": scnet50,
    "scnet101": scnet101,
    "scnet50_v1d": scnet50_v1d,
    "scnet101_v1d": scnet101_v1d,
    "resnet50": _torchvision_resnet("resnet50"),
    "resnet101": _torchvision_resnet("resnet101"),
}


def list_models() -> list[str]:
    """Names accepted by ``create_model``."""
    return sorted(_MODELS)


def create_model(name: str, weights=None, gate=None, **kwargs) -> nn.Module:
    """Build the model ``name`` (see ``list_models()``); ``gate`` applies to SCNets only."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available models: {', '.join(list_models())}")
    return _MODELS[name](weights=weights, gate=gate, **kwargs)


def set_gate(model: nn.Module, name: str) -> nn.Module:
    """Switch every SC-Conv of ``model`` to the gating implementation ``name``, in place.

    Parameters and state-dict keys are untouched. Returns ``model``.
    """
    check_gate(name)
    convs = [m for m in model.modules() if isinstance(m, SCConv)]
    if not convs:
        raise ValueError(f"{type(model).__name__} has no SCConv modules to switch")
    for m in convs:
        m.gate = name
    if isinstance(model, SCNet):
        model.gate = name
    return model
