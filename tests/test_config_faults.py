"""Issue 22's configuration faults (items 1, 6, 7, 8): each bad value is refused when the config is validated or the
DAG is planned (``check_text`` / ``check_lm``, which the workflow calls while it builds the DAG), or when a
``varup lm-*`` command parses its JSON settings, with a ConfigError (or usage error) that names the key. Before the
fix each of these passed and failed later, at job time, or ran silently."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from varup.config.errors import ConfigError
from varup.config.lmplan import LMRun, check_lm, lm_run_spec, pretrain_spec
from varup.config.schema import validate
from varup.config.textplan import check_text

REPO = Path(__file__).resolve().parents[1]


def raw(name: str = "config.yaml") -> dict:
    return yaml.safe_load((REPO / "config" / name).read_text())


def refused(cfg: dict, *keys: str) -> str:
    """The message of the ConfigError that validating ``cfg`` raises, asserted to name every one of ``keys``."""
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    msg = str(e.value)
    for key in keys:
        assert key in msg, msg
    return msg


def planned(cfg: dict, check, *keys: str) -> str:
    """A config the schema accepts whose arm's plan check (``check_text`` / ``check_lm``) refuses, naming ``keys``."""
    validate(cfg)
    with pytest.raises(ConfigError) as e:
        check(cfg)
    msg = str(e.value)
    for key in keys:
        assert key in msg, msg
    return msg


# ------------------------------------------------------------------------------ item 1: steps 0 / negative
@pytest.mark.parametrize("steps", [0, -3])
def test_lm_steps_below_one_are_refused_naming_the_key(steps):
    cfg = raw()
    cfg["lm"]["train"]["steps"] = steps
    assert "lm/train/steps: " + str(steps) in refused(cfg, "lm/train/steps")
    cfg = raw()
    cfg["lm"]["base"]["train"]["steps"] = steps
    refused(cfg, "lm/base/train/steps")


def lm_cli(*args: str, capsys) -> str:
    """``varup <args>`` parsed as the command line would be: the usage error's text (argparse exits with 2)."""
    from varup.cli import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(list(args))
    assert e.value.code == 2
    return capsys.readouterr().err


SFT = ("lm-sft", "--base", "b", "--corpus", "c", "--out", "o", "--work", "w", "--train")


@pytest.mark.parametrize("steps", [0, -1])
def test_lm_sft_refuses_steps_below_one_in_its_json_naming_the_key(steps, capsys):
    spec = {**lm_run_spec(validate(raw()), LMRun("ours", 0)), "steps": steps}
    err = lm_cli(*SFT, json.dumps(spec), capsys=capsys)
    assert f"lm/train/steps: {steps} is less than the minimum of 1" in err


def test_lm_commands_refuse_bad_json_settings_naming_the_key(capsys):
    spec = lm_run_spec(validate(raw()), LMRun("ours", 0))
    err = lm_cli(*SFT, json.dumps({**spec, "stepz": 400}), capsys=capsys)
    assert "lm/train" in err and "'stepz' was unexpected" in err
    err = lm_cli(*SFT, json.dumps({**spec, "loss": {"lambda_2nd": -1}}), capsys=capsys)
    assert "lm/train/loss/lambda_2nd" in err
    err = lm_cli("lm-generate", "--model", "m", "--eval", "e", "--out", "o", "--seed", "0", "--decode",
                 '{"top_p": 1.5}', capsys=capsys)
    assert "lm/generate/top_p: 1.5 is greater than the maximum of 1" in err
    err = lm_cli("lm-pretrain", "--corpus", "c", "--out", "o", "--work", "w", "--template", "t", "--train",
                 '{"batch_size": 0, "seed": 1}', capsys=capsys)
    assert "lm/base/train/batch_size: 0 is less than the minimum of 1" in err
    err = lm_cli("lm-score", "--generations", "g", "--eval", "e", "--featurizer", "f", "--out", "o", "--label", "l",
                 "--score", '{"featurize": "everything"}', capsys=capsys)
    assert "lm/score/featurize" in err


