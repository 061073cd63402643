"""The normaliser: every supported format, and bad input located by file, record and field."""

import gzip
import json

import pandas as pd
import pytest

from anatomy_nb.data.pairs import DataError, load_pairs

HH = {
    "chosen": "\n\nHuman: Hi?\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant: Fine, thanks.",
    "rejected": "\n\nHuman: Hi?\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant: Go away.",
}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# --- formats -----------------------------------------------------------------------------------


def test_vendored_hh_rlhf_splits_shared_prefix_and_counts_skips():
    ps = load_pairs("hh-rlhf")
    assert len(ps) == 2303
    assert ps.report.n_records == 2312
    assert ps.report.skipped == {"empty_response": 4, "prefix_mismatch": 5}
    p = ps[0]
    assert [m["role"] for m in p.prompt] == ["user", "assistant", "user", "assistant", "user"]
    assert p.prompt[0]["content"] == "what are some pranks with a pen i can do?"
    assert p.chosen.startswith("No, sorry!") and p.rejected.startswith("There are lots of funny things")


def test_hh_transcript_record(tmp_path):
    ps = load_pairs(write_jsonl(tmp_path / "d.jsonl", [HH]))
    assert ps[0].prompt == (
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How are you?"},
    )
    assert (ps[0].chosen, ps[0].rejected) == ("Fine, thanks.", "Go away.")
    assert ps[0].metadata["format"] == "hh-rlhf"


def test_trl_string_and_conversational_formats(tmp_path):
    recs = [
        {"id": "a", "prompt": "Say hi", "chosen": "Hi!", "rejected": "No."},
        {
            "id": "b",
            "prompt": [{"role": "user", "content": "Say hi"}],
            "chosen": [{"role": "assistant", "content": "Hi!"}],
            "rejected": [{"role": "assistant", "content": "No."}],
        },
        # implicit prompt: the shared prefix of two conversations
        {
            "id": "c",
            "chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "good"}],
            "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "bad"}],
        },
    ]
    ps = load_pairs(write_jsonl(tmp_path / "t.jsonl", recs))
    assert [p.id for p in ps] == ["a", "b", "c"]
    assert ps[0].prompt == ps[1].prompt == ({"role": "user", "content": "Say hi"},)
    assert ps[2].prompt == ({"role": "user", "content": "Q"},) and ps[2].chosen == "good"


def test_sharegpt_pandalm_oasst_vendored():
    sg = load_pairs("llamafactory-dpo-demo")
    assert len(sg) == 300 and sg[0].prompt[0]["role"] == "user"
    pl = load_pairs("pandalm")
    # ties are dropped and counted, not errors
    assert pl.report.skipped["tie"] > 0
    assert all(p.metadata["votes"] for p in pl)
    oa = load_pairs("oasst-en100")
    assert len(oa) > 200
    assert all(p.metadata["chosen_rank"] < p.metadata["rejected_rank"] for p in oa)


def test_pandalm_majority_vote(tmp_path):
    rec = {
        "instruction": "Do X",
        "input": "",
        "response1": "one",
        "response2": "two",
        "annotator1": 2,
        "annotator2": 2,
        "annotator3": 1,
    }
    ps = load_pairs(write_jsonl(tmp_path / "p.jsonl", [rec]))
    assert (ps[0].chosen, ps[0].rejected) == ("two", "one")


def test_csv_parquet_gzip_and_field_map(tmp_path):
    df = pd.DataFrame({"question": ["Q1", "Q2"], "good": ["yes", "sure"], "bad": ["no", "nope"]})
    df.to_csv(tmp_path / "d.csv", index=False)
    df.to_parquet(tmp_path / "d.parquet")
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as fh:
        for r in df.to_dict("records"):
            fh.write(json.dumps(r) + "\n")
    fm = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    for name in ("d.csv", "d.parquet", "d.jsonl.gz"):
        ps = load_pairs(tmp_path / name, field_map=fm)
        assert [(p.prompt_text, p.chosen, p.rejected) for p in ps] == [("Q1", "yes", "no"), ("Q2", "sure", "nope")], (
            name
        )


def test_iterable_of_records_and_limit():
    recs = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(10)]
    ps = load_pairs(recs, limit=3)
    assert len(ps) == 3 and ps.content_hash() == load_pairs(recs, limit=3).content_hash()


# --- bad input: at least ten kinds, each located -----------------------------------------------------


