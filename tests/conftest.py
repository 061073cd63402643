import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_lm():
    from anatomy_nb.lm.models import tiny_llama

    return tiny_llama()


@pytest.fixture(scope="session")
def tiny_sae_(tiny_lm):
    from anatomy_nb.lm.sae import tiny_sae

    return tiny_sae(tiny_lm.d_model, layer=2, d_sae=96, k=6)


@pytest.fixture(scope="session")
def hh_pairs():
    from anatomy_nb.data.pairs import load_pairs

    return load_pairs("hh-rlhf", limit=20)
