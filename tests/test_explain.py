"""LLM explanations: templates, backends and the fidelity score, with deterministic backends."""

from anatomy_nb.concepts.explain import (
    OpenAICompatibleBackend,
    TransformersBackend,
    explain_concept,
    fidelity,
    load_prompt,
)

from helpers import ChatServer, KeywordJudge


def test_openai_compatible_backend_speaks_the_chat_api(monkeypatch):
    server = ChatServer(answer=lambda prompt, max_tokens: " yes \n")
    try:
        monkeypatch.setenv("ANATOMY_NB_TEST_KEY", "k123")
        backend = OpenAICompatibleBackend(server.url, "some-model", api_key_env="ANATOMY_NB_TEST_KEY", timeout=10)
        assert backend.complete("hello", max_new_tokens=3) == "yes"
    finally:
        server.close()
    (seen,) = server.requests
    assert seen["path"] == "/v1/chat/completions" and seen["auth"] == "Bearer k123"
    assert (
        seen["messages"] == [{"role": "user", "content": "hello"}]
        and seen["temperature"] == 0
        and seen["max_tokens"] == 3
    )


def test_templates_are_files_with_placeholders():
    assert "{examples}" in load_prompt("explain_concept")
    assert "{explanation}" in load_prompt("score_fidelity") and "{text}" in load_prompt("score_fidelity")


def test_a_faithful_explanation_scores_high_and_a_wrong_one_does_not():
    judge = KeywordJudge()
    ctx = [{"tokens": ["I", " am", " sorry", ","], "peak": 2}]
    expl = explain_concept(judge, ctx, inactive=["Sure, here it is."])
    assert expl == "the word sorry"
    texts = ["I am sorry about that", "Here you go", "So sorry!", "Great idea", "sorry, no", "Fine"]
    fired = [True, False, True, False, True, False]
    good = fidelity(judge, expl, texts, fired)
    bad = fidelity(judge, "the word banana", texts, fired)
    assert good["auroc"] == 1.0 and good["accuracy"] == 1.0
    assert bad["auroc"] == 0.5 and bad["said_yes"] == 0.0


def test_transformers_backend_generates_deterministically(tiny_lm):
    b = TransformersBackend(tiny_lm)
    a1, a2 = b.complete("Describe this.", max_new_tokens=5), b.complete("Describe this.", max_new_tokens=5)
    assert isinstance(a1, str) and a1 == a2


def test_hypothesize_adds_explanations_with_fidelity(tiny_lm, tiny_sae_, hh_pairs, tmp_path):
    from anatomy_nb.config import ConceptConfig, ExtractConfig, HypothesizeConfig
    from anatomy_nb.stages.extract import extract
    from anatomy_nb.stages.hypothesize import hypothesize

    extract(hh_pairs, tiny_lm, tiny_sae_, tmp_path, ExtractConfig(shard_size=10, progress=False))
    cfg = HypothesizeConfig(concepts=ConceptConfig(min_support=3), explain_top=2, fidelity_texts=10)
    h = hypothesize(tmp_path, cfg, model=tiny_lm, sae=tiny_sae_, explainer=KeywordJudge())
    top = h.overall().head(2)
    assert top["llm_explanation"].str.startswith("the word").all()
    assert top["llm_fidelity_accuracy"].between(0, 1).all()
    plain = hypothesize(tmp_path, cfg, model=tiny_lm, sae=tiny_sae_)
    assert plain.path != h.path  # the explainer is part of the key


def test_an_endpoint_named_in_the_config_explains_in_batches_and_caches(tiny_lm, tiny_sae_, hh_pairs, tmp_path):
    from anatomy_nb.config import ExtractConfig
    from anatomy_nb.stages.extract import extract
    from anatomy_nb.stages.hypothesize import hypothesize

    server = ChatServer()
    try:
        extract(hh_pairs, tiny_lm, tiny_sae_, tmp_path, ExtractConfig(shard_size=10, progress=False))
        explain = {"backend": "openai", "model": "keyword-judge", "base_url": server.url, "max_workers": 4}
        cfg = {"concepts": {"min_support": 3}, "explain_top": 3, "fidelity_texts": 10, "explain": explain}
        h = hypothesize(tmp_path, cfg, model=tiny_lm, sae=tiny_sae_)
        top = h.overall().head(3)
        assert (
            top["llm_explanation"].str.startswith("the word").all() and top["llm_fidelity_accuracy"].between(0, 1).all()
        )
        llm = h.manifest["llm"]
        asked = [r["messages"][0]["content"] for r in server.requests]
        assert llm["calls"] == len(asked) == len(set(asked)) > 3 and llm["cached"] == 0  # each question once
        assert llm["prompt_tokens"] > 0 and llm["completion_tokens"] > 0 and llm["seconds"] > 0
        assert server.max_in_flight >= 2  # batched: several requests in flight
        assert {r["model"] for r in server.requests} == {"keyword-judge"}
        # another FDR is another artifact, but every question was asked before: all from the cache
        again = hypothesize(tmp_path, {**cfg, "fdr": 0.1}, model=tiny_lm, sae=tiny_sae_)
        assert again.path != h.path and len(server.requests) == len(asked)
        assert again.manifest["llm"]["cached"] >= len(asked) and again.manifest["llm"]["calls"] == 0
        assert list(again.overall().head(3)["llm_explanation"]) == list(top["llm_explanation"])
    finally:
        server.close()


def test_explain_config_names_what_is_missing():
    import pytest

    from anatomy_nb.config import ConfigError, HypothesizeConfig

    with pytest.raises((ValueError, ConfigError), match="needs explain.model"):
        HypothesizeConfig.from_dict({"explain": {"backend": "openai"}})
    with pytest.raises((ValueError, ConfigError), match="'none', 'openai' or 'transformers'"):
        HypothesizeConfig.from_dict({"explain": {"backend": "gpt"}})


def test_an_endpoint_that_does_not_answer_is_named():
    import pytest

    backend = OpenAICompatibleBackend("http://127.0.0.1:9/v1", "m", timeout=2)
    with pytest.raises(ConnectionError, match=r"127\.0\.0\.1:9/v1 \(model 'm'\) did not answer"):
        backend.complete("hi")
