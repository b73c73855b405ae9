"""Region σ in the prompt study (object vs background σ of each prompt set's MC mean image, for both families: the
toy's object segmented, masks from text.prompts.mask_dir elsewhere), its table columns, and the reference images
of a detailed caption (the classes it names)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from varup.report.tables import prompt_table
from varup.studies.prompts import add_region_sigma, classes_named, reference_mask

H = 32


def dataset(tmp_path, name: str):
    d = tmp_path / name
    d.mkdir()
    (d / "dataset.json").write_text(json.dumps({"name": name, "classes": ["cat", "dog", "wild"]}))
    return d


def set_maps():
    """One set's σ map (0.1 on the background, 0.3 on a red square) and mean image (grey, the red square)."""
    mean = np.full((3, H, H), 0.5, np.float32)
    mean[:, 8:16, 8:16] = np.array([1.0, 0.0, 0.0], np.float32)[:, None, None]
    sigma = np.full((H, H), 0.1, np.float32)
    sigma[8:16, 8:16] = 0.3
    return {"set00_sigma": sigma, "set00_mean": mean}


def entries():
    return [{"set": "set00.npz", "applicable": True}, {"set": "set01.npz", "applicable": False}]


def test_toy_region_sigma_is_the_sigma_inside_and_outside_the_segmented_object(tmp_path):
    maps, es = set_maps(), entries()
    add_region_sigma(es, maps, data_dir=dataset(tmp_path, "toy"))
    r = es[0]["region"]
    assert r["available"] and r["inside"] == pytest.approx(0.3) and r["outside"] == pytest.approx(0.1)
    assert r["object_fraction"] == pytest.approx(64 / H ** 2) and "Otsu" in r["segmentation"]
    want = np.zeros((H, H), bool)
    want[8:16, 8:16] = True
    assert (maps["set00_mask"] == want).all() and "region" not in es[1]


def test_a_real_dataset_takes_masks_from_the_folder_or_says_why_region_sigma_is_absent(tmp_path):
    afhq = dataset(tmp_path, "afhq")
    es = entries()
    add_region_sigma(es, set_maps(), data_dir=afhq)
    assert es[0]["region"]["available"] is False and "text.prompts.mask_dir" in es[0]["region"]["reason"]
    masks = tmp_path / "masks"
    masks.mkdir()
    left = np.zeros((H, H), np.uint8)
    left[:, :12] = 255  # a mask another tool made: the left 12 columns
    Image.fromarray(left).save(masks / "set00.png")
    maps, es = set_maps(), entries()
    add_region_sigma(es, maps, data_dir=afhq, mask_dir=masks)
    sigma = maps["set00_sigma"].astype(np.float64)
    r = es[0]["region"]
    assert r["available"] and r["inside"] == pytest.approx(sigma[:, :12].mean())
    assert r["outside"] == pytest.approx(sigma[:, 12:].mean()) and str(masks) in r["segmentation"]
    Image.fromarray(left[:16]).save(masks / "set00.png")
    with pytest.raises(ValueError, match="set00.png"):  # a mask of another size names its file
        add_region_sigma(entries(), set_maps(), data_dir=afhq, mask_dir=masks)


def test_the_prompt_tables_show_object_and_background_sigma():
    def rec(method, region):
        e = {"study": "descriptiveness", "prompt": "a dog", "rate": None, "level": 0, "set": "set00.npz",
             "applicable": True, "mean_sigma": 0.2, "scores": {}}
        return {"family": "text", "dataset": "afhq", "depth": 16, "method": method,
                "sets": [{**e, "region": region} if region else e]}

    df, disp = prompt_table([rec("released", {"available": True, "inside": 0.1975, "outside": 0.1993}),
                             rec("ours", None)], "descriptiveness")
    assert df["sigma_object_mean"].iloc[0] == pytest.approx(0.1975)
    assert df["sigma_background_mean"].iloc[0] == pytest.approx(0.1993)
    assert disp["σ object"].tolist() == ["0.1975", "—"] and disp["σ background"].iloc[0] == "0.1993"


def test_a_detailed_caption_is_scored_against_the_class_it_names():
    classes = ["cat", "dog", "wild"]
    assert classes_named("a photo of a brown dog with floppy ears lying on green grass", classes) == [1]
    assert classes_named("a photo of a cat or a dog", classes) == [0, 1]
    ref = {"labels": np.array([0, 1, 2, 1]), "modes": np.full(4, -1)}
    info = {"classes": classes}
    assert reference_mask("a photo of a brown dog with floppy ears", ref, info).tolist() == [False, True, False, True]
    assert reference_mask("a photo of something", ref, info).all()
