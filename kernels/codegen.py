"""Compile the Triton kernels for a GPU target, with or without a GPU, to read what it would run.

``triton.compile`` with an explicit ``GPUTarget`` needs no driver, so the CPU machines can check
the PTX (vector width of loads and stores) and, through ptxas, registers and spills. The kernel
arguments are built by the launchers' own ``*_launch_arguments`` functions (the gating kernels'
in ``kernels.gate``, the fused inference kernels' in ``kernels.fused``) and specialised as a
launch would be (integers equal to 1 become constants, integers and pointers divisible by 16 are
marked so), so the code read here is the code a launch of the same tensors compiles.

The kernels must be built compiled, not interpreted::

    TRITON_INTERPRET=0 python -m kernels.codegen          # SCNet-50 shapes, bfloat16, sm_90
"""

import argparse
import re
import shutil
import subprocess
import tempfile
from collections import Counter

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels import configs, fused, gate

_TRITON_TYPES = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.float64: "fp64",
}


def _specialise(fn, args, constexprs):
    """Triton's launch-time specialisation of ``args`` as (signature, constexprs, attrs)."""
    signature, constants, attrs = {}, dict(constexprs), {}
    positional = [name for name in fn.arg_names if name not in constexprs]
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        value = args[positional.index(name)]
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _TRITON_TYPES[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]  # PyTorch allocations are aligned
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:
            signature[name] = "constexpr"
            constants[name] = 1
        else:
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, constants, attrs


def _require_compiled() -> None:
    if gate.INTERPRETED or fused.INTERPRETED:
        raise RuntimeError(
            "the kernels were built for Triton's interpreter; run with TRITON_INTERPRET=0 to "
            "compile them for a GPU target"
        )


def _launch(kernel: str, x, k2, k3):
    """(kernel function, positional arguments, constexprs) of a gating launch on these tensors,
    from the launchers' own argument builders."""
    if kernel == "forward":
        args, constexprs, _ = gate.forward_launch_arguments(x, k2, k3, gate.empty_like_layout(x))
        return gate._gate_forward_kernel, args, constexprs
    if kernel == "backward":
        outputs = [gate.empty_like_layout(t) for t in (torch.empty_like(x), x, k2, k3)]
        args, constexprs, _ = gate.backward_launch_arguments(outputs[0], x, k2, k3, *outputs[1:])
        return gate._gate_backward_kernel, args, constexprs
    raise ValueError(f"unknown kernel {kernel!r}; kernels are {', '.join(configs.KERNELS)}")


def pruned_configs(kernel: str, x, k2, k3) -> list[triton.Config]:
    """The configurations the autotuner would time for this launch: the search space through
    ``configs.prune_for_layout``, fed the arguments and constexprs the launcher passes."""
    fn, args, constexprs = _launch(kernel, x, k2, k3)
    tiles = configs.META_PARAMETERS[kernel]
    names = [name for name in fn.arg_names if name not in constexprs and name not in tiles]
    named = dict(zip(names, args, strict=True))
    return configs.prune_for_layout(kernel)(configs.search_space(kernel), named, **constexprs)


def compile_kernel(kernel: str, x, k2, k3, config: triton.Config, arch: int = 90):
    """Compile ``kernel`` ("forward" or "backward") for sm_``arch`` as a launch on these tensors.

    Tensors may be on the meta device (only shapes, strides and dtypes matter).
    """
    _require_compiled()
    fn, args, constexprs = _launch(kernel, x, k2, k3)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return _compile(fn, args, {**constexprs, **config.kwargs}, options, arch)


def compile_fused(kernel: str, a, b, arch: int = 90, r: int = 4):
    """Compile a kernel of ``kernels.fused`` for sm_``arch`` as its launcher would launch it:
    "relu_cat" on (a, b), "add_relu" on (x, residual), "relu_split_pool" on the merged tensor
    whose halves are a and b, with r x r windows. Meta tensors will do."""
    _require_compiled()
    if kernel == "relu_cat":
        fn = fused._relu_cat_kernel
        args, constexprs, _ = fused.relu_cat_launch_arguments(a, b, fused._relu_cat_empty(a, b))
    elif kernel == "add_relu":
        fn = fused._add_relu_kernel
        args, constexprs, _ = fused.add_relu_launch_arguments(a, b)
    elif kernel == "relu_split_pool":
        fn = fused._relu_split_pool_kernel
        m = fused._relu_cat_empty(a, b)  # the merged conv1 output: a's channels, then b's
        split = a.shape[1]
        outputs = fused._relu_split_pool_empty(m, split, r)
        args, constexprs, _ = fused.relu_split_pool_launch_arguments(m, split, r, *outputs)
    else:
        raise ValueError(
            f"unknown fused kernel {kernel!r}; they are relu_cat, add_relu, relu_split_pool"
        )
    return _compile(fn, args, constexprs, {"num_warps": fused.NUM_WARPS}, arch)


def _compile(fn, args, constexprs, options, arch):
    signature, constants, attrs = _specialise(fn, args, constexprs)
    source = ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def _ptxas() -> str | None:
    try:
        return triton.knobs.nvidia.ptxas.path
    except (AttributeError, RuntimeError):
        return shutil.which("ptxas")


def summary(compiled, arch: int = 90) -> dict:
    """Global load/store instructions by kind, and registers/spills if ptxas is at hand."""
    ptx = compiled.asm["ptx"]
    result = {
        "loads": dict(Counter(re.findall(r"ld\.global[\w.]*", ptx))),
        "stores": dict(Counter(re.findall(r"st\.global[\w.]*", ptx))),
        "registers": None,
        "spill_store_bytes": None,
    }
    ptxas = _ptxas()
    if ptxas:
        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
            f.write(ptx)
            f.flush()
            command = [ptxas, "-v", f"--gpu-name=sm_{arch}a", f.name, "-o", "/dev/null"]
            info = subprocess.run(command, capture_output=True, text=True).stderr
        registers = re.findall(r"Used (\d+) registers", info)
        spills = re.findall(r"(\d+) bytes spill stores", info)
        result["registers"] = int(registers[0]) if registers else None
        result["spill_store_bytes"] = int(spills[0]) if spills else None
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"])
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    # SCNet-50's gate shapes at 224 px (C, H, h), see DESIGN.md
    for channels, size, small in [(32, 56, 14), (64, 28, 7), (128, 14, 3), (256, 7, 1)]:
        for layout in (torch.contiguous_format, torch.channels_last):
            x, k2, k3 = (
                torch.empty(args.batch, channels, s, s, dtype=dtype, device="meta").contiguous(
                    memory_format=layout
                )
                for s in (size, small, size)
            )
            for kernel in configs.KERNELS:
                for config in pruned_configs(kernel, x, k2, k3):
                    info = summary(compile_kernel(kernel, x, k2, k3, config, args.arch), args.arch)
                    print(f"{kernel:8} {configs.table_key(x, k2):42} {config}: {info}")
            # The fused inference kernels on the same block's tensors (conv3's input halves, the
            # residual, conv1's output).
            for kernel in ("relu_cat", "add_relu", "relu_split_pool"):
                info = summary(compile_fused(kernel, x, x, args.arch), args.arch)
                print(f"{kernel:8} {configs.table_key(x, k2):42}: {info}")


if __name__ == "__main__":
    main()
