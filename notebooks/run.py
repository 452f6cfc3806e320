"""Execute the notebooks of this folder headless, top to bottom, with nbclient.

    python notebooks/run.py [--quick] [--write] [--timeout S] [NAMES...]

- ``NAMES``: notebook files or their stems (``01_solver_schedules``); default every
  ``notebooks/[0-9][0-9]_*.ipynb``. Finding none is an error: a run never passes with nothing
  run.
- The kernel runs this interpreter (``sys.executable``, through a kernel spec made for the run
  in a temporary folder), not whatever ``python3`` kernel spec the user's home holds; its
  working directory is ``notebooks/``; ``--quick`` sets ``SOLVERLAB_NOTEBOOK_QUICK=1`` for it
  (without ``--quick`` the variable is removed), and ``MPLBACKEND`` is set to the inline
  backend so figures become outputs whatever the caller's ``MPLBACKEND`` (tox sets ``Agg``).
  Kernels talk over unix sockets in the temporary folder and are shut down after each notebook.
- Without ``--write`` nothing on disk changes. ``--write`` stores each executed notebook in
  place atomically (temporary file + rename), with a generic ``python3`` kernel spec in its
  metadata so that GitHub renders it; a notebook that fails is not written.
- Prints per notebook its wall time and ``ok`` or ``FAILED`` with the failing cell, error name
  and message; exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
QUICK_ENV = "SOLVERLAB_NOTEBOOK_QUICK"
PATTERN = "[0-9][0-9]_*.ipynb"
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"
KERNEL_NAME = "solverlab-notebooks"
GENERIC_KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}


def find_notebooks(names: list[str]) -> list[Path]:
    """The notebooks to run: ``names`` (paths or stems in this folder), else every one."""
    if not names:
        return sorted(HERE.glob(PATTERN))
    found = []
    for name in names:
        candidates = [Path(name), HERE / name, HERE / f"{name}.ipynb"]
        path = next((p for p in candidates if p.is_file() and p.suffix == ".ipynb"), None)
        if path is None:
            raise SystemExit(f"run.py: no notebook {name!r} (looked for "
                             + ", ".join(str(c) for c in candidates) + ")")
        found.append(path.resolve())
    return found


def kernel_env(quick: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.pop(QUICK_ENV, None)
    if quick:
        env[QUICK_ENV] = "1"
    env["MPLBACKEND"] = INLINE_BACKEND
    # tqdm.auto's notice that a kernel without ipywidgets shows text progress bars
    return env


def make_kernel_spec(folder: Path) -> None:
    """A kernel spec running this interpreter, in ``folder/KERNEL_NAME``."""
    spec = folder / KERNEL_NAME
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python ({sys.executable})",
        "language": "python",
    }))


def failing_cell(nb) -> tuple[int, str, str] | None:
    """``(index, error name, message)`` of the first code cell with an error output."""
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []) if cell.cell_type == "code" else []:
            if out.get("output_type") == "error":
                return i, out.get("ename", "?"), out.get("evalue", "")
    return None


def write_atomic(nb, path: Path) -> None:
    import nbformat

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))  # mkstemp's file is 0600
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            nbformat.write(nb, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run_one(path: Path, quick: bool, write: bool, timeout: int, spec_dir: Path) -> bool:
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    nb = nbformat.read(path, as_version=4)
    # unix sockets under the run's temporary folder: no TCP port (and no warning about one)
    km = KernelManager(kernel_name=KERNEL_NAME, transport="ipc", ip=str(spec_dir / "ipc"),
                       kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(spec_dir)]))
    client = NotebookClient(nb, km=km, timeout=timeout, allow_errors=False, record_timing=False,
                            resources={"metadata": {"path": str(HERE)}})
    start = time.perf_counter()
    error = None
    try:
        client.execute(env=kernel_env(quick))
    except CellExecutionError as e:
        where = failing_cell(nb)
        cell = f"cell {where[0]}" if where else "a cell"
        error = f"{cell}: {e.ename}: {e.evalue}"
    except CellTimeoutError as e:
        error = f"CellTimeoutError: {str(e).splitlines()[0]} (timeout {timeout} s per cell)"
    except DeadKernelError as e:
        error = f"DeadKernelError: {e}"
    finally:  # a kernel manager given to nbclient is not shut down by it
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    wall = time.perf_counter() - start
    name = path.name
    if error is None and (where := failing_cell(nb)) is not None:
        error = f"cell {where[0]}: {where[1]}: {where[2]}"
    if error is not None:
        print(f"{name}: FAILED after {wall:.1f} s: {error}", flush=True)
        return False
    if write:
        nb.metadata["kernelspec"] = dict(GENERIC_KERNELSPEC)
        nbformat.validate(nb)
        write_atomic(nb, path)
    print(f"{name}: ok in {wall:.1f} s" + (" (written)" if write else ""), flush=True)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAMES",
                        help="notebooks (paths or stems); default: every notebooks/" + PATTERN)
    parser.add_argument("--quick", action="store_true",
                        help=f"quick mode: set {QUICK_ENV}=1 for the kernel")
    parser.add_argument("--write", action="store_true",
                        help="store each executed notebook in place (atomically)")
    parser.add_argument("--timeout", type=int, default=600,
                        help="seconds per cell (default 600)")
    args = parser.parse_args(argv)
    paths = find_notebooks(args.names)
    if not paths:
        print(f"run.py: no notebooks matching {HERE / PATTERN}", file=sys.stderr)
        return 1
    mode = "quick" if args.quick else "full"
    print(f"running {len(paths)} notebook(s), {mode} mode, kernel {sys.executable}", flush=True)
    failed = []
    with tempfile.TemporaryDirectory(prefix="solverlab-kernels-") as tmp:
        make_kernel_spec(Path(tmp))
        for path in paths:
            if not run_one(path, args.quick, args.write, args.timeout, Path(tmp)):
                failed.append(path.name)
    if failed:
        print(f"{len(failed)} of {len(paths)} notebook(s) FAILED: {', '.join(failed)}")
        return 1
    print(f"all {len(paths)} notebook(s) ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