@pytest.mark.parametrize("name", ["config.yaml", "paper.yaml"])
def test_the_lm_commands_accept_the_settings_the_rules_pass(name):
    """What the LM rules pass (the validated config's sections and the plan's specs) parses unchanged."""
    from varup.cli import build_parser

    cfg = validate(raw(name))
    lm, p = cfg["lm"], build_parser()
    spec = lm_run_spec(cfg, LMRun(next(iter(cfg["lm"].get("methods") or cfg["methods"])), 1))
    assert p.parse_args([*SFT, json.dumps(spec)]).train == spec
    a = p.parse_args(["lm-pretrain", "--corpus", "c", "--out", "o", "--work", "w", "--template", "t",
                      "--model", json.dumps(lm["base"]["model"]), "--train", json.dumps(pretrain_spec(cfg, True))])
    assert a.model == lm["base"]["model"] and a.train == pretrain_spec(cfg, True)
    a = p.parse_args(["lm-refs", "--base", "b", "--corpus", "c", "--out", "o", "--params",
                      json.dumps(lm["references"]), "--train", json.dumps(lm["train"])])
    assert a.params == lm["references"]
    assert p.parse_args(["lm-generate", "--model", "m", "--eval", "e", "--out", "o", "--seed", "0", "--decode",
                         json.dumps(lm["generate"])]).decode == lm["generate"]
    assert p.parse_args(["lm-score", "--generations", "g", "--eval", "e", "--featurizer", "f", "--out", "o",
                         "--label", "l", "--score", json.dumps(lm["score"])]).score == lm["score"]
    assert p.parse_args(["lm-corpus", "--kind", "toy", "--template", "t", "--out", "o", "--params",
                         json.dumps(lm["corpus"])]).params == lm["corpus"]


# ------------------------------------------------------------------------------ item 6: typed, closed sections
def test_nested_text_values_of_the_lm_sections_are_converted():
    """``--config 'lm={train: {steps: 400}}'`` reaches the config as text: converted like every typed key."""
    cfg = raw()
    cfg["lm"]["train"] = {"steps": "400", "lr": "1e-3"}
    cfg["lm"]["generate"].update(top_p="0.9", do_sample="true", max_prompts="null")
    cfg["lm"]["score"].update(mauve_num_buckets="10")
    cfg["text"]["train"] = {"steps": "50"}
    validate(cfg)
    assert cfg["lm"]["train"] == {"steps": 400, "lr": 1e-3}
    g = cfg["lm"]["generate"]
    assert g["top_p"] == 0.9 and g["do_sample"] is True and g["max_prompts"] is None
    assert cfg["lm"]["score"]["mauve_num_buckets"] == 10 and cfg["text"]["train"] == {"steps": 50}
    cfg = raw()
    cfg["lm"]["score"]["mauve_num_buckets"] = "auto"  # text the schema takes as text stays text
    assert validate(cfg)["lm"]["score"]["mauve_num_buckets"] == "auto"


def test_lm_decoding_values_out_of_range_are_refused_naming_the_key():
    cfg = raw()
    cfg["lm"]["generate"].update(top_p=1.5, temperature=0, batch_size=0)
    refused(cfg, "lm/generate/top_p: 1.5 is greater than the maximum of 1",
            "lm/generate/temperature: 0 is less than or equal to the minimum of 0", "lm/generate/batch_size")
    cfg = raw()
    cfg["lm"]["generate"]["top_p"] = 0
    refused(cfg, "lm/generate/top_p")


def test_typos_and_zero_batches_in_the_lm_and_text_sections_are_refused_naming_the_key():
    cfg = raw()
    cfg["lm"]["train"]["stepz"] = 400
    cfg["lm"]["base"]["model"]["hidden_sise"] = 32
    cfg["text"]["train"] = {"stepz": 3}
    msg = refused(cfg, "lm/train: Additional properties are not allowed ('stepz' was unexpected)",
                  "lm/base/model: Additional properties are not allowed ('hidden_sise' was unexpected)")
    assert "text/train: Additional properties are not allowed ('stepz' was unexpected)" in msg
    cfg = raw()
    cfg["lm"]["train"]["batch_size"] = 0
    cfg["lm"]["score"]["batch_size"] = 0
    cfg["text"]["train"] = {"batch_size": 0}
    refused(cfg, "lm/train/batch_size: 0 is less than the minimum of 1", "lm/score/batch_size",
            "text/train/batch_size")


