"""The LM arm's library: the objective on an LM's logits, its references from an embedding matrix, the
toy grammar's modes, SFT data and resumption, generation and the mode scores."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from varup.base.utils import read_jsonl
from varup.config.lmplan import TOY_TEMPLATE
from varup.lm.grammar import EOS, instructions, make_corpus, mode_of, vocabulary
from varup.lm.score import toy_mode_scores
from varup.lm.sft import IGNORE, LMTrainConfig, encode_records, lm_loss, lm_references, token_objective
from varup.training.losses import LossConfig, UncertaintyLoss
from varup.training.references import build_references, codebook_tau

torch.set_num_threads(1)
OURS = {"lambda_2nd": 0.3, "lambda_se": 0.2, "reference": "semantic"}


# ------------------------------------------------------------------------------------------ the objective
def _tensors(B=3, L=14, V=32, E=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, L, V, generator=g, dtype=torch.float64) * 2, torch.randint(0, V, (B, L), generator=g),
            torch.randn(V, E, generator=g))


@pytest.mark.parametrize("loss", [OURS, {**OURS, "reference": "uniform", "discrepancy": "wasserstein"},
                                  {**OURS, "se_direction": "maximize"}])
def test_the_lm_loss_on_tokens_equals_the_image_loss_on_the_same_tensors(loss):
    """The image objective over a (B, L, V) token map and the LM objective over the same B·L tokens as a sequence
    batch: equal total, terms and logit gradients (token means on both sides)."""
    z, y, emb = _tensors()
    refs = build_references(emb, y, (1, 2, 3), num_clusters=5, support_k=None)
    zi = z.clone().requires_grad_(True)
    img = UncertaintyLoss(LossConfig(**loss), (1, 2, 3), refs)(zi, y)
    img.total.backward()
    zl = z.clone().requires_grad_(True)
    # as a language model sees it: position t predicts label t+1, so shift by one and put the tokens in sequence
    B, L, V = z.shape
    logits = torch.cat([zl.reshape(1, B * L, V), torch.zeros(1, 1, V, dtype=z.dtype)], 1)
    labels = torch.cat([torch.full((1, 1), IGNORE), y.reshape(1, B * L)], 1)
    lm = lm_loss(token_objective(loss, lm_references(emb, y, num_clusters=5)), logits, labels)
    lm.total.backward()
    for a, b in ((img.total, lm.total), (img.ce, lm.ce), (img.l2nd, lm.l2nd), (img.lse, lm.lse)):
        assert torch.allclose(a.double(), b.double(), rtol=1e-6, atol=1e-9)
    assert torch.allclose(zi.grad, zl.grad, rtol=1e-5, atol=1e-10)


def test_only_supervised_positions_count():
    z, y, emb = _tensors(B=2, L=6)
    labels = y.clone()
    labels[:, :3] = IGNORE  # a prompt of 2 tokens predicting nothing (positions 0..1 predict labels 1..2)
    fn = token_objective(OURS, lm_references(emb, labels, num_clusters=4))
    out = lm_loss(fn, z, labels)
    keep = labels[:, 1:] != IGNORE
    direct = fn(z[:, :-1][keep].unsqueeze(1), labels[:, 1:][keep].unsqueeze(1))
    assert torch.equal(out.total, direct.total) and int(keep.sum()) == 2 * 3
    # changing a logit at a masked position changes nothing
    z2 = z.clone()
    z2[:, 0] += 5.0
    assert torch.equal(lm_loss(fn, z2, labels).total, out.total)


def test_references_from_an_embedding_matrix_match_a_direct_computation():
    _, y, emb = _tensors(V=20, E=6)
    y[0, :4] = IGNORE
    refs = lm_references(emb, y, num_clusters=4)
    E = emb.double().numpy()
    d = np.sqrt(((E[:, None] - E[None]) ** 2).sum(-1))
    nn_ = np.where(np.eye(20, dtype=bool), np.inf, d).min(1)
    tau = float(np.sort(nn_)[(len(nn_) - 1) // 2])  # torch's median: the lower middle value of an even count
    q = np.exp(-d ** 2 / (2 * tau ** 2))
    q /= q.sum(1, keepdims=True)
    assert abs(float(refs["tau"]) - tau) < 1e-6 and abs(codebook_tau(emb) - tau) < 1e-6  # float32 distances
    np.testing.assert_allclose(refs["semantic_s_star"].numpy(), (q ** 2).sum(1) - 1 / 20, rtol=1e-5)
    t = y[y != IGNORE].numpy()
    h = np.bincount(t, minlength=20) / len(t)
    np.testing.assert_allclose(refs["dataset_s_star"].numpy(), [(h ** 2).sum() - 1 / 20], rtol=1e-5)
    assert refs["clusters"].shape == (20,) and len(set(refs["clusters"].tolist())) == 4
    # k-means of the embedding rows: every code sits nearer its own cluster's mean than any other's
    cl = refs["clusters"].numpy()
    means = np.stack([E[cl == c].mean(0) for c in range(4)])
    assert (np.argmin(((E[:, None] - means[None]) ** 2).sum(-1), 1) == cl).all()


# --------------------------------------------------------------------------------------------- the grammar
def test_the_grammar_writes_only_true_responses_with_their_known_mode_frequencies(tmp_path):
    s = make_corpus(tmp_path, seed=3, n_train=6000, eval_per_prompt=5, n_pretrain=200, template=TOY_TEMPLATE)
    grammar = instructions()
    assert [len(i.modes) for i in grammar] == [6, 4, 4, 4, 6, 6, 6, 1, 1, 1] and len(s["instructions"]) == 10
    assert all(abs(sum(i.probs) - 1) < 1e-12 and list(i.probs) == sorted(i.probs, reverse=True) for i in grammar)
    train = read_jsonl(tmp_path / "train.jsonl")
    for r in train:
        assert mode_of(r["instruction"], r["response"]) == r["mode"]
        assert r["prompt"] == TOY_TEMPLATE.format(instruction=r["instruction"])
    colour = [r["mode"] for r in train if r["instruction"] == "name a colour ."]
    freq = np.bincount(colour, minlength=6) / len(colour)
    assert np.abs(freq - np.asarray(grammar[0].probs)).max() < 4 * np.sqrt(0.25 / len(colour))  # 4 sigma
    ev = read_jsonl(tmp_path / "eval.jsonl")
    assert Counter(r["instruction"] for r in ev) == {i.text: 5 for i in grammar}
    assert mode_of("count to four .", "one two three four .") == 0 and mode_of("name a colour .", "red .") is None
    with pytest.raises(KeyError, match="not an instruction"):
        mode_of("sing a song .", "la")
    pre = (tmp_path / "pretrain.txt").read_text().splitlines()
    assert len(pre) == 200 and not any("###" in x for x in pre)  # the base never sees the instruction format
    again = tmp_path / "again"
    make_corpus(again, seed=3, n_train=6000, eval_per_prompt=5, n_pretrain=200, template=TOY_TEMPLATE)
    assert (again / "train.jsonl").read_text() == (tmp_path / "train.jsonl").read_text()
    other = tmp_path / "other"
    make_corpus(other, seed=4, n_train=6000, eval_per_prompt=5, n_pretrain=200, template=TOY_TEMPLATE)
    assert (other / "train.jsonl").read_text() != (tmp_path / "train.jsonl").read_text()


def test_the_toy_tokenizer_covers_the_corpus_and_the_prompt_is_masked(tmp_path):
    from varup.lm.toy import build_toy_tokenizer

    make_corpus(tmp_path, seed=0, n_train=50, eval_per_prompt=1, n_pretrain=50, template=TOY_TEMPLATE)
    tok = build_toy_tokenizer(TOY_TEMPLATE)
    assert len(tok) == len(vocabulary(TOY_TEMPLATE))
    recs = read_jsonl(tmp_path / "train.jsonl")
    data = encode_records(tok, recs, max_length=64)
    assert tok.unk_token_id not in data["input_ids"][data["attention_mask"].bool()].tolist()
    r, ids, lab = recs[0], data["input_ids"][0], data["labels"][0]
    n_prompt = len(r["prompt"].split())
    n_resp = len(r["response"].split()) + 1  # + eos
    assert (lab[:n_prompt] == IGNORE).all() and torch.equal(lab[n_prompt:n_prompt + n_resp], ids[n_prompt:n_prompt + n_resp])
    assert tok.decode(ids[n_prompt:n_prompt + n_resp]) == f"{r['response']} {EOS}"
    every = encode_records(tok, recs, max_length=64, loss_tokens="all")
    assert int((every["labels"] != IGNORE).sum()) == int(data["attention_mask"].sum())


def test_mode_scores_on_a_hand_made_set():
    gens = [{"instruction": "count to three .", "generation": "one two three ."}] * 3
    gens += [{"instruction": "count to three .", "generation": "one two ."}]
    gens += [{"instruction": "name an animal that can fly .", "generation": g}
             for g in ("a bird can fly .", "a bird can fly .", "a bat can fly .", "a fish can fly .")]
    s = toy_mode_scores(gens)
    assert s["valid"] == pytest.approx(6 / 8)
    assert s["coverage"] == pytest.approx((1 / 1 + 2 / 4) / 2)
    p = np.asarray(next(i.probs for i in instructions() if i.text == "name an animal that can fly ."))
    tv_fly = 0.5 * (abs(0.5 - p[0]) + abs(0.25 - p[1]) + p[2] + p[3] + 0.25)
    assert s["tv"] == pytest.approx((0.25 + tv_fly) / 2)


# ----------------------------------------------------------------------------------- training, generation
def _toy(tmp_path):
    from varup.lm.stages import pretrain_toy

    corpus = tmp_path / "corpus"
    make_corpus(corpus, seed=0, n_train=128, eval_per_prompt=2, n_pretrain=128, template=TOY_TEMPLATE)
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
             "num_key_value_heads": 1}
    pretrain_toy(corpus, tmp_path / "base", tmp_path / "base_work", model_cfg=small, template=TOY_TEMPLATE,
                 train_cfg={"steps": 30, "batch_size": 16, "lr": 3e-3, "warmup_steps": 2, "max_length": 24,
                            "log_every": 10}, device="cpu")
    return corpus, tmp_path / "base"


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_sft_interrupted_and_resumed_ends_with_the_same_weights_and_curve(tmp_path):
    from varup.lm.stages import sft, write_lm_references

    corpus, base = _toy(tmp_path)
    write_lm_references(base, corpus, tmp_path / "refs.pt", max_length=24, loss_tokens="response", num_clusters=4,
                        cluster_seed=0, support_k=None)
    spec = {"steps": 12, "batch_size": 8, "lr": 1e-3, "warmup_steps": 2, "max_length": 24, "log_every": 2,
            "ckpt_every": 4, "seed": 1, "loss": OURS}
    sft(base, corpus, tmp_path / "refs.pt", tmp_path / "ref", tmp_path / "ref_work", train_cfg=spec, device="cpu")
    from varup.lm.hub import load_causal_lm, load_tokenizer
    from varup.lm.sft import fit
    from varup.training.references import load_references

    tok, refs = load_tokenizer(base), load_references(tmp_path / "refs.pt")
    data = encode_records(tok, read_jsonl(corpus / "train.jsonl"), 24)
    out = fit(load_causal_lm(base), tok, data, LMTrainConfig(**spec), refs=refs, out_dir=tmp_path / "cut",
              work_dir=tmp_path / "cut_work", device="cpu", run_config={"base": "base", "train": spec}, stop_after=5)
    assert out == {"stopped_at": 5} and not (tmp_path / "cut").exists()
    sft(base, corpus, tmp_path / "refs.pt", tmp_path / "cut", tmp_path / "cut_work", train_cfg=spec, device="cpu")
    a, b = _weights(tmp_path / "ref"), _weights(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    curve = [json.loads(x) for x in (tmp_path / "cut_work" / "metrics.jsonl").read_text().splitlines()]
    ref_curve = [json.loads(x) for x in (tmp_path / "ref_work" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve] == list(range(2, 13, 2))
    assert [r["loss"] for r in curve] == [r["loss"] for r in ref_curve] and all(r["l2nd"] > 0 for r in curve)
    # a different objective is a different run: its checkpoint would not be resumed
    assert json.loads((tmp_path / "ref_work" / "summary.json").read_text())["config"]["loss"] == OURS


def test_generation_is_a_function_of_the_seed(tmp_path):
    from varup.lm.generate import generate

    corpus, base = _toy(tmp_path)
    dec = {"n_per_prompt": 3, "max_new_tokens": 8, "batch_size": 4}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        generate(base, corpus / "eval.jsonl", tmp_path / f"{name}.jsonl", decode=dec, seed=seed, device="cpu")
    a, b, c = (read_jsonl(tmp_path / f"{n}.jsonl") for n in "abc")
    assert a == b and a != c and len(a) == 10 * 3
    assert sorted({(r["prompt_id"], r["sample"]) for r in a}) == [(i, k) for i in range(10) for k in range(3)]
    assert all(EOS not in r["generation"] for r in a)


def test_two_gloo_processes_follow_the_single_process_sft(tmp_path):
    """`torchrun --nproc_per_node=2 -m varup lm-sft` (gloo on CPU), the same global batch: the same logged losses
    (global token means, though the ranks hold different numbers of response tokens) and the same weights."""
    import os
    import subprocess
    import sys

    from varup.lm.stages import write_lm_references

    corpus, base = _toy(tmp_path)
    write_lm_references(base, corpus, tmp_path / "refs.pt", max_length=24, loss_tokens="response", num_clusters=4,
                        cluster_seed=0, support_k=None)
    spec = {"steps": 8, "batch_size": 8, "lr": 1e-3, "warmup_steps": 2, "max_length": 24, "log_every": 1,
            "ckpt_every": 4, "seed": 2, "loss": OURS}
    env = {**os.environ, "VARUP_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}

    def args(name):
        return ["lm-sft", "--device", "cpu", "--base", str(base), "--corpus", str(corpus), "--refs",
                str(tmp_path / "refs.pt"), "--train", json.dumps(spec), "--out", str(tmp_path / name),
                "--work", str(tmp_path / f"{name}_work")]

    subprocess.run([sys.executable, "-m", "varup", *args("single")], check=True, env=env, capture_output=True)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                        "varup", *args("ddp")], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = ([json.loads(x) for x in (tmp_path / f"{n}_work" / "metrics.jsonl").read_text().splitlines()]
            for n in ("single", "ddp"))
    assert [x["step"] for x in a] == [x["step"] for x in b] == list(range(1, 9))
    for x, y in zip(a, b):
        for k in ("loss", "ce", "l2nd", "lse"):
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), (x["step"], k)
    wa, wb = _weights(tmp_path / "single"), _weights(tmp_path / "ddp")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
