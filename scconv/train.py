"""Train and evaluate SCNets on ImageNet: the source article's command line, with this project's
options (gating implementation, mixed precision, channels-last, torch.compile, synthetic data).

    python -m scconv.train DIR [options]          (also installed as ``scconv-train``)

Option names and defaults are those of the article's ``--help`` (the PyTorch ImageNet example).
How processes are launched (``--multiprocessing-distributed``, ``torchrun`` or one process) is
decided once, in :func:`plan_launch`; everything a user can get wrong is checked before any
process is spawned or any model is built, and reported as ``scconv-train: error: ...`` with
exit status 2.

Checkpoints (``checkpoint.pth`` every epoch, ``model_best.pth`` when top-1 improves) are
written by rank 0 only, to a temporary file that is then renamed, so a crash never leaves a
truncated file. They hold ``state_dict`` (so :func:`scconv.load_weights` reads them),
``optimizer``, ``scheduler``, ``scaler``, ``epoch`` (epochs completed, i.e. the next epoch to run),
``best_acc1``, ``arch``, ``gate``, ``num_classes``, ``args`` and the RNG state.
"""

import argparse
import contextlib
import functools
import json
import math
import os
import random
import shutil
import socket
import sys
import time
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

import scconv
from kernels import runtime as kernels_runtime
from scconv import data as scdata
from scconv.gating import GATES, default_gate

PROG = "scconv-train"
CHECKPOINT_NAME = "checkpoint.pth"
BEST_NAME = "model_best.pth"
METRICS_NAME = "metrics.jsonl"
LOG_NAME = "train.log"
AMP_DTYPES = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}
# Variables torchrun sets in every process it starts.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")


