"""Running the stage notebooks headless with papermill and rendering them to shareable HTML."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from .artifacts import atomic_path

__all__ = ["NOTEBOOKS", "notebook_dir", "run_notebook"]

NOTEBOOKS = ["00_train_sae", "01_extract", "02_hypothesize", "03_intervene", "04_train", "05_evaluate"]


def notebook_dir() -> Path:
    """The repository's ``notebooks/`` folder (``$ANATOMY_NB_NOTEBOOKS`` overrides)."""
    env = os.environ.get("ANATOMY_NB_NOTEBOOKS")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "notebooks"


def run_notebook(name: str, run_dir: str | os.PathLike, parameters: dict[str, Any] | None = None, html: bool = True, timeout: int = 3600, progress: bool = True, strict_parameters: bool = True, output_name: str | None = None) -> Path:
    """Execute ``notebooks/<name>.ipynb`` with papermill into ``run_dir/notebooks/`` and, if
    ``html``, render it to standalone HTML next to it. Returns the executed notebook's path.

    A parameter the notebook does not declare is an error (a typo would otherwise be ignored);
    ``strict_parameters=False`` passes each notebook only the ones it declares (the pipeline
    runner shares one parameter set across notebooks). ``output_name`` names the executed copy
    (default: the notebook's name), so one notebook can run several times in a run directory."""
    import papermill as pm

    src = notebook_dir() / f"{name}.ipynb"
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such notebook (known: {', '.join(NOTEBOOKS)})")
    run_dir = Path(run_dir).resolve()
    out_dir = run_dir / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    params = {"run_dir": str(run_dir), **(parameters or {})}
    declared = set(pm.inspect_notebook(str(src)))
    unknown = sorted(set(parameters or {}) - declared)
    if unknown and strict_parameters:
        raise ValueError(f"{src.name} has no parameter(s) {unknown}; it declares {sorted(declared)}")
    params = {k: v for k, v in params.items() if k in declared}
    out = out_dir / f"{output_name or name}.ipynb"
    # papermill writes the output as it goes: a failed run leaves a notebook showing where.
    pm.execute_notebook(str(src), str(out), parameters=params, cwd=str(src.parent), kernel_name="python3", progress_bar=progress, execution_timeout=timeout, language="python")
    if html:
        render_html(out)
    return out


def static_widgets(nb):
    """Without a kernel a widget view renders as nothing (and nbconvert would fetch the widget
    manager from a CDN): keep the static ``text/html`` our widgets also emit, drop the view and
    the saved widget state."""
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if "application/vnd.jupyter.widget-view+json" in data and "text/html" in data:
                del data["application/vnd.jupyter.widget-view+json"]
    nb.metadata.pop("widgets", None)
    return nb


def render_html(notebook: str | os.PathLike) -> Path:
    """Standalone HTML of an executed notebook (plotly figures embedded, no kernel needed)."""
    import nbformat
    from nbconvert import HTMLExporter

    notebook = Path(notebook)
    nb = static_widgets(nbformat.read(notebook, as_version=4))
    exporter = HTMLExporter()
    exporter.exclude_input_prompt = True
    exporter.exclude_output_prompt = True
    body, _ = exporter.from_notebook_node(nb)
    # the template's require.js / MathJax come from a CDN: useless offline (plotly is embedded)
    body = re.sub(r"<script[^>]*\bsrc=[\"']https?://[^>]*>\s*</script>", "", body)
    out = notebook.with_suffix(".html")
    with atomic_path(out) as tmp:
        tmp.write_text(body, encoding="utf-8")
    return out
