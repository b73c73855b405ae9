"""The claim study (issue 25): the long-tailed toy plan, the collapse readings, temperature sampling, and the
summary's frontier comparisons, correction and power statement on synthetic grids."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import tiny_var, tiny_vqvae
from varup.base.frontier import ALONG, MOVES
from varup.base.power import holm, mde
from varup.data.toy import _plan, mode_counts
from varup.sampling.sampler import sample
from varup.studies.claimgrid import collapse_scores, memorised_share, rare_modes, within_class_hist
from varup.studies.claimstudy import collapse_curve, curves, summarise


def test_mode_counts_are_zipf_sum_to_n_and_keep_every_mode():
    c = mode_counts(128, 16, 1.0)
    assert c.sum() == 128 and (c >= 1).all() and (np.diff(c) <= 0).all()
    assert c[0] == 38 and c[-1] == 2  # 128 / H16 = 37.9 for rank 1, 2.4 for rank 16 (1.8 %)
    assert (mode_counts(64, 16, 0.0) == 4).all()
    assert (mode_counts(20, 16, 3.0) >= 1).all()  # a steep tail still keeps one image of every mode


def test_the_balanced_plan_is_unchanged_and_the_long_tail_differs_per_class():
    assert _plan(0, 40, 3, 16) == [(c * 40 + j, c, j % 16) for c in range(3) for j in range(40)]
    plan = _plan(0, 128, 4, 16, mode_zipf=1.0, seed=0)
    per_class = [np.bincount([m for _, c, m in plan if c == k], minlength=16) for k in range(4)]
    for counts in per_class:
        assert sorted(counts.tolist(), reverse=True) == mode_counts(128, 16, 1.0).tolist()
    assert len({int(np.argmin(c)) for c in per_class}) > 1  # the rarest mode is not the same in every class
    assert _plan(1, 128, 4, 16, mode_zipf=1.0, seed=0) == plan  # both splits share the true distribution


def test_rare_mode_recall_is_the_generated_over_the_true_share_of_the_rare_modes():
    true = np.array([0.4, 0.35, 0.2, 0.05, 0.25, 0.25, 0.25, 0.25]) / 2  # 2 classes x 4 modes
    rare = rare_modes(true, 4, 0.1)
    assert rare.tolist() == [False, False, False, True] + [False] * 4
    labels = np.array([0] * 20 + [1] * 20)
    at_rate = np.array([0] * 8 + [1] * 7 + [2] * 4 + [3] + [4, 5, 6, 7] * 5)
    s = collapse_scores(at_rate, labels, true, 4, rare)
    assert s["rare_recall"] == pytest.approx(1.0) and s["covered"] == 8 and s["class_accuracy"] == 1.0
    dropped = np.where(at_rate == 3, 0, at_rate)
    d = collapse_scores(dropped, labels, true, 4, rare)
    assert d["rare_recall"] == 0.0 and d["covered"] == 7 and d["kl_true_gen"] > s["kl_true_gen"] + 0.1


def test_modes_are_read_within_the_requested_class_so_misdrawn_images_are_not_rare_modes():
    true = np.array([0.4, 0.35, 0.2, 0.05, 0.25, 0.25, 0.25, 0.25]) / 2
    rare = rare_modes(true, 4, 0.1)
    labels = np.array([0] * 20 + [1] * 20)
    at_rate = np.array([0] * 8 + [1] * 7 + [2] * 4 + [3] + [4, 5, 6, 7] * 5)
    misdrawn = at_rate.copy()
    misdrawn[20:24] = 3  # four class-1 samples the classifier reads as class 0's rare mode
    m = collapse_scores(misdrawn, labels, true, 4, rare)
    assert m["class_accuracy"] == pytest.approx(36 / 40)
    assert m["rare_recall"] == pytest.approx(1.0)  # counted over all samples it would read 5 of 40 against 1 in 40
    assert m["covered"] == 8 and m["kl_true_gen"] == pytest.approx(0.0, abs=1e-4)  # class 1's 16 keep its shares
    gen, n_in = within_class_hist(misdrawn, labels, true, 4)
    assert n_in == 36 and gen.sum() == pytest.approx(1.0) and gen[4:].tolist() == pytest.approx([0.125] * 4)
    lost = np.where(labels == 1, 0, at_rate)  # class 1 never drawn as itself: its modes are all missing
    lost_scores = collapse_scores(lost, labels, true, 4, rare)
    assert lost_scores["covered"] == 4 and lost_scores["class_accuracy"] == 0.5
    assert lost_scores["kl_true_gen"] > 5


def test_memorised_share_counts_samples_nearer_a_training_image_than_the_threshold():
    train = torch.randn(50, 8)
    copies = train[:10] + 1e-4
    far = torch.randn(10, 8) + 10
    assert memorised_share(copies, train, 0.01) == 1.0
    assert memorised_share(far, train, 0.01) == 0.0
    assert memorised_share(torch.cat([copies, far]), train, 0.01) == 0.5


def test_temperature_one_is_the_official_sampler_and_a_low_one_concentrates_the_tokens():
    var, vae = tiny_var().eval(), tiny_vqvae().eval()
    torch.manual_seed(3)
    var.head.weight.data.normal_(0, 0.5)
    labels = torch.tensor([0, 1, 2, 3] * 8)

    def draw(t, g):
        return sample(var, vae, labels, cfg=1.0, temperature=t, generator=torch.Generator().manual_seed(g),
                      decode=False).tokens[-1]

    assert torch.equal(draw(1.0, 0), sample(var, vae, labels, cfg=1.0, generator=torch.Generator().manual_seed(0),
                                            decode=False).tokens[-1])
    def agree(t):
        return (draw(t, 0) == draw(t, 1)).float().mean().item()

    assert agree(0.02) > 0.8 and agree(1.0) < 0.5


def _grid(shift: float, slope: float = 1.0, seed_noise: float = 0.0, seed: int = 0) -> dict:
    """A synthetic run: quality falls and diversity rises with temperature along d = slope · (1 - q) + shift."""
    rng = np.random.default_rng(seed)
    pts = []
    for t in (0.7, 0.85, 1.0, 1.15, 1.3):
        q = 1.2 - 0.5 * t
        pts.append({"temperature": t, "top_p": 1.0, "precision": q,
                    "rare_recall": slope * (1 - q) + shift + seed_noise * rng.normal()})
    curve = [{"step": 100, "rare_recall": 0.5, "covered": 60.0, "kl_true_gen": 0.1, "memorised": 0.05,
              "precision": 0.7, "recall": 0.6}]
    return {"grid": pts, "curve": curve, "default": {"temperature": 1.0, "top_p": 1.0}}


def _study(arms: dict) -> dict:
    grids = {arm: {s: f(s) for s in range(5)} for arm, f in arms.items()}
    return summarise(grids, baseline="baseline", primary="ours", quality="precision", diversity=["rare_recall"],
                     confidence=0.95, correction="holm", planning_sd=0.05, setting="synthetic")


def test_a_dominating_arm_moves_the_frontier_and_the_power_is_stated_from_the_planning_sd():
    st = _study({"baseline": lambda s: _grid(0.0, seed_noise=0.01, seed=s),
                 "ours": lambda s: _grid(0.2, seed_noise=0.01, seed=100 + s)})
    assert st["frontier"]["verdict"] == MOVES
    assert st["frontier"]["mean_gain"]["mean"] == pytest.approx(0.2, abs=0.02)
    assert st["power"]["mde_planned"] == pytest.approx(mde(5, 0.05, 0.05))
    assert st["curve"]["baseline"][0]["step"] == 100 and st["curve"]["baseline"][0]["n"] == 5


def test_a_temperature_shifted_copy_is_not_called_a_gain():
    """'ours' is the baseline's own curve sampled one temperature step further along: no frontier gain."""
    def shifted(s):
        g = _grid(0.0)
        moved = [{**p, "temperature": t} for p, t in zip(g["grid"][1:], (0.7, 0.85, 1.0, 1.15))]
        return {**g, "grid": moved}

    st = _study({"baseline": lambda s: _grid(0.0, seed_noise=0.0), "ours": shifted})
    assert st["frontier"]["verdict"] == ALONG