class UsageError(Exception):
    """Bad input: reported as ``scconv-train: error: <message>`` and exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    archs = scconv.list_models()
    p = argparse.ArgumentParser(
        prog=PROG,
        description="PyTorch ImageNet Training (SCNet: self-calibrated convolutions)",
    )
    p.add_argument(
        "data",
        metavar="DIR",
        nargs="?",
        help="path to dataset (DIR/train and DIR/val in ImageFolder layout; not needed with "
        "--dummy)",
    )
    p.add_argument(
        "-a",
        "--arch",
        metavar="ARCH",
        default="scnet50",
        choices=archs,
        help=f"model architecture: {' | '.join(archs)} (default: scnet50)",
    )
    p.add_argument(
        "-j",
        "--workers",
        default=4,
        type=int,
        metavar="N",
        help="number of data loading workers (default: 4)",
    )
    p.add_argument(
        "--epochs",
        default=90,
        type=int,
        metavar="N",
        help="number of total epochs to run (default: 90)",
    )
    p.add_argument(
        "--start-epoch",
        default=0,
        type=int,
        metavar="N",
        help="manual epoch number (useful on restarts; --resume sets it from the checkpoint)",
    )
    p.add_argument(
        "-b",
        "--batch-size",
        default=256,
        type=int,
        metavar="N",
        help="mini-batch size (default: 256), this is the total batch size of all GPUs on the "
        "current node when using Distributed Data Parallel",
    )
    p.add_argument(
        "--lr",
        "--learning-rate",
        default=0.1,
        type=float,
        metavar="LR",
        dest="lr",
        help="initial learning rate (default: 0.1)",
    )
    p.add_argument(
        "--momentum", default=0.9, type=float, metavar="M", help="momentum (default: 0.9)"
    )
    p.add_argument(
        "--wd",
        "--weight-decay",
        default=1e-4,
        type=float,
        metavar="W",
        dest="weight_decay",
        help="weight decay (default: 1e-4)",
    )
    p.add_argument(
        "--lr-step-size",
        default=30,
        type=int,
        metavar="N",
        help="multiply the learning rate by --lr-gamma every N epochs (default: 30)",
    )
    p.add_argument(
        "--lr-gamma",
        default=0.1,
        type=float,
        metavar="G",
        help="learning-rate decay factor (default: 0.1)",
    )
    p.add_argument(
        "-p",
        "--print-freq",
        default=10,
        type=int,
        metavar="N",
        help="print frequency (default: 10)",
    )
    p.add_argument(
        "--resume",
        default="",
        type=str,
        metavar="PATH",
        help="path to latest checkpoint (default: none)",
    )
    p.add_argument(
        "-e",
        "--evaluate",
        action="store_true",
        help="evaluate model on validation set (DIR/val) and print top-1/top-5",
    )
    p.add_argument(
        "--pretrained",
        nargs="?",
        const="official",
        default=None,
        metavar="SOURCE",
        help="use pre-trained model: the official weights (no value, or 'official'), or a "
        "checkpoint path or URL; write it after DIR or as --pretrained=SOURCE",
    )
    p.add_argument(
        "--world-size",
        default=None,
        type=int,
        help="number of nodes for distributed training (with --multiprocessing-distributed; "
        "otherwise the number of processes). Default: 1, or WORLD_SIZE under torchrun",
    )
    p.add_argument(
        "--rank",
        default=None,
        type=int,
        help="node rank for distributed training (with --multiprocessing-distributed; "
        "otherwise the process rank). Default: 0, or RANK under torchrun",
    )
    p.add_argument(
        "--dist-url",
        default=None,
        type=str,
        help="url used to set up distributed training (default: env:// when MASTER_ADDR and "
        "MASTER_PORT are set, as torchrun does; otherwise, on one node, tcp://127.0.0.1 with "
        "a free port)",
    )
    p.add_argument(
        "--dist-backend",
        default=None,
        choices=("nccl", "gloo"),
        help="distributed backend (default: nccl with CUDA, gloo on the CPU)",
    )
    p.add_argument("--seed", default=None, type=int, help="seed for initializing training.")
    p.add_argument("--gpu", default=None, type=int, help="GPU id to use.")
    p.add_argument(
        "--multiprocessing-distributed",
        action="store_true",
        help="Use multi-processing distributed training to launch N processes per node, which "
        "has N GPUs (on a machine without GPUs: --nproc-per-node CPU processes). This is the "
        "fastest way to use PyTorch for either single node or multi node data parallel training",
    )
    p.add_argument(
        "--nproc-per-node",
        default=None,
        type=int,
        metavar="N",
        help="processes --multiprocessing-distributed starts on this node (default: the number "
        "of GPUs; 1 on a machine without GPUs)",
    )
    p.add_argument(
        "--gate",
        default=None,
        choices=GATES,
        help="SC-Conv gating implementation of SCNets (default: $SCCONV_GATE, else auto = "
        "triton on CUDA, eager on the CPU)",
    )
    p.add_argument(
        "--amp",
        default="none",
        choices=tuple(AMP_DTYPES),
        help="mixed precision through torch.autocast; fp16 adds a GradScaler (default: none)",
    )
    p.add_argument(
        "--channels-last", action="store_true", help="model and inputs in channels-last layout"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument(
        "--dummy",
        action="store_true",
        help="use synthetic data of ImageNet's size (random images and labels); DIR not needed",
    )
    p.add_argument(
        "--limit-batches",
        default=None,
        type=int,
        metavar="N",
        help="stop each training and validation pass after N batches (smoke tests, "
        "benchmarks; default: whole dataset)",
    )
    p.add_argument(
        "--image-size",
        default=224,
        type=int,
        metavar="N",
        help="train and val crop size; val resizes to N/0.875 first (default: 224)",
    )
    p.add_argument(
        "--num-classes",
        default=None,
        type=int,
        metavar="N",
        help="model outputs (default: the resumed checkpoint's, else 1000)",
    )
    p.add_argument(
        "--output",
        default=None,
        metavar="DIR",
        help="folder for checkpoints, metrics.jsonl and train.log (default: runs/ARCH)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run in an --output that holds another run, deleting its files "
        "(without it, such a folder is refused; --resume continues a run there)",
    )
    return p


# ---------------------------------------------------------------------------------------------
# Checking the input and planning the launch (before any process or model exists)


@dataclass
class Launch:
    """How this invocation runs: which processes, ranks, rendezvous and devices."""

    distributed: bool
    world_size: int
    rank: int  # this process's rank, or the first rank of this node when spawning
    spawn: int  # processes to start here with torch.multiprocessing (0: run in this process)
    procs_on_node: int  # processes sharing this node's batch (-b is per node)
    local_rank: int | None  # torchrun's LOCAL_RANK
    dist_url: str | None
    backend: str | None
    use_cuda: bool


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched_by_torchrun(environ=os.environ) -> bool:
    return all(name in environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def default_dist_url(single_node: bool, environ=os.environ) -> str:
    """``env://`` when a launcher set MASTER_ADDR/MASTER_PORT, else a free port on loopback.

    Never a public address: without a launcher, a rendezvous is only found on one node.
    """
    if "MASTER_ADDR" in environ and "MASTER_PORT" in environ:
        return "env://"
    if not single_node:
        raise UsageError(
            "a multi-node run needs --dist-url (e.g. tcp://HOST_OF_RANK_0:23456) or "
            "MASTER_ADDR/MASTER_PORT in the environment"
        )
    return f"tcp://127.0.0.1:{_free_loopback_port()}"


def plan_launch(args: argparse.Namespace, environ=os.environ) -> Launch:
    """Decide processes, ranks and rendezvous.

    - ``torchrun``: rank and world size come from RANK/WORLD_SIZE; --dist-url defaults to env://.
    - ``--multiprocessing-distributed``: --world-size counts nodes and --rank is the node rank
      (as in the article); this node starts --nproc-per-node processes (default: one per GPU,
      one on a machine without GPUs), so world size = nodes x processes per node.
    - otherwise one process; --world-size > 1 means processes started by hand, one per rank.
    """
    use_cuda = torch.cuda.is_available()
    if args.gpu is not None and not use_cuda:
        raise UsageError(f"--gpu {args.gpu} given but CUDA is not available")
    if use_cuda and args.gpu is not None and args.gpu >= torch.cuda.device_count():
        raise UsageError(f"--gpu {args.gpu}: only {torch.cuda.device_count()} GPU(s) are visible")
    backend = args.dist_backend or ("nccl" if use_cuda else "gloo")
    if backend == "nccl" and not use_cuda:
        raise UsageError("--dist-backend nccl needs CUDA; use gloo on the CPU")

    if args.gpu is not None and (args.multiprocessing_distributed or launched_by_torchrun(environ)):
        raise UsageError(
            "--gpu picks the GPU of a single process; --multiprocessing-distributed and torchrun "
            "give each process its own GPU (use CUDA_VISIBLE_DEVICES to choose them)"
        )
    if launched_by_torchrun(environ):
        if args.multiprocessing_distributed:
            raise UsageError(
                "--multiprocessing-distributed starts its own processes; do not combine it "
                "with torchrun"
            )
        world_size, rank = int(environ["WORLD_SIZE"]), int(environ["RANK"])
        for option, given, actual in (
            ("--world-size", args.world_size, world_size),
            ("--rank", args.rank, rank),
        ):
            if given is not None and given != actual:
                raise UsageError(f"{option} {given} disagrees with torchrun's value {actual}")
        local_rank = int(environ["LOCAL_RANK"])
        procs = int(environ.get("LOCAL_WORLD_SIZE", "1"))
        if use_cuda and local_rank >= torch.cuda.device_count():
            raise UsageError(
                f"torchrun started local rank {local_rank} but only "
                f"{torch.cuda.device_count()} GPU(s) are visible"
            )
        distributed = world_size > 1
        url = args.dist_url or "env://"
        return Launch(distributed, world_size, rank, 0, procs, local_rank, url, backend, use_cuda)

    if args.multiprocessing_distributed:
        nodes = 1 if args.world_size is None else args.world_size
        node_rank = 0 if args.rank is None else args.rank
        if nodes < 1 or not 0 <= node_rank < nodes:
            raise UsageError(f"--rank {node_rank} must be a node rank in [0, --world-size {nodes})")
        devices = torch.cuda.device_count() if use_cuda else 1
        procs = devices if args.nproc_per_node is None else args.nproc_per_node
        if procs < 1:
            raise UsageError("--nproc-per-node must be at least 1")
        if use_cuda and procs > devices:
            raise UsageError(
                f"--nproc-per-node {procs} exceeds the {devices} visible GPU(s): one process "
                "per GPU"
            )
        url = args.dist_url or default_dist_url(single_node=nodes == 1, environ=environ)
        return Launch(
            True, nodes * procs, node_rank * procs, procs, procs, None, url, backend, use_cuda
        )

    if args.nproc_per_node is not None:
        raise UsageError("--nproc-per-node is only used with --multiprocessing-distributed")
    world_size = 1 if args.world_size is None else args.world_size
    rank = 0 if args.rank is None else args.rank
    if world_size < 1 or not 0 <= rank < world_size:
        raise UsageError(f"--rank {rank} must be in [0, --world-size {world_size})")
    distributed = world_size > 1
    url = args.dist_url
    if distributed and url is None:
        if "MASTER_ADDR" not in environ or "MASTER_PORT" not in environ:
            raise UsageError(
                f"--world-size {world_size} without a launcher: give every process the same "
                "--dist-url (e.g. tcp://127.0.0.1:23456), or use torchrun or "
                "--multiprocessing-distributed"
            )
        url = "env://"
    return Launch(distributed, world_size, rank, 0, 1, None, url, backend, use_cuda)


def read_checkpoint(path: str, arch: str | None = None) -> dict:
    """Load a training checkpoint for --resume; raises ``UsageError`` naming what is wrong."""
    if not os.path.isfile(path):
        raise UsageError(f"--resume: no checkpoint found at {path!r}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable file gets the same user-facing message
        reason = scconv.models.unreadable_checkpoint_reason(path, error)
        raise UsageError(f"--resume: cannot read {path!r} as a checkpoint ({reason})") from None
    missing = [
        key
        for key in ("state_dict", "arch", "epoch", "optimizer")
        if not isinstance(checkpoint, dict) or key not in checkpoint
    ]
    if missing:
        raise UsageError(
            f"--resume: {path!r} is not a {PROG} checkpoint (missing {', '.join(missing)}); "
            "to start from bare weights use --pretrained"
        )
    if arch is not None and checkpoint["arch"] != arch:
        raise UsageError(
            f"--resume: {path!r} holds a {checkpoint['arch']} checkpoint, not {arch} "
            f"(pass -a {checkpoint['arch']} to continue it)"
        )
    return checkpoint


def make_output_folder(path: str) -> None:
    """Make ``--output`` (if missing); anything in the way is a ``UsageError`` that says what.

    ``main()`` calls it before any process is spawned, on the node that runs rank 0: made late by
    rank 0 alone, a failure got the other rank SIGTERMed by torch, and its DataLoader worker
    outlived it."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        if existing == os.path.abspath(path):
            raise UsageError(f"--output {path!r} exists and is not a folder")
        raise UsageError(f"--output {path!r} cannot be created: {existing!r} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--output {path!r}: no permission to write in {existing!r}")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        message = f"--output {path!r}: cannot create the folder ({error.strerror})"
        raise UsageError(message) from None