BAD = [
    ("missing_field", {"prompt": "q", "chosen": "a"}, "field 'rejected'"),
    ("wrong_type", {"prompt": "q", "chosen": 5, "rejected": "b"}, "field 'chosen'"),
    ("empty_response", {"prompt": "q", "chosen": "   ", "rejected": "b"}, "field 'chosen': is empty"),
    ("identical_responses", {"prompt": "q", "chosen": "same", "rejected": "same "}, "identical"),
    (
        "prefix_mismatch",
        {"chosen": HH["chosen"], "rejected": HH["rejected"].replace("Hi?", "Hey?")},
        "different prompts",
    ),
    ("bad_role", {"prompt": [{"role": "wizard", "content": "q"}], "chosen": "a", "rejected": "b"}, "unknown role"),
    ("empty_prompt", {"prompt": "  ", "chosen": "a", "rejected": "b"}, "field 'prompt': is empty"),
    ("unknown_format", {"question": "q", "answer": "a"}, "unrecognised record"),
    (
        "bad_transcript",
        {"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hi\n\nAssistant: x"},
        "does not end with an Assistant turn",
    ),
    ("wrong_type", {"prompt": "q", "chosen": "a", "rejected": "b", "id": [1]}, "field 'id'"),
]


@pytest.mark.parametrize("reason,bad,message", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_record_is_located_and_lenient_mode_counts_it(tmp_path, reason, bad, message):
    good = {"prompt": "fine", "chosen": "a", "rejected": "b"}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, bad, dict(good, prompt="fine too")])
    with pytest.raises(DataError) as exc:
        load_pairs(path)
    err = exc.value
    assert str(path) in str(err) and "record line 2" in str(err) and message in str(err)
    assert err.reason == reason
    ps = load_pairs(path, strict=False)
    assert len(ps) == 2 and ps.report.skipped[reason] == 1 and ps.report.n_records == 3


def test_broken_json_line(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q2", "chosen": \n')
    with pytest.raises(DataError, match=r"b\.jsonl, record line 2: broken JSON"):
        load_pairs(path)
    ps = load_pairs(path, strict=False)
    assert len(ps) == 1 and ps.report.skipped["broken_json"] == 1


def test_bad_encoding(tmp_path):
    path = tmp_path / "enc.jsonl"
    path.write_bytes(
        b'{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n'
    )
    with pytest.raises(DataError, match=r"not valid UTF-8 at byte \d+ \(line 2\)"):
        load_pairs(path)


def test_duplicate_ids(tmp_path):
    path = write_jsonl(
        tmp_path / "dup.jsonl",
        [
            {"id": "x", "prompt": "q", "chosen": "a", "rejected": "b"},
            {"id": "x", "prompt": "q2", "chosen": "a", "rejected": "b"},
        ],
    )
    with pytest.raises(
        DataError, match=r"record line 2, field 'id': duplicate pair id 'x' \(first seen at record line 1\)"
    ):
        load_pairs(path)


def test_bad_files(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_pairs(tmp_path / "missing.jsonl")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(DataError, match="unsupported file type"):
        load_pairs(tmp_path / "x.txt")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no preference pairs found"):
        load_pairs(tmp_path / "e.jsonl")
    (tmp_path / "o.json").write_text('{"a": 1}')
    with pytest.raises(DataError, match="expected a JSON list"):
        load_pairs(tmp_path / "o.json")
    (tmp_path / "g.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match="not a valid gzip file"):
        load_pairs(tmp_path / "g.jsonl.gz")
    with pytest.raises(ValueError, match="unknown format"):
        load_pairs("hh-rlhf", format="nope")


def test_datasets_load_dataset_names_go_through_the_same_normaliser(tmp_path):
    """A name that is not a file goes to datasets.load_dataset (here its offline 'json' builder)."""
    path = write_jsonl(tmp_path / "hub_like.jsonl", [{"question": "Q", "response_j": "good", "response_k": "bad"}])
    ps = load_pairs(
        "json", data_files=str(path), field_map={"prompt": "question", "chosen": "response_j", "rejected": "response_k"}
    )
    assert (ps[0].prompt_text, ps[0].chosen, ps[0].rejected) == ("Q", "good", "bad")
    assert ps.report.source == "json[train]"
    with pytest.raises(DataError, match="datasets.load_dataset failed"):
        load_pairs("no-such-org/no-such-dataset-anatomy-nb")


def test_corrupt_parquet_short_or_long_csv_rows_and_boolean_ids_are_named(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"bad\.parquet.*not a readable Parquet file"):
        load_pairs(tmp_path / "bad.parquet")
    (tmp_path / "long.csv").write_text("prompt,chosen,rejected\nq,a,b\nq2,a,b,extra\n")
    with pytest.raises(DataError, match=r"long\.csv.*row 3.*1 more field\(s\) than the header"):
        load_pairs(tmp_path / "long.csv")
    lenient = load_pairs(tmp_path / "long.csv", strict=False)
    assert len(lenient) == 1 and lenient.report.skipped == {"bad_row": 1}
    (tmp_path / "short.csv").write_text("prompt,chosen,rejected\nq,a\n")
    with pytest.raises(DataError, match=r"row 2.*fewer fields than the header \(no 'rejected'\)"):
        load_pairs(tmp_path / "short.csv")
    path = write_jsonl(tmp_path / "bool.jsonl", [{"id": True, "prompt": "q", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match=r"field 'id': expected a string or integer id, got bool"):
        load_pairs(path)
