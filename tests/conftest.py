"""Shared test set-up.

Without a GPU the Triton kernels run through Triton's interpreter, which must be switched on
before triton is first imported (kernels.runtime does that too; setting it here keeps the
whole test session consistent whatever imports first).
"""

import os

# Under pytest-xdist (`make test` runs the files in parallel processes) each worker gets its share
# of the cores for torch's intra-op threads, and so do the subprocesses the tests start: with
# every process on all cores, OpenMP threads spin against each other (on 2 cores, two
# 2-thread processes ran eager gating 300x slower in bench/). Set before torch is imported.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _perturb_batchnorm(model: torch.nn.Module, seed: int = 0, residual_scale: float = 0.1):
    """Give every BatchNorm non-trivial statistics and affine parameters, in place.

    Random deep networks are chaotic: to compare two implementations at the logits, the last
    BatchNorm of each residual block (``bn3`` in SCNet, ``bn3`` in torchvision's Bottleneck) is
    scaled down to ``residual_scale`` (see "Testing whole networks" in the design notes).
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=generator) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=generator) * 0.5 + 0.75)
                m.weight.copy_(torch.rand(c, generator=generator) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(c, generator=generator) * 0.1)
                if name.endswith("bn3"):
                    m.weight.mul_(residual_scale)
    return model


@pytest.fixture
def perturb_batchnorm():
    """``perturb_batchnorm(model, seed=0, residual_scale=0.1)``: see ``_perturb_batchnorm``."""
    return _perturb_batchnorm


@pytest.fixture
def no_tf32():
    """fp32 convolutions and matmuls in full precision on CUDA for the test: TF32 would round two
    implementations' (ulp-apart) products differently, far above fp32 tolerances. Not pytest's
    monkeypatch: pytest 9.2 undoes a setattr on ``torch.backends.cuda.matmul`` (no instance
    ``__dict__`` entry) with delattr, which that object refuses."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = matmul.allow_tf32, cudnn.allow_tf32
    matmul.allow_tf32 = cudnn.allow_tf32 = False
    yield
    matmul.allow_tf32, cudnn.allow_tf32 = saved