def test_the_family_of_comparisons_is_holm_corrected():
    st = _study({"baseline": lambda s: _grid(0.0, seed_noise=0.02, seed=s),
                 "ours": lambda s: _grid(0.03, seed_noise=0.02, seed=50 + s),
                 "other": lambda s: _grid(0.01, seed_noise=0.02, seed=90 + s)})
    ps = [c["p"] for c in st["comparisons"]]
    assert [c["p_adjusted"] for c in st["comparisons"]] == pytest.approx(holm(ps))


def test_the_study_dataset_stays_out_of_table_2_and_its_problems_name_their_keys():
    import yaml

    from tinydag import REPO
    from varup.config import plan
    from varup.config.schema import validate

    cfg = validate(yaml.safe_load((REPO / "config" / "config.yaml").read_text()))
    assert plan.main_datasets(cfg) == ["shapes"] and {r.dataset for r in plan.main_runs(cfg)} == {"shapes"}
    runs = plan.claim_runs(cfg)
    assert {r.dataset for _, r in runs} == {"shapes_lt"} and len(runs) == 4 * 4
    spec = plan.run_spec(cfg, runs[0][1])
    assert spec["optim"]["steps"] == 1500 and spec["optim"]["snapshots"] == [250, 500, 1000]
    assert "snapshots" not in plan.run_spec(cfg, plan.main_runs(cfg)[0])["optim"]  # Table 2's runs are unchanged
    cs = cfg["experiments"]["claim_study"]
    cs.update(primary="nope", default_setting={"temperature": 0.9, "top_p": 0.8})
    problems = plan.claim_problems(cfg)
    assert any("claim_study/primary: 'nope'" in p for p in problems)
    assert any("claim_study/default_setting" in p for p in problems)


