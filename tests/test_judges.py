"""Refusal judges against human labels: the data, the stripping, the agreement arithmetic on
known answers, and an LLM judge over real loopback HTTP."""

import numpy as np
import pytest

from anatomy_nb.config import EvalConfig, ExplainConfig
from anatomy_nb.data.judges import FAMILIES, LLMJudge, PhraseJudge, agreement, labelled_completions, make_judge, strip_stock_phrases
from test_explain import ChatServer


def test_labelled_completions_carry_the_human_labels():
    counts = {f: labelled_completions(f)["label"].value_counts().to_dict() for f in FAMILIES}
    # the vendored files' final labels (XSTest v2, two annotators)
    assert counts["gpt4"] == {"compliance": 230, "full refusal": 211, "partial refusal": 9}
    assert counts["llama2"] == {"full refusal": 294, "compliance": 101, "partial refusal": 55}
    sample = labelled_completions("llama2", n=40, seed=3)
    assert len(sample) == 40 and sample["id"].is_unique
    with pytest.raises(ValueError, match="families"):
        labelled_completions("mistral")


def test_stripping_removes_the_stock_phrases_and_keeps_the_meaning():
    s = strip_stock_phrases("I\u2019m sorry, but I cannot help with that. As an AI developed by OpenAI, I must clarify that it is illegal.")
    assert "sorry" not in s.lower() and "cannot" not in s.lower() and "as an ai" not in s.lower()
    assert "help with that" in s and "it is illegal" in s
    stripped = labelled_completions("gpt4", "stripped")
    assert not PhraseJudge().judge(stripped["prompt"], stripped["completion"]).any()


class Oracle:
    """Says refusal exactly where people did (looked up by the text it is shown)."""

    name = "oracle"

    def __init__(self):
        self.truth = {}
        for f in FAMILIES:
            for reading in ("full", "stripped"):
                df = labelled_completions(f, reading)
                self.truth.update(dict(zip(df["completion"], df["label"] != "compliance")))

    def judge(self, prompts, responses):
        return np.array([self.truth[r] for r in responses])


class AlwaysRefuses:
    name = "always"

    def judge(self, prompts, responses):
        return np.ones(len(responses), bool)


def test_agreement_on_known_answers():
    perfect = agreement(Oracle(), n=120, seed=1)
    assert len(perfect) == 4 and set(perfect["reading"]) == {"full", "stripped"}
    for m in ("accuracy", "full_refusal_recall", "specificity"):
        assert (perfect[m] == 1.0).all() and (perfect[f"{m}_ci_low"] < 1.0).all()
    always = agreement(AlwaysRefuses(), families=["gpt4"], readings=["full"])
    row = always.iloc[0]
    assert row["full_refusal_recall"] == 1.0 and row["partial_refusal_recall"] == 1.0 and row["specificity"] == 0.0
    assert row["accuracy"] == pytest.approx(220 / 450)  # 211 full + 9 partial refusals


def test_phrase_list_agreement_shows_it_reads_phrases_not_meaning():
    df = agreement(PhraseJudge()).set_index(["family", "reading"])
    assert df.loc[("gpt4", "full"), "full_refusal_recall"] > 0.95
    assert df.loc[("llama2", "full"), "accuracy"] > 0.85
    assert (df.xs("stripped", level="reading")["full_refusal_recall"] < 0.05).all()


def test_llm_judge_over_loopback_http_scores_what_the_model_says():
    oracle = Oracle()

    def answer(prompt, max_tokens):  # reads the response out of the judge's question, as a model would
        response = prompt.split("Response: ", 1)[1].rsplit("\n\nDid the assistant refuse", 1)[0]
        return " Yes." if oracle.truth[response] else "No"

    server = ChatServer(delay=0.0, answer=answer)
    try:
        judge = make_judge(ExplainConfig(backend="openai", model="judge-model", base_url=server.url, cache=False))
        assert isinstance(judge, LLMJudge) and "judge-model" in judge.name
        df = agreement(judge, n=30, families=["llama2"])
        assert (df["accuracy"] == 1.0).all() and judge.unparsed == 0
        assert len(server.requests) == 60 and all(r["max_tokens"] == 3 for r in server.requests)
    finally:
        server.close()
    shrug = ChatServer(delay=0.0, answer=lambda p, m: "Perhaps")
    try:
        judge = LLMJudge(make_judge(ExplainConfig(backend="openai", model="m", base_url=shrug.url, cache=False)).backend, "shrug")
        assert not judge.judge(["q"], ["a"]).any() and judge.unparsed == 1
    finally:
        shrug.close()


def test_eval_config_takes_a_judge():
    cfg = EvalConfig.from_dict({"judge": {"backend": "openai", "model": "m"}, "judge_agreement_n": 50})
    assert cfg.judge.backend == "openai" and cfg.judge_agreement_n == 50
    assert isinstance(make_judge(EvalConfig().judge), PhraseJudge)
    with pytest.raises(ValueError, match="judge_agreement_n"):
        EvalConfig(judge_agreement_n=-1)
