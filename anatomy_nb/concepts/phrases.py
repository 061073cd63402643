"""Names a person can read: each concept's most distinctive phrases.

Around the tokens where a concept's member features peak (the store's top contexts), the text of a
small window is split into words and symbol runs, and every n-gram of 1–3 of them is counted once
per window. Each is compared with how often it occurs in all responses by the log-odds ratio with
an informative Dirichlet prior (Monroe, Colaresi & Quinn 2008, "Fightin' Words"): its z-score
discounts both one-off flukes (few windows) and everyday words (common everywhere), which the peak
tokens alone do not — "by · here · ?" becomes the sentence the concept fires on. The best n-grams,
each grown by the words that keep following it, are the name.

Words, not tokens, so a name reads the same whatever the tokenizer splits a word into. Window text
comes from the tokenizer when one is given (an emoji split over byte tokens decodes whole), else
from the store's per-token text. Pure Python and numpy; no torch.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ..results.extract import FeatureStore

__all__ = [
    "PhraseConfig",
    "WordBackground",
    "concept_phrases",
    "distinctive_ngrams",
    "phrase_name",
    "window_words",
    "words",
]

MAX_N = 3
_WORD = re.compile(r"\w+|[^\w\s]+")


def words(text: str) -> list[str]:
    """Case-folded words and runs of symbols (``**``, ``:)``, an emoji sequence), each with a
    leading space when whitespace precedes it in the text, so a phrase joins back as it was written
    (``"**short answer:**"``, ``"well, you could"``)."""
    return [
        (" " if m.start() and text[m.start() - 1].isspace() else "") + m.group().casefold()
        for m in _WORD.finditer(text)
    ]


def _ngrams(ws: Sequence[str]) -> Iterable[tuple[str, ...]]:
    for n in range(1, MAX_N + 1):
        for i in range(len(ws) - n + 1):
            yield tuple(ws[i : i + n])


@dataclass(frozen=True)
class PhraseConfig:
    """How phrases are found (defaults fit responses of ~100 tokens and 32 top contexts per feature)."""

    window: int = 4  # words either side of the word the peak token is in
    features: int = 8  # member features (most frequent first) whose top contexts are read
    contexts: int = 16  # top contexts per feature
    prior: float = 100.0  # total pseudo-count of the background prior (α₀)
    min_windows: int = 3  # an n-gram must occur in at least this many windows
    min_z: float = 3.0
    n_phrases: int = 3
    background_texts: int = 5_000  # responses sampled for the background counts (~500k words)


class WordBackground:
    """Word n-gram counts over (a sample of) the responses: the prior and the comparison."""

    def __init__(self, texts: Iterable[str]):
        self.counts: Counter = Counter()
        self.total = [0] * (MAX_N + 1)
        for t in texts:
            ws = words(t)
            self.counts.update(_ngrams(ws))
            for n in range(1, MAX_N + 1):
                self.total[n] += max(len(ws) - n + 1, 0)

    @classmethod
    def of_store(cls, store: FeatureStore, cfg: PhraseConfig, seed: int = 0) -> WordBackground:
        pairs = store.pairs()
        rows = np.random.default_rng(seed).permutation(2 * len(pairs))[: cfg.background_texts]
        return cls(pairs[r // 2].chosen if r % 2 == 0 else pairs[r // 2].rejected for r in rows)


def distinctive_ngrams(
    windows: Sequence[Sequence[str]], background: WordBackground, cfg: PhraseConfig
) -> list[tuple[tuple[str, ...], float, int]]:
    """(n-gram, z, windows) of the word n-grams over-represented in ``windows`` (each a list of
    words) against the background, best first. An n-gram counts once per window."""
    fg: Counter = Counter()
    n_fg = [0] * (MAX_N + 1)
    for ws in windows:
        fg.update(set(_ngrams(ws)))
        for n in range(1, MAX_N + 1):
            n_fg[n] += max(len(ws) - n + 1, 0)
    grams = [g for g, c in fg.items() if c >= cfg.min_windows]
    if not grams:
        return []
    n = np.array([len(g) for g in grams])
    y_fg = np.array([fg[g] for g in grams], dtype=np.float64)
    y_bg = np.array([background.counts.get(g, 0) for g in grams], dtype=np.float64)
    N_fg = np.array(n_fg, dtype=np.float64)[n]
    N_bg = np.maximum(np.array(background.total, dtype=np.float64)[n], 1.0)
    a0 = cfg.prior
    alpha = a0 * (y_bg + 0.5) / (N_bg + 0.5)  # the background's own frequencies, α₀ pseudo-counts
    log_odds = lambda y, N: np.log(y + alpha) - np.log(np.maximum(N + a0 - y - alpha, 1e-9))
    z = (log_odds(y_fg, N_fg) - log_odds(y_bg, N_bg)) / np.sqrt(1.0 / (y_fg + alpha) + 1.0 / (y_bg + alpha))
    order = np.argsort(-z, kind="stable")
    return [(grams[i], float(z[i]), int(y_fg[i])) for i in order if z[i] >= cfg.min_z]


def _join(gram: tuple[str, ...]) -> str:
    return "".join(gram).strip()


def _find(big: Sequence[str], small: Sequence[str]) -> list[int]:
    k = len(small)
    return [i for i in range(len(big) - k + 1) if tuple(big[i : i + k]) == tuple(small)]


def grow(
    gram: tuple[str, ...], windows: Sequence[Sequence[str]], share: float = 0.6, max_words: int = 10
) -> tuple[str, ...]:
    """Extend ``gram`` a word at a time, left or right, while one neighbour follows it in at least
    ``share`` of the windows where it has a neighbour on that side: a planted sentence comes back
    whole, not as its three best words."""
    while len(gram) < max_words:
        grown = False
        for side in (1, -1):
            nb: Counter = Counter()
            for ws in windows:
                for i in _find(ws, gram)[:1]:
                    j = i + len(gram) if side == 1 else i - 1
                    if 0 <= j < len(ws):
                        nb[ws[j]] += 1
            if nb:
                word, c = nb.most_common(1)[0]
                if c >= 2 and c >= share * sum(nb.values()):
                    gram = gram + (word,) if side == 1 else (word,) + gram
                    grown = True
                    break
        if not grown:
            break
    return gram


def phrase_name(
    candidates: Sequence[tuple[tuple[str, ...], float, int]], cfg: PhraseConfig, windows: Sequence[Sequence[str]] = ()
) -> list[str]:
    """The top phrases as text, each grown to the words that keep following it in ``windows``.
    One inside an already chosen phrase adds nothing."""
    chosen: list[tuple[str, ...]] = []
    for gram, _, _ in candidates:
        if any(_find(c, gram) for c in chosen):
            continue
        gram = grow(gram, windows) if windows else gram
        chosen = [c for c in chosen if not _find(gram, c)]
        chosen.append(gram)
        if len(chosen) >= cfg.n_phrases:
            break
    return [_join(c) for c in chosen]


def window_words(tokens: np.ndarray, pos: int, cfg: PhraseConfig, decode: Callable[[list[int]], str]) -> list[str]:
    """The ``cfg.window`` words either side of the word holding token ``pos`` of one response's
    ``tokens`` (counted in words, so a tokenizer that splits words finely sees as much text)."""
    a, b = max(0, pos - 6 * cfg.window), min(len(tokens), pos + 6 * cfg.window + 1)
    ids = [int(t) for t in tokens[a:b]]
    ws = words(decode(ids))
    peak = max(len(words(decode(ids[: pos - a + 1]))) - 1, 0)
    lo, hi = max(int(a > 0), peak - cfg.window), min(len(ws) - int(b < len(tokens)), peak + cfg.window + 1)
    return ws[lo:hi]


def peak_windows(
    store: FeatureStore, features: Sequence[int], cfg: PhraseConfig, decode: Callable[[list[int]], str]
) -> list[list[str]]:
    """The words around each top context of ``features`` (one window per distinct peak)."""
    top_ptr, top_row, top_pos = store.array("top_indptr"), store.array("top_row"), store.array("top_pos")
    seen, out = set(), []
    for f in features:
        for j in range(int(top_ptr[f]), int(min(top_ptr[f + 1], top_ptr[f] + cfg.contexts))):
            row, pos = int(top_row[j]), int(top_pos[j])
            if (row, pos) not in seen:
                seen.add((row, pos))
                out.append(window_words(store.response_tokens(row), pos, cfg, decode))
    return out


def concept_phrases(
    store: FeatureStore,
    members: Sequence[Sequence[int]],
    support: np.ndarray,
    cfg: PhraseConfig | None = None,
    decode: Callable[[list[int]], str] | None = None,
    seed: int = 0,
) -> list[list[str]]:
    """Per concept (``members``: its feature ids), its most distinctive phrases around the peaks
    of its ``cfg.features`` most frequent member features (``support``: per-feature firing count)."""
    cfg = cfg or PhraseConfig()
    if not members:
        return []
    text = store.token_text()
    decode = decode or (lambda ids: "".join(text.get(t, "") for t in ids))
    background = WordBackground.of_store(store, cfg, seed)
    out = []
    for feats in members:
        top = sorted(feats, key=lambda f: -support[f])[: cfg.features]
        windows = peak_windows(store, top, cfg, decode)
        out.append(phrase_name(distinctive_ngrams(windows, background, cfg), cfg, windows))
    return out