def test_the_grid_crosses_temperature_top_p_and_cfg_guiding_only_where_asked():
    import yaml

    from tinydag import REPO
    from varup.config import plan
    from varup.config.schema import validate

    cfg = validate(yaml.safe_load((REPO / "config" / "config.yaml").read_text()))
    cs = cfg["experiments"]["claim_study"]
    cs.update(temperatures=[0.8, 1.0], top_p=[0.8, 1.0], cfg=[1.0, 2.0], guided_top_p=[1.0], curve_settings=[],
              default_setting={"temperature": 1.0, "top_p": 0.8, "cfg": 1.0})
    grid = plan.claim_settings(cfg)
    assert len(grid) == 2 * 2 + 2 and {(g["top_p"], g["cfg"]) for g in grid} == {(0.8, 1.0), (1.0, 1.0), (1.0, 2.0)}
    assert not plan.claim_problems(cfg)
    cs["default_setting"] = {"temperature": 1.0, "top_p": 0.8, "cfg": 2.0}  # guided only at top-p 1
    assert any("claim_study/default_setting" in p for p in plan.claim_problems(cfg))
    cs["guided_top_p"] = None  # every top-p guided: 2 x 2 x 2
    assert len(plan.claim_settings(cfg)) == 8 and not plan.claim_problems(cfg)
    cs["curve_settings"] = [{"temperature": 0.8, "top_p": 0.8, "cfg": 1.0}, {"temperature": 0.7, "top_p": 0.8,
                                                                            "cfg": 1.0}]
    assert [p.split(":")[0] for p in plan.claim_problems(cfg)] == ["experiments/claim_study/curve_settings/1"]


