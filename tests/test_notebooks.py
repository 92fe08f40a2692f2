"""Every notebook executes headless, top to bottom, without an error (nbclient).

The kernel is this test's own interpreter (``bench.notebooks.execute`` writes a temporary
kernelspec for ``sys.executable``), so the notebooks see the same packages as the tests. The
notebooks read the committed results in ``bench/results/`` (or ``$SCCONV_BENCH_RESULTS``);
nothing is written back.
"""

import os
import tempfile

import pytest

from bench import notebooks

NOTEBOOKS = notebooks.notebooks()


def test_there_are_notebooks():
    names = {path.name for path in NOTEBOOKS}
    assert {"speed_vs_resnet.ipynb", "autotune_sweep.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes_without_error(path):
    # nbclient raises CellExecutionError (naming the cell and the traceback) on any error.
    executed = notebooks.execute(path, save=False, timeout_s=600)
    outputs = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    if path.name == "speed_vs_resnet.ipynb":
        # The committed results exist, so the plots must have been drawn.
        images = [o for o in outputs if "image/png" in o.get("data", {})]
        assert len(images) >= 5


def test_a_failing_cell_fails_the_run(tmp_path):
    import nbformat
    from nbclient.exceptions import CellExecutionError

    broken = tmp_path / "broken.ipynb"
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1 / 0")])
    nbformat.write(notebook, broken)
    with pytest.raises(CellExecutionError, match="ZeroDivisionError"):
        notebooks.execute(broken)


def test_a_run_leaves_no_files_behind(tmp_path, monkeypatch):
    """Kernel spec and connection file live in a temporary directory that goes with the run
    (jupyter_client's default connection file, /tmp/tmpXXXX.json, stayed after every run)."""
    import nbformat

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    small = tmp_path / "small.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1 + 1")]), small)
    notebooks.execute(small)
    assert list(scratch.iterdir()) == []


def test_the_kernel_talks_over_unix_sockets_not_tcp(tmp_path):
    """No TCP port is opened (ipykernel warned on every run that its TCP traffic is unencrypted);
    the sockets live in the run's temporary directory."""
    import nbformat

    cell = "from ipykernel.kernelapp import IPKernelApp\nprint(IPKernelApp.instance().transport)"
    small = tmp_path / "small.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(cell)]), small)
    assert _stdout(notebooks.execute(small)).strip() == "ipc"


@pytest.mark.parametrize("cell", ["1 + 1", "1 / 0"])
def test_the_kernel_is_shut_down_when_the_run_returns(tmp_path, cell):
    """nbclient shuts down only kernels it started: ours, left running, logged "Parent appears to
    have exited" from its own process when this one ended. A failing cell shuts it down too."""
    import nbformat

    psutil = pytest.importorskip("psutil")  # an ipykernel dependency
    small = tmp_path / "small.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(cell)]), small)
    from nbclient.exceptions import CellExecutionError

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    if cell == "1 / 0":
        with pytest.raises(CellExecutionError):
            notebooks.execute(small)
    else:
        notebooks.execute(small)
    alive = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert not [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def _stdout(notebook) -> str:
    return "".join(
        o.get("text", "")
        for c in notebook.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.output_type == "stream"
    )


def test_missing_csvs_are_reported_in_the_cells(tmp_path, monkeypatch):
    import shutil

    from bench.common import RESULTS_DIR

    # A results directory holding the gating results only: every other section must say so.
    (tmp_path / "cpu").mkdir()
    for name in ("gating.csv", "bandwidth.csv"):
        shutil.copy(RESULTS_DIR / "cpu" / name, tmp_path / "cpu" / name)
    monkeypatch.setenv("SCCONV_BENCH_RESULTS", str(tmp_path))  # the kernel inherits it
    executed = notebooks.execute(notebooks.NOTEBOOK_DIR / "speed_vs_resnet.ipynb")
    text = _stdout(executed)
    for name in ("model_summary", "models", "breakdown", "gating_correctness", "bytes_moved"):
        assert f"MISSING {name}.csv in {tmp_path / 'cpu'}/" in text, name
    assert "MISSING gating.csv" not in text
    executed = notebooks.execute(notebooks.NOTEBOOK_DIR / "autotune_sweep.ipynb")
    assert "MISSING sweep.csv" in _stdout(executed)


def test_the_kernel_gets_the_checkout_and_an_absolute_pythonpath(tmp_path, monkeypatch):
    # The GPU machine runs the project with `PYTHONPATH=.` (no install); the kernel starts in
    # notebooks/, where "." would not find bench/.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([".", "extra", ""]))
    entries = notebooks._kernel_pythonpath().split(os.pathsep)
    assert entries == [str(notebooks.REPO_ROOT), str(tmp_path.resolve()),
                       str((tmp_path / "extra").resolve())]  # fmt: skip
