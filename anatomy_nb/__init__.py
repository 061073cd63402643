"""anatomy_nb: see what a preference data set will teach a model, at the level of SAE concepts.

The small functional API, one function per pipeline stage::

    from anatomy_nb import load_model, load_pairs, load_sae, extract
    pairs = load_pairs("hh-rlhf", limit=300)
    store = extract(pairs, load_model(), load_sae(), "runs/default")

Imports are lazy so that ``import anatomy_nb`` stays cheap (no torch until it is needed).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "RunDir": "artifacts",
    "DataError": "data",
    "PairSet": "data",
    "PreferencePair": "data",
    "load_pairs": "data",
    "DataCard": "datacard",
    "data_card": "datacard",
    "EvalConfig": "evaluate",
    "evaluate": "evaluate",
    "ExtractConfig": "extract",
    "FeatureStore": "extract",
    "extract": "extract",
    "DEFAULT_MODEL": "models",
    "LoadedModel": "models",
    "load_model": "models",
    "tiny_llama": "models",
    "DEFAULT_SAE": "sae",
    "LoadedSAE": "sae",
    "load_sae": "sae",
    "tiny_sae": "sae",
    "run_notebook": "notebooks",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'anatomy_nb' has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from .artifacts import RunDir
    from .data import DataError, PairSet, PreferencePair, load_pairs
    from .datacard import DataCard, data_card
    from .evaluate import EvalConfig, evaluate
    from .extract import ExtractConfig, FeatureStore, extract
    from .models import DEFAULT_MODEL, LoadedModel, load_model, tiny_llama
    from .notebooks import run_notebook
    from .sae import DEFAULT_SAE, LoadedSAE, load_sae, tiny_sae