def test_the_curve_over_training_is_kept_per_setting_the_default_first():
    def run(seed):
        g = _grid(0.0, seed=seed)
        rows = [{"step": s, "setting": lab, "default": lab == "T 1 top-p 1 cfg 1", "rare_recall": 0.5,
                 "covered": 60.0 - s / 100 * (lab != "T 1 top-p 1 cfg 1") + seed, "kl_true_gen": 0.1,
                 "memorised": 0.05, "precision": 0.7, "recall": 0.6}
                for lab in ("T 0.7 top-p 1 cfg 1", "T 1 top-p 1 cfg 1") for s in (100, 200)]
        return {**g, "curve": rows}

    curve = collapse_curve({"baseline": {s: run(s) for s in range(2)}})["baseline"]
    assert [(p["setting"], p["step"]) for p in curve] == [("T 1 top-p 1 cfg 1", 100), ("T 1 top-p 1 cfg 1", 200),
                                                          ("T 0.7 top-p 1 cfg 1", 100), ("T 0.7 top-p 1 cfg 1", 200)]
    assert [p["covered"] for p in curve] == [60.5, 60.5, 59.5, 58.5] and curve[0]["n"] == 2
    assert curve[0]["covered_sd"] == pytest.approx(np.std([60, 61], ddof=1))
    old = collapse_curve({"baseline": {0: _grid(0.0)}})["baseline"]  # a grid written before curve settings
    assert [(p["setting"], p["default"], p["step"]) for p in old] == [("default", True, 100)]


def test_the_default_point_is_found_by_every_key_of_the_default_setting():
    """A guided copy of the default temperature and top-p is another point: the frontier's default is the one whose
    cfg matches too."""
    g = _grid(0.0)
    guided = [{**p, "cfg": 2.0, "rare_recall": p["rare_recall"] - 0.3} for p in g["grid"]]
    g = {**g, "grid": [*guided, *({**p, "cfg": 1.0} for p in g["grid"])],
         "default": {"temperature": 1.0, "top_p": 1.0, "cfg": 1.0}}
    c = curves({0: g}, "precision", "rare_recall")[0]
    assert c["default"] == 5 + 2 and c["diversity"][c["default"]] == g["grid"][7]["rare_recall"]


def test_a_reading_without_numbers_is_undetermined_and_the_others_still_compared():
    """Rare-mode recall is NaN where the data has no rare mode: that comparison says so, the rest go on."""
    def nan_rare(s):
        g = _grid(0.0, seed_noise=0.01, seed=s)
        return {**g, "grid": [{**p, "rare_recall": float("nan")} for p in g["grid"]]}

    grids = {"baseline": {s: nan_rare(s) for s in range(3)}, "ours": {s: _grid(0.2, seed=s) for s in range(3)}}
    for g in grids["ours"].values():
        g["grid"] = [{**p, "neg_kl": p["rare_recall"]} for p in g["grid"]]
    for g in grids["baseline"].values():
        g["grid"] = [{**p, "neg_kl": 0.5 - p["precision"]} for p in g["grid"]]
    st = summarise(grids, baseline="baseline", primary="ours", quality="precision",
                   diversity=["neg_kl", "rare_recall"], confidence=0.95, correction="holm", planning_sd=0.05,
                   setting="synthetic")
    by = {c["diversity"]: c for c in st["comparisons"]}
    assert by["rare_recall"]["frontier"]["verdict"] == "undetermined" and "not a number" in by["rare_recall"]["text"]
    assert by["rare_recall"]["p"] is None and by["neg_kl"]["p"] is not None


def test_the_planned_power_stands_when_no_seed_can_be_compared():
    """Single-point curves (a tiny run) share no quality range: the comparison is undetermined, the MDE planned from
    the configured seeds is still stated, the observed one is not."""
    def point(s):
        return {"grid": [{"temperature": 1.0, "top_p": 1.0, "precision": 0.25, "rare_recall": 1.0 + 0.1 * s}],
                "curve": _grid(0.0)["curve"], "default": {"temperature": 1.0, "top_p": 1.0}}

    st = summarise({"baseline": {s: point(s) for s in range(2)}, "ours": {s: point(s) for s in range(2)}},
                   baseline="baseline", primary="ours", quality="precision", diversity=["rare_recall"],
                   confidence=0.95, correction="holm", planning_sd=0.05, setting="synthetic")
    assert st["frontier"]["verdict"] == "undetermined" and st["power"]["n_used"] == 0
    assert st["power"]["mde_planned"] == pytest.approx(mde(2, 0.05)) and st["power"]["mde_observed"] is None
