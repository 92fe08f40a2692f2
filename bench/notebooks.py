"""Execute the notebooks headless: ``python -m bench.notebooks [--check] [NOTEBOOK ...]``.

Runs every notebook in ``notebooks/`` (or those named) top to bottom with nbclient, in a kernel
that is this very Python interpreter (a kernelspec written to a temporary directory, so no
installed ``python3`` kernelspec of another environment can be picked up). Without ``--check``
the executed notebooks, outputs included, are written back in place (atomically), which is how
the committed notebooks get their plots; with ``--check`` nothing is written. Any cell error
fails the run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from bench.common import REPO_ROOT, write_text

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
KERNEL_NAME = "scconv-bench-python"


def notebooks() -> list[Path]:
    return sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def _kernel_pythonpath() -> str:
    """This checkout, then the entries of ``$PYTHONPATH`` made absolute (from this process's
    working directory, as this process reads them)."""
    entries = [str(REPO_ROOT)]
    for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        if entry:
            entries.append(str(Path(entry).resolve()))
    return os.pathsep.join(dict.fromkeys(entries))


def execute(path: str | Path, save: bool = False, timeout_s: int = 600):
    """Execute the notebook at ``path`` in a kernel running ``sys.executable``.

    Returns the executed ``nbformat`` notebook; raises ``nbclient.exceptions.CellExecutionError``
    on the first failing cell. ``save`` writes it back to ``path`` with its outputs.
    """
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    path = Path(path)
    notebook = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory() as kernels_dir:
        spec_dir = Path(kernels_dir) / KERNEL_NAME
        spec_dir.mkdir()
        spec = {
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python (scconv bench)",
            "language": "python",
            # The kernel runs in notebooks/: a relative $PYTHONPATH (the GPU machine's
            # `PYTHONPATH=.`, no install) would point there, so the checkout goes first, absolute.
            "env": {"PYTHONPATH": _kernel_pythonpath()},
        }
        (spec_dir / "kernel.json").write_text(json.dumps(spec))
        specs = KernelSpecManager(kernel_dirs=[kernels_dir])
        # The connection file goes in the temporary directory too: by default jupyter_client
        # writes it to /tmp/tmpXXXX.json, and it stayed there after every run. The kernel talks
        # over Unix sockets there (ipc), not TCP ports, so no port is opened and ipykernel does
        # not warn on every run that its TCP traffic is unencrypted; a $TMPDIR too long for a
        # socket path (about 107 bytes, plus "-PORT") keeps TCP on 127.0.0.1.
        socket_base = str(Path(kernels_dir) / "kernel")
        transport = {"transport": "ipc", "ip": socket_base} if len(socket_base) < 90 else {}
        manager = KernelManager(
            kernel_name=KERNEL_NAME,
            kernel_spec_manager=specs,
            connection_file=str(Path(kernels_dir) / "connection.json"),
            **transport,
        )
        client = NotebookClient(
            notebook,
            km=manager,
            timeout=timeout_s,
            resources={"metadata": {"path": str(path.parent)}},  # cwd of the kernel
        )
        try:
            client.execute()
        finally:
            # nbclient shuts down only kernels it started itself: this one (its KernelManager is
            # ours) would live until this process exits, and then log "Parent appears to have
            # exited" from its own process.
            if manager.has_kernel:
                manager.shutdown_kernel()
    # Keep the committed metadata portable: a generic python3 kernel, not the temporary one.
    notebook.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    if save:
        write_text(nbformat.writes(notebook) + "\n", path)
    return notebook


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.notebooks", description=__doc__)
    parser.add_argument("paths", nargs="*", help="notebooks (default: notebooks/*.ipynb)")
    parser.add_argument("--check", action="store_true", help="execute only, write nothing")
    args = parser.parse_args(argv)
    for path in [Path(p) for p in args.paths] or notebooks():
        execute(path, save=not args.check)
        print(f"{'executed' if args.check else 'executed and saved'} {path}")


if __name__ == "__main__":
    main()
