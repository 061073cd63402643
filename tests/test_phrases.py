"""Concept names from distinctive phrases: a phrase planted where a concept peaks is its name."""

import re

import numpy as np
import pytest

from anatomy_nb.concepts.phrases import (
    PhraseConfig,
    WordBackground,
    distinctive_ngrams,
    phrase_name,
    window_words,
    words,
)

SYMBOLS = ["🌧", "☂", "✨", "⚡", "🦜", "§", "¤", "†", "♫", "~", "#", "%", "@"]


@pytest.fixture(scope="module")
def corpus(hh_pairs_300):
    texts = [p.chosen for p in hh_pairs_300] + [p.rejected for p in hh_pairs_300]
    vocab = sorted({w for t in texts for w in re.findall(r"[a-z]{5,10}", t.lower())})
    return texts, vocab


@pytest.fixture(scope="module")
def hh_pairs_300():
    from anatomy_nb.data.pairs import load_pairs

    return list(load_pairs("hh-rlhf", limit=300))


def plant_and_name(texts, vocab, tokenizer, seed, fraction=0.1, noise=0.3):
    """Plant a fresh random phrase (3 corpus words and a symbol string) at a random word position
    of ``fraction`` of the responses; the concept's peaks are a random token inside each plant,
    plus ``noise`` × as many peaks at random tokens of random responses. Returns (planted words,
    symbols, name)."""
    rng = np.random.default_rng(seed)
    planted_words = list(rng.choice(vocab, 3, replace=False))
    symbols = "".join(rng.choice(SYMBOLS, int(rng.integers(1, 4))))
    phrase = " ".join(planted_words) + " " + symbols
    texts = list(texts)
    hits = rng.choice(len(texts), int(fraction * len(texts)), replace=False)
    cfg = PhraseConfig()
    decode = tokenizer.decode
    windows = []
    for i in hits:
        ws = texts[i].split(" ")
        at = int(rng.integers(0, len(ws) + 1))
        prefix = " ".join(ws[:at]) + (" " if at else "")
        texts[i] = prefix + phrase + (" " if at < len(ws) else "") + " ".join(ws[at:])
        enc = tokenizer(texts[i], add_special_tokens=False, return_offsets_mapping=True)
        inside = [
            k for k, (a, b) in enumerate(enc["offset_mapping"]) if a >= len(prefix) and b <= len(prefix) + len(phrase)
        ]
        windows.append(window_words(np.asarray(enc["input_ids"]), int(rng.choice(inside)), cfg, decode))
    for i in rng.choice(len(texts), int(noise * len(hits))):
        ids = tokenizer(texts[i], add_special_tokens=False)["input_ids"]
        windows.append(window_words(np.asarray(ids), int(rng.integers(0, len(ids))), cfg, decode))
    name = phrase_name(distinctive_ngrams(windows, WordBackground(texts), cfg), cfg, windows)
    return planted_words, symbols, name


@pytest.mark.parametrize("seed", range(6))
def test_a_planted_phrase_names_its_concept(corpus, tiny_lm, seed):
    texts, vocab = corpus
    planted_words, symbols, name = plant_and_name(texts, vocab, tiny_lm.tokenizer, seed)
    joined = " · ".join(name)
    assert all(w in joined for w in planted_words), (planted_words, symbols, name)
    assert symbols.casefold() in joined.replace(" ", ""), (planted_words, symbols, name)


def test_peaks_on_everyday_words_name_nothing_distinctive(corpus, tiny_lm):
    """Windows at random positions of random responses: no phrase is distinctive at z ≥ 3 beyond
    what chance gives (at most one short n-gram)."""
    texts, _ = corpus
    rng = np.random.default_rng(0)
    cfg = PhraseConfig()
    windows = []
    for i in rng.choice(len(texts), 40):
        ids = tiny_lm.tokenizer(texts[i], add_special_tokens=False)["input_ids"]
        windows.append(window_words(np.asarray(ids), int(rng.integers(0, len(ids))), cfg, tiny_lm.tokenizer.decode))
    assert len(phrase_name(distinctive_ngrams(windows, WordBackground(texts), cfg), cfg, windows)) <= 1


def test_words_keep_symbol_runs_and_fold_case():
    assert words("Hello **World** 🌧☂ it’s, ok") == ["hello", " **", "world", "**", " 🌧☂", " it", "’", "s", ",", " ok"]