RUN_FILES = (CHECKPOINT_NAME, BEST_NAME, METRICS_NAME, LOG_NAME)


def claim_output_folder(args: argparse.Namespace, writes: bool = True) -> None:
    """Make ``--output`` and make sure a new run does not mix with an earlier one there.

    A run refuses a folder holding another run's files (its metrics would be emptied or mixed
    with the new ones, and its model_best.pth kept beside the new checkpoint) unless it resumes
    the checkpoint of that folder, or ``--overwrite`` is given: then they are deleted first.
    ``writes=False`` (the processes that are not rank 0, which write nothing there) only checks,
    where the folder is visible, so that they refuse with rank 0 instead of waiting for it at
    the rendezvous; with ``--overwrite`` they leave the deleting to rank 0."""
    if writes:
        make_output_folder(args.output)
    elif args.overwrite or not os.path.isdir(args.output):
        return
    resumed_folder = os.path.dirname(os.path.abspath(args.resume)) if args.resume else None
    if resumed_folder and os.path.samefile(resumed_folder, args.output):
        return  # continuing the run that is there
    found = [name for name in RUN_FILES if os.path.lexists(os.path.join(args.output, name))]
    if not found:
        return
    if not args.overwrite:
        raise UsageError(
            f"--output {args.output!r} holds another run ({', '.join(found)}): continue it with "
            f"--resume {os.path.join(args.output, CHECKPOINT_NAME)}, choose another --output, "
            "or pass --overwrite to delete those files and start over"
        )
    for name in found:
        path = os.path.join(args.output, name)
        try:
            os.remove(path)
        except OSError as error:
            raise UsageError(f"--overwrite: cannot delete {path!r} ({error.strerror})") from None


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict | None:
    """Validate everything that does not need a model; fills in resolved defaults.

    Returns the loaded --resume checkpoint (or None).
    """
    is_scnet = args.arch.startswith("scnet")
    if args.gate is not None and not is_scnet:
        raise UsageError(f"--gate applies to SCNets only; {args.arch} has no SC-Conv gating")
    if is_scnet:
        try:
            args.gate = args.gate or default_gate()
        except ValueError as error:
            raise UsageError(str(error)) from None
    if args.gate == "triton" and not torch.cuda.is_available():
        # kernels/ turns the interpreter on by itself unless the user switched it off.
        if not kernels_runtime.interpreter_requested():
            raise UsageError(
                "--gate triton without CUDA runs through Triton's interpreter, but "
                f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r}: unset it or set "
                "TRITON_INTERPRET=1 (slow; meant for tests)"
            )
    for option, value, least in (
        ("--epochs", args.epochs, 0),
        ("--start-epoch", args.start_epoch, 0),
        ("--batch-size", args.batch_size, 1),
        ("--workers", args.workers, 0),
        ("--print-freq", args.print_freq, 1),
        ("--lr-step-size", args.lr_step_size, 1),
        ("--image-size", args.image_size, 1),
        ("--lr", args.lr, 0),
        ("--momentum", args.momentum, 0),
        ("--wd", args.weight_decay, 0),
    ):
        if value < least:
            raise UsageError(f"{option} must be at least {least}, got {value}")
    if args.limit_batches is not None and args.limit_batches < 1:
        raise UsageError(f"--limit-batches must be at least 1, got {args.limit_batches}")
    if args.num_classes is not None and args.num_classes < 1:
        raise UsageError(f"--num-classes must be at least 1, got {args.num_classes}")

    if args.pretrained is not None and os.path.isdir(args.pretrained):
        raise UsageError(
            f"--pretrained took {args.pretrained!r} (a folder) as its weights; put DIR before "
            "--pretrained, or write --pretrained=official / --pretrained=PATH"
        )
    if (
        args.pretrained not in (None, "official")
        and "://" not in args.pretrained
        and not os.path.isfile(args.pretrained)
    ):
        raise UsageError(f"--pretrained: no weights file at {args.pretrained!r}")

    checkpoint = None
    if args.resume:
        checkpoint = read_checkpoint(args.resume, args.arch)
        saved_classes = checkpoint.get("num_classes")
        if args.num_classes is None:
            args.num_classes = saved_classes
        elif saved_classes is not None and saved_classes != args.num_classes:
            raise UsageError(
                f"--resume: {args.resume!r} has {saved_classes} classes, not --num-classes "
                f"{args.num_classes}"
            )
    if args.num_classes is None:
        args.num_classes = 1000

    if args.dummy:
        args.data = None
    elif args.data is None:
        parser.error("the following arguments are required: DIR (or use --dummy)")
    else:
        try:
            scdata.check_image_folders(args.data, args.evaluate, args.num_classes)
        except scdata.DataError as error:
            raise UsageError(str(error)) from None

    if args.output is None:
        args.output = os.path.join("runs", args.arch)
    return checkpoint


