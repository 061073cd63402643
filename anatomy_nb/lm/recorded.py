"""The weights a feature store was built with, loaded and checked against the fingerprints the
store recorded: a later stage that reads a run must see the model and SAE its features came from."""

from __future__ import annotations

from typing import Any

from ..core.run import RunLike
from ..results.extract import FeatureStore
from .models import LoadedModel, load_model
from .sae import LoadedSAE, load_sae

__all__ = ["recorded_model", "recorded_sae"]


def recorded_model(run: RunLike, **kwargs: Any) -> LoadedModel:
    """The store's model (``load_model`` keywords pass through), checked against its fingerprint."""
    store = FeatureStore.from_run(run)
    recorded = store.manifest["model"]
    return _checked(store, "model", load_model(recorded["name"], **kwargs))


def recorded_sae(run: RunLike, **kwargs: Any) -> LoadedSAE:
    """The store's SAE, checked against its fingerprint; an SAE may be known under an earlier
    formula's fingerprint (``LoadedSAE.known_as``)."""
    store = FeatureStore.from_run(run)
    recorded = store.manifest["sae"]
    loaded = load_sae(recorded["name"], **kwargs)
    return _checked(store, "sae", loaded.known_as(recorded["fingerprint"]) or loaded)


def _checked(store: FeatureStore, what: str, loaded: Any) -> Any:
    recorded = store.manifest[what]
    if loaded.fingerprint != recorded["fingerprint"]:
        raise ValueError(
            f"{store.path}: {what} {recorded['name']} is not the one the store was built with (fingerprint "
            f"{loaded.fingerprint}, recorded {recorded['fingerprint']})"
        )
    return loaded
