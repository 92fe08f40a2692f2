"""Launch configurations of the gating kernels: autotune search spaces and stored winners.

Two sources of a configuration, in this order:

1. the table of stored winners, ``kernels/tuned_configs.json``, written by the benchmark sweep
   (``bench/sweep.py``) on a GPU. Layout::

       {gpu_name: {kernel: {table_key: {"kwargs": {...}, "num_warps": w, "num_stages": s}}}}

   with ``gpu_name`` as ``torch.cuda.get_device_name()`` reports it, ``kernel`` one of
   :data:`KERNELS` and ``table_key`` from :func:`table_key`. A shape found there launches that
   configuration directly, with no autotuning;
2. ``triton.autotune`` over :func:`search_space`, narrowed to the configurations that suit the
   tensor layout (:func:`prune_for_layout`), for shapes missing from the table.

Under Triton's interpreter there is exactly one configuration (:func:`interpreter_config`): the
autotuner cannot time configurations without a GPU ("0 active drivers").

No configuration here has been timed on a GPU yet (the machines that wrote this had none); the
lists are starting points for the sweep, sized by the reasoning in each comment.
"""

import json
import math
import os
import tempfile
from pathlib import Path

import torch
import triton

KERNELS = ("forward", "backward")
TUNED_TABLE_PATH = Path(__file__).with_name("tuned_configs.json")

# Meta-parameters each kernel takes from a configuration (and the table's "kwargs" must hold).
META_PARAMETERS = {
    "forward": ("BLOCK_C", "BLOCK_HW"),
    "backward": ("BLOCK_C", "BLOCK_Q"),
}


def _check_kernel(kernel: str) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; kernels are {', '.join(KERNELS)}")


def _plane_configs(kernel: str) -> list[triton.Config]:
    """Tiles long along H*W: for layouts whose spatial plane is contiguous (NCHW)."""
    if kernel == "forward":
        # (BLOCK_C, BLOCK_HW): 1024-4096 elements per program; 128 threads x 8 bf16 (one 16-byte
        # vector each) cover 1024 contiguous elements. Small planes (7x7, 14x14) take more channels.
        shapes = [(1, 1024), (2, 1024), (4, 1024), (1, 2048), (4, 256), (8, 256), (16, 64)]
        shapes += [(32, 64)]
        return [triton.Config({"BLOCK_C": c, "BLOCK_HW": s}, num_warps=4) for c, s in shapes] + [
            triton.Config({"BLOCK_C": 2, "BLOCK_HW": 2048}, num_warps=8)
        ]
    # backward (BLOCK_C, BLOCK_Q): a row of BLOCK_Q k2 columns covers BLOCK_Q * r contiguous x
    # columns (56 = 14 * 4 for layer1 at 224 px), looped over the r rows of each k2 row; narrow
    # k2 (w = 3 or 1 in layers 3 and 4) takes more channels instead.
    shapes = [(1, 16), (2, 16), (4, 16), (8, 8), (16, 4), (32, 2), (64, 1)]
    return [triton.Config({"BLOCK_C": c, "BLOCK_Q": q}, num_warps=4) for c, q in shapes]


def _uniform_footprint_configs() -> list[triton.Config]:
    """Backward tiles of 4 elements per thread, for NCHW planes whose k2 columns all cover 4 x
    columns (layers 1 and 2: UNIFORM_W in kernels/gate.py): a thread then gets 4 consecutive
    columns, one 8-byte bf16 or 16-byte fp32 access, where the plane tiles (64-256 elements per
    row step for 4 warps) give 2- or 4-byte ones (kernels/codegen.py shows it). 512 elements per
    row step for 4 warps, 256 for 2."""
    wide = [(8, 16, 4), (16, 8, 4), (32, 4, 4), (8, 8, 2)]
    return [triton.Config({"BLOCK_C": c, "BLOCK_Q": q}, num_warps=w) for c, q, w in wide]


