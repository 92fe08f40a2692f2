"""scconv: Self-Calibrated Convolutions (SCNet) with fused Triton gating kernels."""

from scconv.gating import GATES, sc_gate
from scconv.inference import fold_batchnorm, optimize_for_inference
from scconv.models import (
    SCNet,
    create_model,
    list_models,
    load_weights,
    scnet50,
    scnet50_v1d,
    scnet101,
    scnet101_v1d,
    set_gate,
)
from scconv.modules import SCBottleneck, SCConv

__all__ = [
    "GATES",
    "SCBottleneck",
    "SCConv",
    "SCNet",
    "create_model",
    "fold_batchnorm",
    "list_models",
    "load_weights",
    "optimize_for_inference",
    "scnet50",
    "scnet50_v1d",
    "scnet101",
    "scnet101_v1d",
    "sc_gate",
    "set_gate",
]
