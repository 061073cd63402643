"""Running the stage notebooks headless with papermill and rendering them to shareable HTML.

Every stage notebook takes ``run_dir`` and a ``config`` dict (the keys of the stage's config
dataclass, checked there); a few also take the stage's input (``plan``, ``models``). A parameter a
notebook does not declare is an error here, before anything runs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nbformat
import papermill as pm
from nbconvert import HTMLExporter

from ..config import (
    STAGES,
    CompareAuditsConfig,
    EvalConfig,
    ExtractConfig,
    HypothesizeConfig,
    PlanConfig,
    RecipeConfig,
    SubspaceConfig,
    TrainConfig,
)
from ..core.files import atomic_write_text
from ..core.paths import notebook_dir

__all__ = [
    "HEADLESS_ENV",
    "NOTEBOOKS",
    "NOTEBOOK_CONFIGS",
    "notebook_dir",
    "notebook_for",
    "render_html",
    "run_notebook",
    "static_widgets",
]

NOTEBOOKS = [
    "00_train_sae",
    *(f"{i:02d}_{stage}" for i, stage in enumerate(STAGES, start=1)),
    "06_concept_subspace",
    "07_compare_audits",
]
#: the config dataclass each notebook's ``config`` parameter is checked against
NOTEBOOK_CONFIGS = dict(
    zip(
        NOTEBOOKS,
        (
            RecipeConfig,
            ExtractConfig,
            HypothesizeConfig,
            PlanConfig,
            TrainConfig,
            EvalConfig,
            SubspaceConfig,
            CompareAuditsConfig,
        ),
    )
)


#: the environment of a headless notebook's kernel: no progress bars (tqdm, transformers, datasets)
#: and no library warnings in the rendered output
HEADLESS_ENV = {
    "TQDM_DISABLE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "PYTHONWARNINGS": "ignore",
    "TOKENIZERS_PARALLELISM": "false",
}


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def notebook_for(stage: str) -> str:
    """The notebook of a stage: ``"plan"`` → ``"03_plan"``."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    return f"{STAGES.index(stage) + 1:02d}_{stage}"


def run_notebook(
    name: str,
    run_dir: str | os.PathLike,
    parameters: dict[str, Any] | None = None,
    html: bool = True,
    timeout: int = 3600,
    progress: bool = True,
    output_name: str | None = None,
) -> Path:
    """Execute ``notebooks/<name>.ipynb`` (a notebook or stage name) with papermill into
    ``run_dir/notebooks/`` and, if ``html``, render it to standalone HTML next to it. Returns the
    executed notebook's path. ``output_name`` names the executed copy (default: the notebook's
    name), so one notebook can run several times in a run directory."""
    if name in STAGES:
        name = notebook_for(name)
    src = notebook_dir() / f"{name}.ipynb"
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such notebook (known: {', '.join(NOTEBOOKS)})")
    run_dir = Path(run_dir).resolve()
    out_dir = run_dir / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    params = {"run_dir": str(run_dir), **(parameters or {})}
    declared = set(pm.inspect_notebook(str(src)))
    unknown = sorted(set(parameters or {}) - declared)
    if unknown:
        raise ValueError(f"{src.name} has no parameter(s) {unknown}; it declares {sorted(declared)}")
    if "config" in params and name in NOTEBOOK_CONFIGS:  # fail here, before a kernel starts
        NOTEBOOK_CONFIGS[name].from_dict(params["config"], source=f"{src.name} parameter 'config'")
    out = out_dir / f"{output_name or name}.ipynb"
    # papermill writes the output as it goes: a failed run leaves a notebook showing where. The
    # kernel inherits a quiet environment: progress bars and library warnings stay out of the
    # notebook that is shared (papermill's own progress stays on the terminal).
    with _environment(HEADLESS_ENV):
        # explicit: TQDM_DISABLE is for the kernel
        bar = {"unit": "cell", "desc": f"Executing {name}", "disable": not progress}
        pm.execute_notebook(
            str(src),
            str(out),
            parameters=params,
            cwd=str(src.parent),
            kernel_name="python3",
            progress_bar=bar,
            execution_timeout=timeout,
            language="python",
        )
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
    notebook = Path(notebook)
    nb = static_widgets(nbformat.read(notebook, as_version=4))
    exporter = HTMLExporter()
    exporter.exclude_input_prompt = True
    exporter.exclude_output_prompt = True
    body, _ = exporter.from_notebook_node(nb)
    # the template's require.js / MathJax come from a CDN: useless offline (plotly is embedded)
    body = re.sub(r"<script[^>]*\bsrc=[\"']https?://[^>]*>\s*</script>", "", body)
    out = notebook.with_suffix(".html")
    atomic_write_text(out, body)
    return out
