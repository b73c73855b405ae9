"""varup.lm.dolly: reading the dolly JSONL, prompt templates, the seeded split, the prepared files."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from varup.lm.dolly import TEMPLATES, format_prompt, prepare_dolly, read_dolly, read_dolly_datasets, split_dolly

CATS = ("open_qa", "closed_qa", "summarization")


def _records() -> list[dict]:
    """12 records, 4 per category; closed_qa and summarization ones carry a context."""
    out = []
    for i in range(12):
        cat = CATS[i % 3]
        out.append({"instruction": f"Question {i} about {{braces}}?", "context": "" if cat == "open_qa" else
                    f"Passage {i}.\nSecond line.", "response": f"Answer {i} \u00e9t\u00e9.", "category": cat})
    return out


@pytest.fixture
def src(tmp_path) -> Path:
    p = tmp_path / "dolly.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in _records()), encoding="utf-8")
    return p


def test_read(src):
    recs = read_dolly(src)
    assert len(recs) == 12
    assert [r["id"] for r in recs] == list(range(12))
    assert [{k: v for k, v in r.items() if k != "id"} for r in recs] == _records()


@pytest.mark.parametrize("key", ["instruction", "context", "response", "category"])
def test_read_missing_key_names_line_and_key(tmp_path, key):
    recs = _records()
    del recs[4][key]
    p = tmp_path / "bad.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(ValueError) as ei:
        read_dolly(p)
    msg = str(ei.value)
    assert str(p) in msg and "line 5" in msg and repr(key) in msg


def test_read_bad_json_and_types(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(_records()[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match="line 2.*invalid JSON"):
        read_dolly(p)
    p.write_text(json.dumps({**_records()[0], "context": None}) + "\n")
    with pytest.raises(ValueError, match="line 1.*'context' must be a string"):
        read_dolly(p)


def test_format_dolly_template():
    head = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\nSay hi.\n\n")
    assert format_prompt({"instruction": "Say hi.", "context": ""}, "dolly") == head + "### Response:\n"
    assert format_prompt({"instruction": "Say hi.", "context": "To Bob."}, "dolly") == \
        head + "### Input:\nTo Bob.\n\n### Response:\n"
    # the template spelt out behaves like its name
    assert format_prompt({"instruction": "Say hi.", "context": "To Bob."}, TEMPLATES["dolly"]) == \
        head + "### Input:\nTo Bob.\n\n### Response:\n"


def test_format_plain_template():
    assert format_prompt({"instruction": "Say hi.", "context": ""}, "plain") == "Say hi.\n"
    assert format_prompt({"instruction": "Say hi.", "context": "To Bob."}, "plain") == "Say hi.\nTo Bob.\n"
    assert format_prompt({"instruction": "Say hi."}, "plain") == "Say hi.\n"  # no context key at all
    assert format_prompt({"instruction": "Say hi.", "context": "  \n"}, "plain") == "Say hi.\n"  # blank = none


def test_format_literal_template():
    t = "Q: {instruction}\n{context_block}A:"
    assert format_prompt({"instruction": "x {y}", "context": ""}, t) == "Q: x {y}\nA:"
    assert format_prompt({"instruction": "x", "context": "c {0}"}, t) == "Q: x\nc {0}\nA:"
    assert format_prompt({"instruction": "x", "context": "c"}, t, context_block="[{context}] ") == "Q: x\n[c] A:"
    assert format_prompt({"instruction": "x", "context": "c"}, "{instruction}|{context}") == "x|c"


def test_format_errors():
    with pytest.raises(ValueError, match="'question'"):
        format_prompt({"instruction": "x", "context": ""}, "Q: {question}\nA:")
    with pytest.raises(ValueError, match="unknown prompt template 'alpaca'"):
        format_prompt({"instruction": "x", "context": ""}, "alpaca")
    with pytest.raises(ValueError, match="'instruction'"):
        format_prompt({"instruction": "x", "context": "c"}, "dolly", context_block="{instruction}")


def test_split_deterministic_disjoint(src):
    recs = read_dolly(src)
    tr, ev = split_dolly(recs, n_eval=3, seed=7)
    tr2, ev2 = split_dolly(recs, n_eval=3, seed=7)
    assert tr == tr2 and ev == ev2
    ids_tr, ids_ev = [r["id"] for r in tr], [r["id"] for r in ev]
    assert len(ids_ev) == 3 and len(ids_tr) == 9
    assert set(ids_tr).isdisjoint(ids_ev) and sorted(ids_tr + ids_ev) == list(range(12))
    others = [sorted(r["id"] for r in split_dolly(recs, n_eval=3, seed=s)[1]) for s in range(8, 14)]
    assert any(o != sorted(ids_ev) for o in others)  # the seed matters
    tr_all, ev0 = split_dolly(recs, n_eval=0, seed=7)
    assert ev0 == [] and len(tr_all) == 12


def test_split_categories_and_errors(src):
    recs = read_dolly(src)
    tr, ev = split_dolly(recs, n_eval=2, seed=0, categories=["open_qa", "summarization"])
    assert len(tr) == 6 and len(ev) == 2
    assert {r["category"] for r in tr + ev} <= {"open_qa", "summarization"}
    with pytest.raises(ValueError, match=r"n_eval=9 but only 8 records"):
        split_dolly(recs, n_eval=9, seed=0, categories=["open_qa", "summarization"])
    with pytest.raises(ValueError, match=r"n_eval=13 but only 12"):
        split_dolly(recs, n_eval=13, seed=0)
    with pytest.raises(ValueError, match="brainstorm"):
        split_dolly(recs, n_eval=1, seed=0, categories=["open_qa", "brainstorm"])


def test_prepare_dolly(src, tmp_path):
    out = tmp_path / "prep"
    summary = prepare_dolly(src, out, n_eval=4, seed=3, template="dolly", categories=["closed_qa", "open_qa"])
    assert summary["n_train"] == 4 and summary["n_eval"] == 4
    by = summary["by_category"]
    assert set(by) == {"closed_qa", "open_qa"}
    assert all(by[c]["train"] + by[c]["eval"] == 4 for c in by)
    assert sum(v["eval"] for v in by.values()) == 4
    assert json.loads((out / "summary.json").read_text()) == summary

    src_recs = {r["id"]: r for r in read_dolly(src)}
    rows = {}
    for name, n in (("train.jsonl", 4), ("eval.jsonl", 4)):
        lines = [json.loads(x) for x in (out / name).read_text().splitlines()]
        assert len(lines) == n and all(set(x) == {"id", "prompt", "response", "category"} for x in lines)
        rows[name] = lines
    assert {x["id"] for x in rows["train.jsonl"]}.isdisjoint(x["id"] for x in rows["eval.jsonl"])
    tr, ev = split_dolly(read_dolly(src), n_eval=4, seed=3, categories=["closed_qa", "open_qa"])
    assert [x["id"] for x in rows["eval.jsonl"]] == [r["id"] for r in ev]
    # the line-by-line reader writes the same split as datasets.load_dataset (the default)
    same = tmp_path / "prep_json"
    prepare_dolly(src, same, n_eval=4, seed=3, template="dolly", categories=["closed_qa", "open_qa"], reader="json")
    assert all((same / f).read_text() == (out / f).read_text() for f in ("train.jsonl", "eval.jsonl"))
    for x in rows["train.jsonl"] + rows["eval.jsonl"]:
        r = src_recs[x["id"]]
        assert x["prompt"] == format_prompt(r, "dolly") and x["response"] == r["response"]
        assert x["category"] == r["category"]
        assert ("### Input:\n" in x["prompt"]) == (r["category"] == "closed_qa")
    assert not list(out.glob(".*"))  # no temporary files left behind


def test_prepare_bad_template_writes_nothing(src, tmp_path):
    with pytest.raises(ValueError, match="'question'"):
        prepare_dolly(src, tmp_path / "p", n_eval=2, seed=0, template="{question}")
    assert not (tmp_path / "p" / "train.jsonl").exists()


def test_read_dolly_datasets_matches(src, tmp_path):
    pytest.importorskip("datasets")
    got = read_dolly_datasets(src, cache_dir=str(tmp_path / "hf-cache"))
    assert got == read_dolly(src)


# ---------------------------------------------------------------------- bad files and empty sets, named
def _lines(n: int = 12) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in _records()[:n])


@pytest.mark.parametrize("reader", ["datasets", "json"])
def test_bad_utf8_in_a_dolly_file_names_file_and_line(tmp_path, reader):
    """Fault: a byte that is not UTF-8 gave a bare UnicodeDecodeError (json reader) or a generic error (datasets)."""
    if reader == "datasets":
        pytest.importorskip("datasets")
    p = tmp_path / "dolly.jsonl"
    rec = json.dumps(_records()[2], ensure_ascii=False).encode().replace(b"Answer", b"Answ\xe9r")
    p.write_bytes(_lines(2) + rec + b"\n" + _lines(12)[len(_lines(3)):])
    with pytest.raises(ValueError) as e:
        prepare_dolly(p, tmp_path / "out", n_eval=2, seed=0, template="dolly", reader=reader)
    assert f"{p}, line 3: byte b'\\xe9'" in str(e.value) and "not UTF-8" in str(e.value), str(e.value)
    assert not (tmp_path / "out" / "train.jsonl").exists()


def test_a_truncated_dolly_line_names_file_and_line(tmp_path):
    """Fault: a line cut short gave datasets' generic DatasetGenerationError under the default reader; now both
    readers name the file and line."""
    pytest.importorskip("datasets")
    p = tmp_path / "dolly.jsonl"
    p.write_bytes(_lines(11) + json.dumps(_records()[11]).encode()[:30])  # the download stopped mid-record
    for reader in ("datasets", "json"):
        with pytest.raises(ValueError) as e:
            prepare_dolly(p, tmp_path / "out", n_eval=2, seed=0, template="dolly", reader=reader)
        assert f"{p}, line 12: invalid JSON" in str(e.value), (reader, str(e.value))


def test_an_empty_split_names_the_file_and_the_keys(src, tmp_path):
    """A split that empties the held-out (or the SFT) set, or categories that match nothing, stop lm_corpus naming
    the file and the lm.corpus keys, instead of failing later in SFT or scoring."""
    for kw in ({"n_eval": 0}, {"n_eval": 4, "categories": ["open_qa"]}, {"n_eval": 1, "categories": ["brainstorm"]}):
        with pytest.raises(ValueError) as e:
            prepare_dolly(src, tmp_path / "out", seed=0, template="dolly", reader="json", **kw)
        assert str(src) in str(e.value) and "lm.corpus." in str(e.value), (kw, str(e.value))
        assert not (tmp_path / "out" / "eval.jsonl").exists()


def test_an_empty_eval_set_fails_at_generation_naming_the_file(tmp_path):
    """Fault: an empty eval set wrote 0 generations with exit 0 and failed later, in scoring. Now generation stops
    before loading the model, naming the file (and a bad line by number); max_prompts 0 is refused, named."""
    from varup.lm.generate import DecodeConfig, generate

    ev = tmp_path / "eval.jsonl"
    ev.write_text("\n")
    out = tmp_path / "gens.jsonl"
    with pytest.raises(ValueError) as e:
        generate(tmp_path / "no-model", ev, out, decode={}, seed=0, device="cpu")
    assert f"{ev}: no held-out prompt" in str(e.value) and "lm.corpus" in str(e.value)
    assert not out.exists()
    ev.write_text(json.dumps({"id": 0, "prompt": "p", "response": "r"}) + "\n" + '{"id": 1, "prompt": "q"\n')
    with pytest.raises(ValueError, match=re.escape(f"{ev}, line 2: invalid JSON")):
        generate(tmp_path / "no-model", ev, out, decode={}, seed=0, device="cpu")
    with pytest.raises(ValueError, match=r"lm\.generate\.max_prompts must be an integer >= 1 or null, got 0"):
        DecodeConfig(max_prompts=0)


def test_scoring_fewer_than_two_generations_names_the_generations_file(tmp_path):
    """Fault: "MAUVE needs at least 2 samples" named no file. Now the generations file is named, before the
    featurizer is loaded."""
    from varup.lm.score import score_generations

    gens, ev = tmp_path / "generations.jsonl", tmp_path / "eval.jsonl"
    gens.write_text(json.dumps({"prompt_id": 0, "sample": 0, "prompt": "p", "generation": "g"}) + "\n")
    ev.write_text("".join(json.dumps({"id": i, "prompt": "p", "response": f"r{i}"}) + "\n" for i in range(3)))
    with pytest.raises(ValueError) as e:
        score_generations(gens, ev, tmp_path / "no-featurizer", tmp_path / "scores.json", score={}, toy=False,
                          featurizer_label="x", device="cpu")
    assert f"{gens}: 1 generations" in str(e.value) and "at least 2" in str(e.value)
    assert not (tmp_path / "scores.json").exists()
