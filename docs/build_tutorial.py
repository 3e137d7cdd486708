"""Run docs/tutorial.md as a notebook and keep what it produced.

    python docs/build_tutorial.py            # from the repository root, .venv/bin on PATH

The page becomes a notebook (markdown cells, ``python`` blocks as code cells, ``bash`` blocks as
``%%bash`` cells), which is executed by a Jupyter kernel in a scratch folder holding a copy of
``params.yaml``. The executed notebook is written to ``docs/tutorial.ipynb`` and the figures it
drew to ``docs/tutorial/``, the files the page shows. ``tests/test_tutorial.py`` builds and
executes the same notebook (``make test``) and checks that the committed one has the same code.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
PAGE = DOCS / "tutorial.md"
NOTEBOOK = DOCS / "tutorial.ipynb"
FIGURES = DOCS / "tutorial"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```\n", re.MULTILINE | re.DOTALL)
# where the tutorial's code leaves each figure the page shows (relative to the scratch folder)
PRODUCED = {
    "umap.png": "tutorial/figures/umap.png",
    "confusion.png": "tutorial/figures/confusion.png",
    "probability.png": "tutorial/figures/probability.png",
    "attention_heatmap.png": "tutorial/figures/explain/attention_heatmap.png",
    "expression_dotplot.png": "tutorial/figures/explain/expression_dotplot.png",
}


def cells(text: str) -> list[tuple[str, str]]:
    """(kind, source) in page order: kind is ``markdown``, ``python`` or ``bash``."""
    out: list[tuple[str, str]] = []
    position = 0
    for match in BLOCK.finditer(text):
        prose = text[position : match.start()].strip()
        if prose:
            out.append(("markdown", prose))
        language, code = match.group(1), match.group(2).rstrip("\n")
        if language not in ("python", "bash"):
            raise ValueError(f"tutorial.md: a ```{language} block; only python and bash run")
        out.append((language, code))
        position = match.end()
    rest = text[position:].strip()
    if rest:
        out.append(("markdown", rest))
    return out


def notebook(text: str) -> Any:
    """The page as an (unexecuted) nbformat v4 notebook."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    for kind, source in cells(text):
        if kind == "markdown":
            nb.cells.append(nbformat.v4.new_markdown_cell(source))
        elif kind == "bash":
            nb.cells.append(nbformat.v4.new_code_cell(f"%%bash\nset -euo pipefail\n{source}"))
        else:
            nb.cells.append(nbformat.v4.new_code_cell(source))
    return nb


def code_of(nb: Any) -> list[str]:
    return [c.source for c in nb.cells if c.cell_type == "code"]


def execute(nb: Any, workdir: Path, *, timeout: int = 900) -> Any:
    """Execute the notebook with ``workdir`` as its working directory (params.yaml copied in);
    the interpreter's bin folder first on PATH, so ``scbert`` is this checkout's."""
    from nbclient import NotebookClient

    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "params.yaml", workdir / "params.yaml")
    env_path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    os.environ["PATH"] = env_path  # the kernel and its %%bash cells inherit it
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(workdir)}},
    )
    client.execute(cwd=str(workdir))
    return nb


def main(argv: list[str] | None = None) -> int:
    import nbformat

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="scratch folder (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    scratch = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="tutorial-"))
    try:
        nb = execute(notebook(PAGE.read_text()), scratch)
        FIGURES.mkdir(exist_ok=True)
        for name, produced in PRODUCED.items():
            shutil.copy(scratch / produced, FIGURES / name)
        nbformat.write(nb, NOTEBOOK)
        print(f"executed {len(code_of(nb))} code cells; wrote {NOTEBOOK} and {FIGURES}/")
    finally:
        if not args.workdir:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