def _channel_configs(kernel: str) -> list[triton.Config]:
    """Tiles long along C: for channels_last, where each pixel's channels are contiguous."""
    if kernel == "forward":
        # SCNet's gated C is 32-256 per stage: cover it in one or two blocks. Layer1's C = 32
        # fits only BLOCK_C 32: (32, 32) alone would leave its largest gate nothing to choose
        # from, so it also gets the 2048 and 4096 elements per program the plane tiles try.
        shapes = [(32, 32), (64, 16), (64, 32), (128, 8), (128, 16), (256, 8)]
        shapes += [(32, 64)]
        channel = [triton.Config({"BLOCK_C": c, "BLOCK_HW": s}, num_warps=4) for c, s in shapes]
        return channel + [triton.Config({"BLOCK_C": 32, "BLOCK_HW": 128}, num_warps=8)]
    shapes = [(32, 4), (64, 2), (64, 4), (128, 1), (128, 2), (256, 1)]
    channel = [triton.Config({"BLOCK_C": c, "BLOCK_Q": q}, num_warps=4) for c, q in shapes]
    # Layer1's C = 32 takes at most BLOCK_C 32: (32, 4) on 4 warps gives a thread 4 channels, an
    # 8-byte bf16 access; these two give it 8, a 16-byte one (kernels/codegen.py shows it).
    return channel + [
        triton.Config({"BLOCK_C": 32, "BLOCK_Q": 8}, num_warps=4),
        triton.Config({"BLOCK_C": 32, "BLOCK_Q": 4}, num_warps=2),
    ]


def _families(kernel: str) -> dict[str, list[triton.Config]]:
    """The search space by family: "plane" (NCHW), "uniform" (NCHW backward with uniform
    footprints, besides the plane tiles) and "channel" (channels_last). A configuration may be
    in more than one."""
    families = {"plane": _plane_configs(kernel)}
    if kernel == "backward":
        families["uniform"] = _uniform_footprint_configs()
    families["channel"] = _channel_configs(kernel)
    return families


def search_space(kernel: str) -> list[triton.Config]:
    """Every configuration the sweep may time for ``kernel`` ("forward" or "backward"), each
    once."""
    _check_kernel(kernel)
    unique = {}
    for family in _families(kernel).values():
        for config in family:
            unique.setdefault(_config_id(config), config)
    return list(unique.values())


def interpreter_config(kernel: str) -> triton.Config:
    """The one configuration used under Triton's interpreter.

    The interpreter's cost is per program and per operation far more than per element, so tiles
    are large: the backward of a 1x32x32x32 gate (8x8 k2) took 3.1 s with 4x16 k2 pixels per
    program and 0.4 s with 64x16 (2-core CPU, triton 3.8).
    """
    _check_kernel(kernel)
    if kernel == "forward":
        return triton.Config({"BLOCK_C": 64, "BLOCK_HW": 512}, num_warps=4)
    return triton.Config({"BLOCK_C": 64, "BLOCK_Q": 16}, num_warps=4)


def autotune_configs(kernel: str, interpreted: bool) -> list[triton.Config]:
    """The list handed to ``triton.autotune``: one config under the interpreter, else all."""
    return [interpreter_config(kernel)] if interpreted else search_space(kernel)


def _config_id(config: triton.Config) -> tuple:
    return (tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages)


def _next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def prune_for_layout(kernel: str):
    """An ``early_config_prune`` for ``kernel``: keep the family that suits x's layout.

    Channels-contiguous x (``stride_xc == 1``, channels_last) gets the channel tiles, everything
    else the plane tiles, and the NCHW backward with uniform footprints (``UNIFORM_W``) the
    uniform-footprint tiles too; tiles more than a power of two larger than the tensor are
    dropped (they would only add masked lanes), keeping at least one configuration.
    """
    _check_kernel(kernel)
    ids = {name: {_config_id(c) for c in family} for name, family in _families(kernel).items()}
    spatial_block = "BLOCK_HW" if kernel == "forward" else "BLOCK_Q"

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        # The kernels receive x's channel stride divided by their PLANE_ALIGN or ROW_ALIGN.
        stride_xc = args["stride_xc"] * args.get("PLANE_ALIGN", args.get("ROW_ALIGN", 1))
        if stride_xc == 1 and args["C"] > 1:
            wanted = ids["channel"]
        elif args.get("UNIFORM_W"):
            wanted = ids["plane"] | ids["uniform"]
        else:
            wanted = ids["plane"]
        family = [c for c in configs if _config_id(c) in wanted] or list(configs)
        spatial = args["H"] * args["W"] if kernel == "forward" else args["w"]
        fitting = [
            c
            for c in family
            if c.kwargs["BLOCK_C"] <= _next_pow2(args["C"])
            and c.kwargs[spatial_block] <= _next_pow2(spatial)
        ]
        if fitting:
            return fitting
        return [min(family, key=lambda c: c.kwargs["BLOCK_C"] * c.kwargs[spatial_block])]

    return prune