def test_text_train_takes_no_launch_keys():
    cfg = raw()
    cfg["text"]["train"] = {"gpus": 2}
    refused(cfg, "text/train/gpus: set gpus at the top level")


def test_typing_the_sections_adds_nothing_to_what_a_run_records():
    """No schema defaults inside the typed sections: the validated config holds exactly what the file sets, so the
    recorded specifications (rule parameters) and the fingerprints of the toy's finished runs do not change."""
    for name in ("config.yaml", "paper.yaml"):
        before, cfg = raw(name), validate(raw(name))
        for part in ("train", "generate", "score"):
            assert cfg["lm"][part] == before["lm"].get(part, {}), (name, part)
        for part in ("train", "model"):
            assert cfg["lm"]["base"][part] == before["lm"]["base"].get(part, {}), (name, part)
        assert cfg["text"]["train"] == before["text"].get("train", {})
    cfg = validate(raw())
    assert cfg["experiments"]["ood"]["source"]["generator"] == raw()["experiments"]["ood"]["source"]["generator"]
    assert cfg["datasets"]["shapes"]["generator"] == {  # the dataset generator keeps its defaults
        "seed": 0, "n_train_per_class": 512, "n_val_per_class": 64, "shapes": ["circle", "square", "triangle", "cross"],
        "colours": ["red", "green", "blue", "yellow"], "sizes": ["small", "large"], "backgrounds": ["plain", "stripes"],
        "position_jitter": 0.3}
    cfg = raw()
    del cfg["datasets"]["shapes"]["generator"]
    assert validate(cfg)["datasets"]["shapes"]["generator"]["position_jitter"] == 1.0
    cfg = raw()
    cfg["experiments"]["ood"]["source"]["generator"]["colourz"] = ["cyan"]
    refused(cfg, "experiments/ood/source/generator: Additional properties are not allowed ('colourz'")


# ------------------------------------------------------------------------------ item 7: named before any job
def test_heads_that_do_not_divide_the_width_are_refused_at_validation():
    cfg = raw()
    cfg["model"].update(heads=3, width_per_depth=32)  # depth 2: width 64
    refused(cfg, "model/heads: 3 does not divide the width 64 of depth 2")
    cfg = raw()
    cfg["model"]["heads"] = 4
    validate(cfg)  # 128 / 4


def test_text_encoder_and_toy_lm_heads_are_checked_at_planning():
    cfg = raw()
    cfg["text"]["encoder"].update(width=64, heads=3)
    planned(cfg, check_text, "text/encoder/heads: 3 does not divide text/encoder/width 64")
    cfg = raw()
    cfg["lm"]["base"]["model"].update(num_attention_heads=3)
    planned(cfg, check_lm, "lm/base/model/num_attention_heads: 3 does not divide lm/base/model/hidden_size 64")
    cfg = raw()
    cfg["lm"]["base"]["model"].update(num_attention_heads=8, num_key_value_heads=3)
    planned(cfg, check_lm, "lm/base/model/num_key_value_heads: 3 does not divide lm/base/model/num_attention_heads 8")
    cfg = raw()
    cfg["lm"]["base"]["model"].update(hidden_size=60, num_attention_heads=4)  # head size 15
    planned(cfg, check_lm, "lm/base/model/num_attention_heads: 4 heads of 15 dimensions")


def test_the_toy_lm_shape_the_plan_checks_is_the_toy_models():
    from varup.config.lmplan import TOY_MODEL_HEADS
    from varup.lm.toy import TOY_MODEL

    assert TOY_MODEL_HEADS == {k: TOY_MODEL[k] for k in TOY_MODEL_HEADS}


