"""Parameter and MAC counts of the model zoo (``python -m scconv summary``)."""

import pandas as pd
import torch
from torch.utils.flop_counter import FlopCounterMode

from scconv.models import create_model, list_models


def count(name: str, size: int = 224) -> dict:
    """Parameters (millions) and multiply-accumulates (GMACs) of one forward at ``size`` px.

    The model runs on the meta device: shapes only, no memory and no arithmetic.
    """
    with torch.device("meta"):
        model = create_model(name).eval()
        images = torch.empty(1, 3, size, size)
    with FlopCounterMode(display=False) as counter:
        model(images)
    return {
        "model": name,
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        # FlopCounterMode counts a multiply-add as two FLOPs.
        "GMACs": counter.get_total_flops() / 2 / 1e9,
        "input": f"{size}x{size}",
    }


def summary(names=None, size: int = 224) -> pd.DataFrame:
    """One row per model: parameters and GMACs (``names`` defaults to every model)."""
    return pd.DataFrame([count(name, size) for name in (names or list_models())])