def layout_name(t: torch.Tensor) -> str:
    """ "contiguous" (NCHW), "channels_last", or "strided" (any other strides, e.g. slices)."""
    if t.is_contiguous():
        return "contiguous"
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "strided"


def table_key(x: torch.Tensor, k2: torch.Tensor) -> str:
    """The table key of a gating call, e.g. ``"bfloat16|256,32,56,56|14,14|channels_last"``."""
    dtype = str(x.dtype).removeprefix("torch.")
    sizes = ",".join(str(s) for s in x.shape)
    small = ",".join(str(s) for s in k2.shape[-2:])
    return f"{dtype}|{sizes}|{small}|{layout_name(x)}"


def load_table(path=None) -> dict:
    """The stored winners table (``{}`` if the file does not exist)."""
    path = Path(path) if path is not None else TUNED_TABLE_PATH
    if not path.exists():
        return {}
    try:
        table = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"tuned config table {path} is not valid JSON: {err}") from err
    if not isinstance(table, dict):
        raise ValueError(f"tuned config table {path} must hold a JSON object, got {type(table)}")
    return table


def save_table(table: dict, path=None) -> None:
    """Write ``table`` as JSON atomically (temporary file in the same folder, then rename)."""
    if not isinstance(table, dict):
        raise TypeError(f"table must be a dict, got {type(table).__name__}")
    path = Path(path) if path is not None else TUNED_TABLE_PATH
    text = json.dumps(table, indent=1, sort_keys=True) + "\n"
    # Hidden, like bench.common's temporaries: a run stopped mid-write leaves nothing visible.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make the table private
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def config_to_entry(config: triton.Config) -> dict:
    """A table entry for ``config`` (the inverse of :func:`entry_to_config`)."""
    return {
        "kwargs": dict(config.kwargs),
        "num_warps": config.num_warps,
        "num_stages": config.num_stages,
    }


def entry_to_config(kernel: str, entry: dict, where: str = "table entry") -> triton.Config:
    """The ``triton.Config`` of a table entry; ``ValueError`` naming ``where`` if malformed."""
    _check_kernel(kernel)
    wanted = set(META_PARAMETERS[kernel])
    kwargs = entry.get("kwargs") if isinstance(entry, dict) else None
    valid = isinstance(kwargs, dict) and set(kwargs) == wanted
    if valid:
        num_warps, num_stages = entry.get("num_warps"), entry.get("num_stages")
        # Every value a positive integer (JSON's true is an int to Python: refused too).
        valid = all(type(v) is int and v > 0 for v in (*kwargs.values(), num_warps, num_stages))
    if not valid:
        raise ValueError(
            f"{where}: expected {{'kwargs': {{{', '.join(sorted(wanted))}}}, 'num_warps', "
            f"'num_stages'}} of positive integers, got {entry!r}"
        )
    return triton.Config(dict(kwargs), num_warps=num_warps, num_stages=num_stages)


_table_cache: dict = {}  # path -> (mtime_ns, table)


def lookup(kernel: str, gpu_name: str, key: str, path=None) -> triton.Config | None:
    """The stored winner for (gpu_name, kernel, key), or ``None`` when the table has none.

    The file is re-read only when its modification time changes, so a sweep that rewrites the
    table is seen by the next launch in the same process.
    """
    _check_kernel(kernel)
    path = Path(path) if path is not None else TUNED_TABLE_PATH
    try:
        mtime = path.stat().st_mtime_ns
    except FileNotFoundError:
        return None
    cached = _table_cache.get(path)
    if cached is None or cached[0] != mtime:
        cached = (mtime, load_table(path))
        _table_cache[path] = cached
    entry = cached[1].get(gpu_name, {}).get(kernel, {}).get(key)
    if entry is None:
        return None
    return entry_to_config(kernel, entry, where=f"{path} [{gpu_name!r}][{kernel!r}][{key!r}]")