# ---------------------------------------------------------------------------------------------
# Progress in the PyTorch ImageNet example's format


class AverageMeter:
    """Latest value and running average, printed as ``name val (avg)``."""

    def __init__(self, name: str, fmt: str):
        self.name, self.fmt = name, fmt
        self.val = self.sum = 0.0
        self.count = 0

    def update(self, val: float, n: int = 1) -> None:
        self.val = val
        self.sum += val * n
        self.count += n

    @property
    def avg(self) -> float:
        return self.sum / max(self.count, 1)

    def __str__(self) -> str:
        return f"{self.name} {self.val:{self.fmt}} ({self.avg:{self.fmt}})"


class ProgressMeter:
    def __init__(self, num_batches: int, meters: list, prefix: str = ""):
        width = len(str(num_batches))
        self.batch_fmt = "[{:" + str(width) + "d}/" + str(num_batches) + "]"
        self.meters, self.prefix = meters, prefix

    def line(self, batch: int) -> str:
        return "\t".join(
            [self.prefix + self.batch_fmt.format(batch)] + [str(m) for m in self.meters]
        )


class Log:
    """Rank 0 prints (and appends to train.log when given one); other ranks stay quiet."""

    def __init__(self, enabled: bool, path: str | None = None):
        self.enabled, self.path = enabled, path

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        print(message, flush=True)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(message + "\n")