def test_caption_kind_weights_all_zero_are_refused_at_planning():
    cfg = raw()
    cfg["text"]["captions"]["kind_weights"] = {k: 0 for k in ("shape", "class", "attributes", "full", "or2", "or3")}
    planned(cfg, check_text, "text/captions/kind_weights: no caption kind has a positive weight")
    cfg["text"]["captions"]["kind_weights"]["or2"] = 1  # one kind is enough
    validate(cfg)
    check_text(cfg)
    cfg["datasets"]["shapes"]["generator"]["shapes"] = ["circle"]  # ... that the shapes can form
    cfg["datasets"]["shapes"]["num_classes"] = 1
    cfg["uncertainty"].update(classes=[0], entanglement_mixes=[[0]], sweep_n_per_class=8)
    cfg["text"]["prompts"].update(entanglement=["a circle"], descriptiveness=["a circle"])
    planned(cfg, check_text, "text/captions/kind_weights")


def test_the_caption_kinds_the_plan_checks_are_the_captions():
    from varup.config.textplan import TOY_CAPTION_KINDS
    from varup.data.captions import DEFAULT_KIND_WEIGHTS, KINDS

    assert tuple(TOY_CAPTION_KINDS) == KINDS and all(w > 0 for w in DEFAULT_KIND_WEIGHTS.values())


def test_one_image_per_class_is_refused_naming_the_key():
    cfg = raw()
    cfg["sample"]["n_per_class"] = 1
    refused(cfg, "sample/n_per_class: 1 image per class (datasets/shapes)")
    cfg = raw()
    cfg["datasets"]["shapes"]["sample"] = {"n_per_class": 1}
    msg = refused(cfg, "datasets/shapes/sample/n_per_class: 1")
    assert "\n  sample/n_per_class" not in msg
    cfg = raw()
    cfg["sample"]["n_per_class"] = 1
    cfg["datasets"]["shapes"]["sample"] = {"n_per_class": 2}  # the dataset's own value is the one used
    validate(cfg)
    cfg["metrics"]["prdc_nearest_k"] = 7  # 2 x 4 classes = 8 images, PRDC needs 9
    refused(cfg, "datasets/shapes/sample/n_per_class: 2 x 4 classes = 8 images", "need 9")


def test_prompt_sets_too_small_for_their_metrics_are_refused_at_planning():
    cfg = raw()
    cfg["text"]["prompts"]["n_images"] = 2
    planned(cfg, check_text, "text/prompts/n_images: 2 images per prompt set", "need 7")
    cfg["text"]["enabled"] = False  # an arm that is off plans nothing
    check_text(validate(cfg))


# ------------------------------------------------------------------------------ item 8: where results go
@pytest.mark.parametrize("name", ["..", ".", ".hidden"])
def test_experiment_names_that_leave_results_dir_are_refused(name):
    cfg = raw()
    cfg["experiment"] = name
    refused(cfg, "experiment: ")


def test_experiment_and_dataset_names_are_single_folder_names():
    cfg = raw()
    cfg["experiment"] = "toy.v2"
    validate(cfg)
    cfg = raw()
    cfg["datasets"][".."] = cfg["datasets"]["shapes"]
    refused(cfg, "datasets: '..' does not match")
    cfg = raw()
    cfg["results_dir"] = ""
    refused(cfg, "results_dir: '' should be non-empty")


def test_validation_refuses_in_a_process_without_torch():
    """Validation and the arms' plan checks stay torch- and numpy-free (the Snakefile imports them: a dry run stays
    fast), and refuse there too."""
    code = ("import sys; from varup.config.errors import ConfigError; from varup.config.schema import load_config, "
            "validate; from varup.config import lmplan, textplan; c = load_config('config/config.yaml'); "
            "lmplan.check_lm(c); textplan.check_text(c); c = load_config('config/config.yaml'); "
            "c['lm']['train']['steps'] = 0\ntry:\n    validate(c)\nexcept ConfigError as e:\n    print(e)\n"
            "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, 'torch/numpy imported'")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "lm/train/steps: 0 is less than the minimum of 1" in r.stdout
