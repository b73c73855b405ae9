"""Captions: the toy grammar against the dataset's known attributes (each kind fixes a known set of modes), the
caption table and its deterministic draws, captions files and templates, and the prompt parsing of the study."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from varup.config.textplan import text_problems
from varup.data.captions import (
    CaptionTable,
    build_caption_table,
    caption_modes,
    read_caption_file,
    template_candidates,
    toy_caption,
)
from varup.data.toy import generate_toy_dataset, read_manifest
from varup.studies.prompts import class_mix_of, n_concepts, prompt_sets, reference_rows


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toy") / "data"
    generate_toy_dataset(out, resolution=16, seed=0, n_train_per_class=16, n_val_per_class=4,
                         shapes=["circle", "square", "triangle"], colours=["red", "green"], sizes=["small", "large"],
                         backgrounds=["plain", "stripes"])
    return out


def info_of(toy: Path) -> dict:
    return json.loads((toy / "dataset.json").read_text())


def test_each_kind_allows_the_modes_its_words_fix(toy):
    info = info_of(toy)  # 3 shapes x 2 colours x 2 sizes x 2 backgrounds = 24 modes
    row = read_manifest(toy, "train")[0]
    want = {"shape": 24, "class": 8, "attributes": 2, "full": 1}
    for kind, n in want.items():
        modes = caption_modes(toy_caption(kind, row), info)
        assert len(modes) == n, kind
        assert row["mode"] in modes  # a caption is true of its image
    assert len(caption_modes("a circle or a square", info)) == 16
    assert len(caption_modes("a circle or a square or a triangle", info)) == 24
    full = caption_modes(toy_caption("full", row), info)[0]
    m = info["modes"][full]
    assert (m["shape"], m["colour"], m["size"], m["background"]) == (row["class_name"], row["colour"], row["size"],
                                                                      row["background"])
    assert toy_caption("full", {**row, "background": "stripes"}).endswith("on a striped background")


def test_the_table_holds_every_true_caption_with_the_kind_weights(toy, tmp_path):
    meta = build_caption_table(toy, tmp_path, {"kind": "toy", "kind_weights": {"or3": 0, "full": 2}})
    table = CaptionTable(tmp_path)
    info, rows = info_of(toy), read_manifest(toy, "train")
    assert len(table) == len(rows) == meta["n_images"]
    for j, r in enumerate(rows):
        ids = table.ids[table.offsets[j]:table.offsets[j + 1]]
        w = table.weights[table.offsets[j]:table.offsets[j + 1]]
        assert np.isclose(w.sum(), 1.0)
        for i in ids:
            assert r["mode"] in caption_modes(table.captions[i], info)  # every candidate is true of the image
        kinds = [meta["kinds"][i] for i in ids]
        assert "or3" not in kinds and kinds.count("or2") == 2  # its shape with each of the 2 others
        full = w[kinds.index("full")]
        assert np.isclose(full, 2 * w[kinds.index("class")])
    assert meta["n_modes"][meta["captions"].index("a shape")] == 24


def test_draws_are_a_pure_function_of_seed_step_and_image(toy, tmp_path):
    build_caption_table(toy, tmp_path)
    t = CaptionTable(tmp_path)
    a, b = t.choose(range(10), seed=0, step=3), t.choose(range(10), seed=0, step=3)
    assert np.array_equal(a, b)
    assert not np.array_equal(t.choose(range(48), 0, 3), t.choose(range(48), 0, 4))
    drawn = np.concatenate([t.choose([5], 0, s) for s in range(600)])
    kinds = [t.meta["kinds"][i] for i in drawn]
    for k in ("shape", "class", "attributes", "full"):  # 1/6 each by default
        assert abs(kinds.count(k) / len(kinds) - 1 / 6) < 0.05


def test_captions_file_and_templates(toy, tmp_path):
    rows = read_manifest(toy, "train")
    f = tmp_path / "captions.csv"
    f.write_text("path,caption\n" + "".join(f"{r['path']},a {r['colour']} thing\n" for r in rows)
                 + f"{rows[0]['path']},another caption\n")
    per = read_caption_file(f, [r["path"] for r in rows])
    assert per[0] == [(f"a {rows[0]['colour']} thing", "file", 0.5), ("another caption", "file", 0.5)]
    txt = tmp_path / "image_captions.txt"  # VAR-CLIP's format
    txt.write_text("".join(f"{r['path']}: a {r['class_name']}\n" for r in rows))
    assert read_caption_file(txt, [rows[3]["path"]]) == [[(f"a {rows[3]['class_name']}", "file", 1.0)]]
    f.write_text("path,caption\n" + f"{rows[0]['path']},x\n")
    with pytest.raises(ValueError, match="have no caption"):
        read_caption_file(f, [r["path"] for r in rows])
    (tmp_path / "bad.csv").write_text("file,text\na,b\n")
    with pytest.raises(ValueError, match="'path' and 'caption'"):
        read_caption_file(tmp_path / "bad.csv", ["a"])
    assert template_candidates(["golden_retriever"], ["a photo of a {}"]) == [[("a photo of a golden retriever",
                                                                                "template", 1.0)]]
    with pytest.raises(ValueError, match="'{}'"):
        template_candidates(["x"], ["no slot"])


def test_a_caption_with_an_unquoted_comma_is_refused_naming_file_and_line(tmp_path):
    """Fault: `a circle, striped` unquoted was stored as `a circle`. Now a row with more fields than the header (or
    fewer) is refused, naming the file and line and saying to quote; a quoted comma is kept."""
    f = tmp_path / "captions.csv"
    f.write_text('path,caption\na.png,"a circle, striped"\n\nb.png,a circle, striped\n')
    with pytest.raises(ValueError) as e:
        read_caption_file(f, ["a.png", "b.png"])
    assert f"{f}, line 4:" in str(e.value) and "3 fields" in str(e.value) and "quote" in str(e.value)
    f.write_text('path,caption\na.png,"a circle, striped"\nb.png\n')
    with pytest.raises(ValueError, match=r"line 3: 1 fields, but the header has 2"):
        read_caption_file(f, ["a.png", "b.png"])
    f.write_text('path,caption\r\na.png,"a circle, striped"\r\nb.png,"two\r\nlines"\r\nc.png,x\r\n')
    assert read_caption_file(f, ["a.png", "b.png"]) == [[("a circle, striped", "file", 1.0)],
                                                       [("two\r\nlines", "file", 1.0)]]
    f.write_text('path,caption\na.png,"a circle" striped\n')
    with pytest.raises(ValueError, match=r"line 2: not a valid CSV row"):
        read_caption_file(f, ["a.png"])


def test_undecodable_caption_bytes_name_file_and_line(tmp_path):
    """Fault: a byte that is not UTF-8 gave a bare UnicodeDecodeError; now the file and line are named (CSV and
    VAR-CLIP's .txt alike)."""
    for name, head, bad in (("captions.csv", b"path,caption\na.png,a circle\n", b"b.png,caf\xe9 au lait\n"),
                            ("captions.txt", b"a.png: a circle\n", b"b.png:caf\xe9 au lait\n")):
        f = tmp_path / name
        f.write_bytes(head + bad)
        with pytest.raises(ValueError) as e:
            read_caption_file(f, ["a.png", "b.png"])
        line = head.count(b"\n") + 1
        assert f"{f}, line {line}: byte b'\\xe9' at column 10 is not UTF-8" in str(e.value), str(e.value)
    (tmp_path / "bad.txt").write_text("a.png: a circle\nno separator here\n")
    with pytest.raises(ValueError, match=r"bad.txt, line 2: expected VAR-CLIP's 'path: caption'"):
        read_caption_file(tmp_path / "bad.txt", ["a.png"])


def test_study_prompts_map_to_classes_only_when_they_name_only_classes():
    names = ["circle", "square", "golden_retriever"]
    assert class_mix_of("a circle", names) == [0]
    assert class_mix_of("A square or a circle", names) == [0, 1]
    assert class_mix_of("a golden retriever or a circle", names) == [0, 2]
    assert class_mix_of("a large red circle", names) is None  # a detail no class embedding carries
    assert class_mix_of("a shape", names) is None
    assert n_concepts("a circle or a square or a triangle") == 3
    sets = prompt_sets({"droppath": {"prompt": "a circle", "rates": [0.1, 0.2]}, "entanglement": ["a circle"],
                        "descriptiveness": ["a shape", "a circle"], "set_droppath_rate": 0.05})
    assert [(s["study"], s.get("rate"), s.get("level")) for s in sets] == [
        ("droppath", 0.1, None), ("droppath", 0.2, None), ("entanglement", 0.05, None),
        ("descriptiveness", 0.05, 0), ("descriptiveness", 0.05, 1)]
    names = [s["set"] for s in sets]  # one image set per distinct (prompt, rate)
    assert names[2] == names[4] and len(set(names)) == 4


def test_reference_pool_is_balanced_per_mode(toy):
    rows = read_manifest(toy, "train")
    pool = reference_rows(rows, info_of(toy), per_group=2)
    modes = np.array([rows[i]["mode"] for i in pool])
    assert len(pool) == 24 * 2 and np.all(np.bincount(modes) == 2)


def test_config_prompts_outside_the_toy_grammar_are_rejected_naming_the_key():
    from varup.config.schema import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "config" / "config.yaml")
    cfg["text"]["enabled"] = True
    assert text_problems(cfg) == []
    cfg["text"]["prompts"]["entanglement"] = ["a circle", "a circle or a teddy"]
    problems = text_problems(cfg)
    assert len(problems) == 1 and problems[0].startswith("text/prompts/entanglement/1") and "teddy" in problems[0]
    cfg["text"]["methods"] = ["baseline", "nope"]
    assert any(p.startswith("text/methods/1") for p in text_problems(cfg))