def correct_counts(output: torch.Tensor, target: torch.Tensor, topk=(1, 5)) -> list[int]:
    """Samples whose target is among the top-k outputs, for each k (k capped at the classes)."""
    maxk = min(max(topk), output.size(1))
    pred = output.topk(maxk, dim=1).indices
    hits = pred.eq(target[:, None])
    return [int(hits[:, : min(k, maxk)].any(dim=1).sum()) for k in topk]


# ---------------------------------------------------------------------------------------------
# Training and evaluation


@dataclass
class Context:
    """What a training process needs besides the model: device, precision, ranks, logging."""

    args: argparse.Namespace
    launch: Launch
    rank: int
    device: torch.device
    log: Log

    @property
    def amp_dtype(self):
        return AMP_DTYPES[self.args.amp]

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def to_device(self, images: torch.Tensor, target: torch.Tensor):
        images = images.to(self.device, non_blocking=True)
        if self.args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, target.to(self.device, non_blocking=True)

    def batches(self, loader) -> int:
        n = len(loader)
        return n if self.args.limit_batches is None else min(n, self.args.limit_batches)

    def all_sum(self, values: list[float]) -> list[float]:
        """Sum over all ranks (float64, so image counts stay exact)."""
        if not self.launch.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


class NonFiniteLoss(RuntimeError):
    pass


def train_one_epoch(loader, model, criterion, optimizer, scaler, epoch: int, ctx: Context):
    """One pass over ``loader``; returns summed ``loss, correct@1, correct@5, images, seconds``."""
    batch_time = AverageMeter("Time", "6.3f")
    data_time = AverageMeter("Data", "6.3f")
    losses = AverageMeter("Loss", ".4e")
    top1 = AverageMeter("Acc@1", "6.2f")
    top5 = AverageMeter("Acc@5", "6.2f")
    num_batches = ctx.batches(loader)
    progress = ProgressMeter(
        num_batches, [batch_time, data_time, losses, top1, top5], prefix=f"Epoch: [{epoch}]"
    )
    model.train()
    sums = [0.0, 0.0, 0.0, 0.0]
    start = end = time.perf_counter()
    for i, (images, target) in enumerate(loader):
        if i >= num_batches:
            break
        data_time.update(time.perf_counter() - end)
        images, target = ctx.to_device(images, target)
        with ctx.autocast():
            output = model(images)
            loss = criterion(output, target)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise NonFiniteLoss(
                f"loss is {loss_value} at epoch {epoch}, batch {i + 1}; lower --lr or use "
                "--amp none/bf16"
            )
        _record_batch(output.detach(), target, loss_value, (losses, top1, top5), sums)
        batch_time.update(time.perf_counter() - end)
        end = time.perf_counter()
        if i % ctx.args.print_freq == 0 or i + 1 == num_batches:
            ctx.log(progress.line(i + 1))
    return ctx.all_sum(sums) + [time.perf_counter() - start]


def _record_batch(output, target, loss_value: float, meters, sums: list) -> None:
    """Add one batch's mean loss and top-1/top-5 hits to the (loss, top1, top5) meters and to
    ``sums`` = [loss * images, top-1 hits, top-5 hits, images] (summed over ranks later)."""
    losses, top1, top5 = meters
    n = target.size(0)
    c1, c5 = correct_counts(output, target)
    losses.update(loss_value, n)
    top1.update(100.0 * c1 / n, n)
    top5.update(100.0 * c5 / n, n)
    for j, v in enumerate((loss_value * n, c1, c5, n)):
        sums[j] += v


@torch.no_grad()
def validate(loader, model, criterion, ctx: Context) -> dict:
    """Top-1/top-5 and loss over the whole validation set (summed over all ranks)."""
    batch_time = AverageMeter("Time", "6.3f")
    losses = AverageMeter("Loss", ".4e")
    top1 = AverageMeter("Acc@1", "6.2f")
    top5 = AverageMeter("Acc@5", "6.2f")
    num_batches = ctx.batches(loader)
    progress = ProgressMeter(num_batches, [batch_time, losses, top1, top5], prefix="Test: ")
    model.eval()
    sums = [0.0, 0.0, 0.0, 0.0]
    end = time.perf_counter()
    for i, (images, target) in enumerate(loader):
        if i >= num_batches:
            break
        images, target = ctx.to_device(images, target)
        with ctx.autocast():
            output = model(images)
            loss = criterion(output, target)
        _record_batch(output, target, loss.item(), (losses, top1, top5), sums)
        batch_time.update(time.perf_counter() - end)
        end = time.perf_counter()
        if i % ctx.args.print_freq == 0 or i + 1 == num_batches:
            ctx.log(progress.line(i + 1))
    loss_sum, c1, c5, n = ctx.all_sum(sums)
    n = max(n, 1)
    result = {"loss": loss_sum / n, "acc1": 100.0 * c1 / n, "acc5": 100.0 * c5 / n, "images": n}
    ctx.log(f" * Acc@1 {result['acc1']:.3f} Acc@5 {result['acc5']:.3f}")
    return result


