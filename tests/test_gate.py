"""The tokenizer gate: the mode classifier's class error on a tokenizer's reconstructions of held-out images, and a
run that stops (naming the number and the config key) when it exceeds the bound."""
from __future__ import annotations

import json

import pytest
import torch

from helpers import tiny_vqvae
from varup.base.utils import atomic_torch_save
from varup.data.folder import open_split
from varup.data.modes import manifest_attributes, train_mode_classifier
from varup.data.toy import generate_toy_dataset, read_manifest
from varup.models.modeclf import load_mode_classifier
from varup.tokenizer.gate import TokenizerGateError, failed_record_path, reconstruction_errors, run_tokenizer_gate

RES = 32  # tiny_vqvae: downsample 4, last patch_num 8


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("gate")
    generate_toy_dataset(d / "toy", resolution=RES, n_train_per_class=64, n_val_per_class=16, progress=False)
    with torch.random.fork_rng():
        train_mode_classifier(d / "toy", d / "cls.pt", epochs=30, seed=0, device="cpu")
    vae = tiny_vqvae(patch_nums=(1, 2, 4, 8))  # untrained: its reconstructions carry no shape
    vae.quantize.init_codebook()
    atomic_torch_save({"model": vae.state_dict(), "config": vae.cfg.to_dict()}, d / "vae.pt")
    return d


class Identity:
    """A 'tokenizer' whose reconstruction is the image itself: the gate must then measure the classifier's own
    error on the real images."""

    def img_to_reconstructed_img(self, x):
        return x.clone()


def _val(d):
    ds = open_split(str(d / "toy"), "val", RES, {})
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    clf = load_mode_classifier(d / "cls.pt")
    return images, clf, manifest_attributes(read_manifest(d / "toy", "val"), clf.attributes)


def test_perfect_reconstructions_have_the_classifiers_own_error(toy):
    images, clf, attrs = _val(toy)
    res = reconstruction_errors(Identity(), clf, images, attrs)
    assert res["n"] == 64
    assert res["class_error"] == res["real_class_error"]
    assert res["reconstruction_errors"] == res["real_errors"]
    assert res["class_error"] <= 0.2  # a classifier that learnt the shapes (chance is 0.75)


def test_untrained_tokenizer_fails_the_gate_naming_number_and_key(toy, tmp_path):
    out = tmp_path / "gate.json"
    with pytest.raises(TokenizerGateError) as e:
        run_tokenizer_gate(toy / "vae.pt", toy / "cls.pt", toy / "toy", out, resolution=RES, max_class_error=0.1,
                           config_key="datasets.shapes.tokenizer_gate.max_class_error")
    assert not out.exists()  # no output: the DAG stops here
    rec = json.loads(failed_record_path(out).read_text())  # the evidence stays beside the tokenizer
    assert failed_record_path(out).name == "gate.failed.json"
    assert rec["passed"] is False and rec["class_error"] > 0.1
    assert rec["class_error"] > rec["real_class_error"]
    msg = str(e.value)
    assert f"{rec['class_error']:.4f}" in msg and "datasets.shapes.tokenizer_gate.max_class_error = 0.1" in msg


def test_gate_passes_within_the_bound(toy, tmp_path):
    out = tmp_path / "gate.json"
    failed_record_path(out).write_text("{}")  # a record of an earlier failure goes once the gate passes
    res = run_tokenizer_gate(toy / "vae.pt", toy / "cls.pt", toy / "toy", out, resolution=RES, max_class_error=1.0)
    assert res["passed"] is True and json.loads(out.read_text())["class_error"] == res["class_error"]
    assert not failed_record_path(out).exists()
    assert set(res["reconstruction_errors"]) == {"shape", "colour", "size", "background"}