def _atomic_write(write, path: str) -> None:
    """Call ``write(tmp_path)``, then rename over ``path``: readers see the old or the new file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(state: dict, is_best: bool, output: str) -> str:
    """Write ``output/checkpoint.pth`` (and ``model_best.pth`` if best) atomically."""
    path = os.path.join(output, CHECKPOINT_NAME)
    _atomic_write(lambda tmp: torch.save(state, tmp), path)
    if is_best:
        _atomic_write(lambda tmp: shutil.copyfile(path, tmp), os.path.join(output, BEST_NAME))
    return path


def _rewrite_metrics(path: str, keep_before_epoch: int) -> None:
    """Keep the metrics of epochs before ``keep_before_epoch`` (a resumed run rewrites the rest)."""
    kept = []
    if keep_before_epoch > 0 and os.path.exists(path):
        with open(path) as f:
            for line in f:
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if record.get("epoch", math.inf) < keep_before_epoch:
                        kept.append(json.dumps(record) + "\n")

    def write(tmp):
        with open(tmp, "w") as f:
            f.writelines(kept)

    _atomic_write(write, path)


def _append_metrics(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        # The training GPU's generator only: the run may resume on a machine with fewer GPUs
        # (set_rng_state_all would then index a GPU that is not there) or on another --gpu.
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def build_model(args: argparse.Namespace) -> nn.Module:
    kwargs = {"num_classes": args.num_classes}
    if args.gate is not None:
        kwargs["gate"] = args.gate
    try:
        model = scconv.create_model(args.arch, weights=args.pretrained, **kwargs)
    except (OSError, RuntimeError, ValueError, KeyError) as error:
        if args.pretrained is None:
            raise
        raise UsageError(
            f"--pretrained {args.pretrained}: cannot load weights into {args.arch} with "
            f"{args.num_classes} classes ({error})"
        ) from None
    check_image_size(model, args)
    return model


def images_per_process(args: argparse.Namespace, launch: Launch) -> int:
    """The per-process batch (``-b`` is the total over the node's processes)."""
    per_process = args.batch_size // launch.procs_on_node
    if per_process < 1:
        raise UsageError(
            f"--batch-size {args.batch_size} is smaller than the {launch.procs_on_node} "
            "processes on this node (it is the total over the node)"
        )
    return per_process


def shape_model(args: argparse.Namespace) -> nn.Module:
    """``args.arch`` on the meta device, in eval mode: its shapes without memory or arithmetic
    (built once per arch and class count; callers must leave it as they found it)."""
    return _shape_model(args.arch, args.num_classes)


@functools.lru_cache(maxsize=4)
def _shape_model(arch: str, num_classes: int) -> nn.Module:
    # The eager gate whatever --gate says: shapes are the same, and the fused op is not needed.
    gate = {"gate": "eager"} if arch.startswith("scnet") else {}
    with torch.device("meta"):
        return scconv.create_model(arch, num_classes=num_classes, **gate).eval()


def check_image_size(model: nn.Module, args: argparse.Namespace) -> None:
    min_size = getattr(model, "min_input_size", None)
    if min_size is not None and args.image_size < min_size:
        raise UsageError(
            f"--image-size {args.image_size} is too small for {args.arch}: its stage-4 maps "
            f"must stay at least pooling_r wide (needs >= {min_size})"
        )


def one_value_batchnorm(model: nn.Module, image_size: int) -> str | None:
    """The first BatchNorm of ``model`` (on the meta device: ``shape_model``) that sees one value
    per channel for one image of ``image_size`` px, or None. Training mode refuses such a batch:
    an SCNet's k2 branch pools layer4's map to 1x1 up to 224 px (a ResNet's last maps are 1x1
    only up to 32 px)."""
    found = []

    def hook_for(name):
        def note(module, inputs):
            if inputs[0].numel() == inputs[0].shape[1] and not found:
                found.append(name)

        return note

    hooks = [
        module.register_forward_pre_hook(hook_for(name))
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
    ]
    try:
        with torch.no_grad():
            model(torch.empty(1, 3, image_size, image_size, device="meta"))
    finally:
        for hook in hooks:
            hook.remove()
    return found[0] if found else None


def min_train_batch(args: argparse.Namespace) -> tuple[int, str | None]:
    """Fewest images a training batch of ``args.arch`` at ``args.image_size`` can hold (1 or 2),
    and the BatchNorm that sets it (None for 1). Cached: main() and run() share one answer
    in one process (a meta-device forward, ~0.1 s)."""
    return _min_train_batch(args.arch, args.num_classes, args.image_size)


@functools.lru_cache(maxsize=4)
def _min_train_batch(arch: str, num_classes: int, image_size: int) -> tuple[int, str | None]:
    name = one_value_batchnorm(_shape_model(arch, num_classes), image_size)
    return (2, name) if name else (1, None)


def epoch_share(images: int, launch: Launch) -> int:
    """Training images each process gets per epoch of ``images``: DistributedSampler pads every
    rank's share to the same size."""
    return math.ceil(images / launch.world_size) if launch.distributed else images


def check_model_fits(args: argparse.Namespace, launch: Launch) -> None:
    """The image size and each process's batch fit the model (before any process is spawned)."""
    per_process = images_per_process(args, launch)
    check_image_size(shape_model(args), args)
    if args.evaluate:
        return
    least, batchnorm = min_train_batch(args)
    if per_process < least:
        split = f" over {launch.procs_on_node} processes" if launch.procs_on_node > 1 else ""
        raise UsageError(
            f"--batch-size {args.batch_size}{split} gives {per_process} image per process, but "
            f"training {args.arch} at --image-size {args.image_size} needs at least {least}: "
            f"its BatchNorm {batchnorm} would see one value per channel"
        )


def _loopback_rendezvous(url: str) -> bool:
    if url.startswith("env://"):
        return os.environ.get("MASTER_ADDR") in LOOPBACK_HOSTS
    return any(f"://{host}:" in url for host in LOOPBACK_HOSTS)


def _process_gpu(args, launch: Launch, local_index: int, rank: int, gpus: int) -> int:
    """The GPU index of this process among the node's ``gpus``."""
    if launch.spawn:
        return local_index
    if launch.local_rank is not None:
        return launch.local_rank
    if args.gpu is not None:
        return args.gpu
    # Processes started by hand, one per GPU (--world-size N --rank R): ranks are numbered node by
    # node, so the rank modulo the node's GPU count is the local index (0 for a single process).
    return rank % gpus


def run(local_index: int, args: argparse.Namespace, launch: Launch, checkpoint=None) -> None:
    """One training (or evaluation) process: ``local_index`` is its index on this node."""
    rank = launch.rank + (local_index if launch.spawn else 0)
    if launch.use_cuda:
        gpu = _process_gpu(args, launch, local_index, rank, torch.cuda.device_count())
        torch.cuda.set_device(gpu)
        device = torch.device("cuda", gpu)
    else:
        device = torch.device("cpu")
        # Processes on one CPU node share its cores (torchrun sets OMP_NUM_THREADS itself).
        if launch.procs_on_node > 1 and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // launch.procs_on_node))

    if launch.distributed:
        # A rendezvous on loopback keeps gloo's connections on loopback too.
        if (
            launch.backend == "gloo"
            and "GLOO_SOCKET_IFNAME" not in os.environ
            and _loopback_rendezvous(launch.dist_url)
            and "lo" in {name for _, name in socket.if_nameindex()}
        ):
            os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        dist.init_process_group(
            backend=launch.backend,
            init_method=launch.dist_url,
            world_size=launch.world_size,
            rank=rank,
        )
    try:
        _run(args, launch, rank, device, checkpoint)
    finally:
        if launch.distributed:
            dist.destroy_process_group()


def _run(args, launch: Launch, rank: int, device: torch.device, checkpoint) -> None:
    is_main = rank == 0
    log = Log(is_main)  # train.log starts once the run is known to be valid

    if args.seed is not None:
        random.seed(args.seed)
        torch.manual_seed(args.seed)
        if launch.use_cuda:
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
            warnings.warn(
                "--seed turns on CUDNN deterministic mode, which can slow training down",
                stacklevel=1,
            )
    elif launch.use_cuda:
        torch.backends.cudnn.benchmark = True

    gate_text = f", gate {args.gate}" if args.gate is not None else ""
    source = f" with weights {args.pretrained}" if args.pretrained else ""
    log(f"=> creating model '{args.arch}'{source} ({args.num_classes} classes{gate_text})")
    model = build_model(args).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)

    per_process_batch = images_per_process(args, launch)
    workers = (args.workers + launch.procs_on_node - 1) // launch.procs_on_node

    criterion = nn.CrossEntropyLoss().to(device)
    optimizer = torch.optim.SGD(
        model.parameters(), args.lr, momentum=args.momentum, weight_decay=args.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.StepLR(
        optimizer, step_size=args.lr_step_size, gamma=args.lr_gamma
    )
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")

    start_epoch, best_acc1 = args.start_epoch, 0.0
    if args.resume:
        if checkpoint is None:
            checkpoint = read_checkpoint(args.resume, args.arch)
        model.load_state_dict(checkpoint["state_dict"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint.get("scheduler"):
            scheduler.load_state_dict(checkpoint["scheduler"])
        if checkpoint.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(checkpoint["scaler"])
        start_epoch = checkpoint["epoch"]
        best_acc1 = float(checkpoint.get("best_acc1", 0.0))
        # The RNG continues exactly only where one process wrote it and one process reads it.
        if "rng" in checkpoint and launch.world_size == 1 == checkpoint.get("world_size", 1):
            _set_rng_state(checkpoint["rng"], device)
        log(
            f"=> loaded checkpoint '{args.resume}' (epoch {start_epoch}, "
            f"best Acc@1 {best_acc1:.3f})"
        )
        checkpoint = None  # free its tensors before training
    elif start_epoch > 0:
        with warnings.catch_warnings():  # stepping before any optimizer.step() is intended here
            warnings.simplefilter("ignore")
            for _ in range(start_epoch):
                scheduler.step()

    compiled = torch.compile(model) if args.compile else model
    train_model = compiled
    if launch.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            compiled, device_ids=[device.index] if device.type == "cuda" else None
        )

    if args.dummy:
        log("=> dummy data is used!")
        train_set, val_set = scdata.dummy_datasets(args.image_size, args.num_classes, args.evaluate)
    else:
        train_set, val_set = scdata.image_folder_datasets(args.data, args.image_size, args.evaluate)
    drop_last = False
    if train_set is not None:
        least, batchnorm = min_train_batch(args)
        share = epoch_share(len(train_set), launch)
        if share < least:  # every batch would be too small: nothing would train
            raise UsageError(
                f"the training set gives each process {share} image, but a training batch of "
                f"{args.arch} needs at least {least} (its BatchNorm {batchnorm} would see one "
                "value per channel)"
            )
        last = share % per_process_batch or per_process_batch
        drop_last = last < least
        if drop_last:
            log(
                f"=> the last training batch of each epoch would hold {last} image, which cannot "
                f"train {args.arch} (its BatchNorm {batchnorm} would see one value per channel): "
                "it is left out"
            )
    train_loader, train_sampler, val_loader = scdata.make_loaders(
        train_set,
        val_set,
        per_process_batch,
        workers,
        launch.distributed,
        rank,
        launch.world_size,
        pin_memory=launch.use_cuda,
        drop_last=drop_last,
    )
    ctx = Context(args, launch, rank, device, log)
    if launch.distributed:
        log(
            f"=> {launch.world_size} processes ({launch.backend}, {launch.dist_url}), "
            f"{per_process_batch} images per process and step"
        )

    if args.evaluate:
        if not (args.resume or args.pretrained):
            log("=> warning: evaluating randomly initialised weights (no --resume/--pretrained)")
        # The model without DDP: validation issues no DDP collectives on uneven shards.
        validate(val_loader, compiled, criterion, ctx)
        return

    metrics_path = os.path.join(args.output, METRICS_NAME)
    if is_main:
        make_output_folder(args.output)  # made by main() already; again for callers of run()
        log.path = os.path.join(args.output, LOG_NAME)
        _rewrite_metrics(metrics_path, start_epoch if args.resume else 0)
    if start_epoch >= args.epochs:
        log(f"=> nothing to train: epoch {start_epoch} reached --epochs {args.epochs}")
        return

    for epoch in range(start_epoch, args.epochs):
        if train_sampler is not None:
            train_sampler.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        loss_sum, c1, c5, images, seconds = train_one_epoch(
            train_loader, train_model, criterion, optimizer, scaler, epoch, ctx
        )
        scheduler.step()
        if launch.distributed:
            # BatchNorm statistics drift apart per rank; evaluate and save rank 0's everywhere.
            for buffer in model.buffers():
                dist.broadcast(buffer, 0)
        val = validate(val_loader, compiled, criterion, ctx)
        # The first epoch of a run always writes model_best.pth, even at 0 % top-1 (a new run
        # starts in a folder without one: claim_output_folder).
        is_best = val["acc1"] > best_acc1 or not os.path.exists(
            os.path.join(args.output, BEST_NAME)
        )
        best_acc1 = max(val["acc1"], best_acc1)
        images = max(images, 1)
        record = {
            "epoch": epoch,
            "lr": lr,
            "train_loss": loss_sum / images,
            "train_acc1": 100.0 * c1 / images,
            "train_acc5": 100.0 * c5 / images,
            "val_loss": val["loss"],
            "val_acc1": val["acc1"],
            "val_acc5": val["acc5"],
            "best_acc1": best_acc1,
            "is_best": is_best,
            "train_images": int(images),
            "train_seconds": seconds,
            "images_per_second": images / seconds,
            "world_size": launch.world_size,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if is_main:
            state = {
                "epoch": epoch + 1,
                "arch": args.arch,
                "gate": args.gate,
                "num_classes": args.num_classes,
                "state_dict": model.state_dict(),
                "best_acc1": best_acc1,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "amp": args.amp,
                "world_size": launch.world_size,
                "rng": _rng_state(device),
                "args": vars(args).copy(),
            }
            save_checkpoint(state, is_best, args.output)
            _append_metrics(metrics_path, record)
        log(
            f"Epoch {epoch} ({epoch + 1} of {args.epochs}) done in {seconds:.1f} s "
            f"({record['images_per_second']:.1f} img/s, lr {lr:.4g}): "
            f"train loss {record['train_loss']:.4f} Acc@1 {record['train_acc1']:.2f} "
            f"Acc@5 {record['train_acc5']:.2f} | val loss {val['loss']:.4f} "
            f"Acc@1 {val['acc1']:.2f} Acc@5 {val['acc5']:.2f} | best Acc@1 {best_acc1:.2f}"
        )


def _spawned(local_index: int, args: argparse.Namespace, launch: Launch) -> None:
    """Entry point of a --multiprocessing-distributed process: bad input exits with status 2."""
    try:
        run(local_index, args, launch)
    except scdata.DataError as error:
        print(f"{PROG}: error: {scdata.user_message(error)}", file=sys.stderr, flush=True)
        sys.exit(2)
    except (UsageError, NonFiniteLoss) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr, flush=True)
        sys.exit(2 if isinstance(error, UsageError) else 1)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        checkpoint = check_args(args, parser)
        launch = plan_launch(args)
        check_model_fits(args, launch)
        if not args.evaluate:  # rank 0 (on this node, when spawning) writes there
            claim_output_folder(args, writes=launch.rank == 0)
    except UsageError as error:
        parser.error(str(error))

    if not launch.spawn:
        try:
            run(0, args, launch, checkpoint)
        except UsageError as error:
            parser.error(str(error))
        except scdata.DataError as error:  # an image that cannot be read, met while running
            parser.error(scdata.user_message(error))
        except NonFiniteLoss as error:
            sys.exit(f"{PROG}: error: {error}")
        return

    del checkpoint  # each spawned process reads its own copy
    try:
        torch.multiprocessing.spawn(_spawned, args=(args, launch), nprocs=launch.spawn)
    except torch.multiprocessing.ProcessExitedException as error:
        sys.exit(
            f"{PROG}: error: process {error.error_index} of {launch.spawn} exited with status "
            f"{error.exit_code} (its message is above)"
        )


if __name__ == "__main__":
    main()
