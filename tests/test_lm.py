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



def test_references_are_computed_on_the_device_asked_for_and_equal_the_cpu_computation(monkeypatch):
    """lm_references hands the embedding matrix to the kernels on ``device`` (before: always moved to the CPU);
    on the CPU the result is the direct computation's, bit for bit, and every tensor comes back on the CPU."""
    import varup.lm.sft as lmsft

    _, y, emb = _tensors(V=20, E=6)
    y[0, :4] = IGNORE
    param = torch.nn.Parameter(emb.double())  # as an LM's weight: a parameter, here float64
    refs = lm_references(param, y, num_clusters=4, support_k=3.0, device="cpu")
    direct = build_references(emb.double().float(), y[y != IGNORE].reshape(-1, 1), (1,), num_clusters=4, support_k=3.0)
    assert refs.keys() == direct.keys() and all(torch.equal(refs[k], direct[k]) for k in refs)
    assert all(v.device.type == "cpu" for v in refs.values())
    seen = []

    def kernels(codebook, *a, **kw):
        seen.append((codebook.device.type, codebook.dtype))
        raise RuntimeError("stop: the device was recorded")

    monkeypatch.setattr(lmsft, "build_references", kernels)
    with pytest.raises(RuntimeError, match="stop"):
        lm_references(param, y, num_clusters=4, device="meta")
    assert seen == [("meta", torch.float32)]


def test_the_lm_refs_command_computes_on_its_device_option(tmp_path, monkeypatch):
    """``varup lm-refs --device X`` (the rule passes the GPU rules' device) reaches the kernels: ``--device cpu``
    writes the references of the CPU computation, ``--device meta`` hands them a meta matrix (before: the option
    was ignored and the CPU always used)."""
    import varup.lm.sft as lmsft
    from varup.cli import main
    from varup.lm.hub import load_causal_lm, load_tokenizer

    corpus, base = _toy(tmp_path)
    args = ["lm-refs", "--base", str(base), "--corpus", str(corpus), "--train", json.dumps({"max_length": 24}),
            "--params", json.dumps({"num_clusters": 4, "cluster_seed": 0, "support_k": None})]
    main([*args, "--device", "cpu", "--out", str(tmp_path / "refs.pt")])
    refs = torch.load(tmp_path / "refs.pt", weights_only=True)
    data = encode_records(load_tokenizer(base), read_jsonl(corpus / "train.jsonl"), 24)
    t = data["labels"][:, 1:]
    emb = load_causal_lm(base).get_input_embeddings().weight.detach().float()
    direct = build_references(emb, t[t != IGNORE].reshape(-1, 1), (1,), num_clusters=4, cluster_seed=0, support_k=None)
    assert refs.keys() == direct.keys() and all(torch.equal(refs[k], direct[k]) for k in refs)
    seen = []

    def kernels(codebook, *a, **kw):
        seen.append(codebook.device.type)
        raise RuntimeError("stop: the device was recorded")

    monkeypatch.setattr(lmsft, "build_references", kernels)
    with pytest.raises(RuntimeError, match="stop"):
        main([*args, "--device", "meta", "--out", str(tmp_path / "meta.pt")])
    assert seen == ["meta"] and not (tmp_path / "meta.pt").exists()

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


# ------------------------------------------------------------------ SFT at the paper's size: micro-batches, chunks
def _head_case(V=23, E=6, B=3, T=9, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, E, generator=g, dtype=torch.float64)
    head = torch.nn.Linear(E, V, bias=bias).double()
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, E, generator=g, dtype=torch.float64))
        if bias:
            head.bias.copy_(torch.randn(V, generator=g, dtype=torch.float64))
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :4] = IGNORE  # a prompt
    labels[1, 6:] = IGNORE  # padding
    return hidden, head, labels


@pytest.mark.parametrize("loss, chunk, bias", [({}, 1, False), ({}, 4, True), (OURS, 3, False), (OURS, 5, True),
                                               (OURS, None, False)])
def test_the_chunked_head_and_loss_equal_the_full_logits_loss_and_gradients(loss, chunk, bias):
    """The LM head on the trained positions only, a chunk at a time, with gradients taken chunk by chunk: the same
    objective (a mean over all trained tokens), terms and gradients for the hidden states and the head as the head
    on every position followed by :func:`lm_loss`."""
    from varup.lm.headloss import STATS, head_loss

    hidden, head, labels = _head_case(bias=bias)
    emb = torch.randn(head.weight.shape[0], 4, generator=torch.Generator().manual_seed(1))
    fn = token_objective(loss, lm_references(emb, labels[:, 1:], num_clusters=3) if loss else None)
    h_ref = hidden.clone().requires_grad_(True)
    ref = lm_loss(fn, head(h_ref), labels)
    ref.total.backward()
    g_ref = [p.grad.clone() for p in head.parameters()]
    head.zero_grad()
    h = hidden.clone().requires_grad_(True)
    keep = labels[:, 1:] != IGNORE
    n = int(keep.sum())
    total, stats = head_loss(h[:, :-1][keep], head, labels[:, 1:][keep], fn, chunk=chunk, denom=n, entropy=True)
    (2.0 * total).backward()  # the gradient is scaled by the upstream one
    assert torch.allclose(total.double(), ref.total.double(), rtol=1e-6, atol=0)
    got = dict(zip(STATS, stats.tolist()))
    for k in ("ce", "l2nd", "lse"):
        assert got[k] == pytest.approx(float(getattr(ref, k)), rel=1e-5, abs=1e-9), k
    with torch.no_grad():
        p = torch.softmax(head(hidden[:, :-1][keep]), -1)
    assert got["pred_entropy"] == pytest.approx(float(-(p * p.log()).sum(-1).mean()), rel=1e-5)
    assert torch.allclose(h.grad, 2.0 * h_ref.grad, rtol=1e-9, atol=1e-12)
    for a, b in zip(head.parameters(), g_ref):
        assert torch.allclose(a.grad, 2.0 * b, rtol=1e-9, atol=1e-12)


def _fresh_toy(tmp_path, n_train=64, seed=0):
    from varup.lm.toy import build_toy_model, build_toy_tokenizer

    corpus = tmp_path / "corpus"
    make_corpus(corpus, seed=0, n_train=n_train, eval_per_prompt=1, n_pretrain=8, template=TOY_TEMPLATE)
    tok = build_toy_tokenizer(TOY_TEMPLATE)
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
             "num_key_value_heads": 1}
    data = encode_records(tok, read_jsonl(corpus / "train.jsonl"), 24)
    return (lambda: build_toy_model(tok, small, seed=seed)), tok, data


def test_one_chunk_of_the_whole_batch_is_bit_identical_to_the_full_logits_step(tmp_path):
    """micro_batch and head_chunk unset (the toy's runs): the objective and every parameter's gradient equal, bit for
    bit on the CPU, those of the full-logits step that SFT took before (model(...).logits, then lm_loss)."""
    from varup.lm.sft import SFTObjective

    build, _, data = _fresh_toy(tmp_path)
    b = {k: v[:8] for k, v in data.items()}
    T = int(b["attention_mask"].sum(1).max())
    b = {k: v[:, :T] for k, v in b.items()}
    fn = token_objective(OURS, lm_references(build().get_input_embeddings().weight, data["labels"][:, 1:],
                                             num_clusters=4))
    full = build()
    ref = lm_loss(fn, full(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float(), b["labels"])
    ref.total.backward()
    model = build()
    n = int((b["labels"][:, 1:] != IGNORE).sum())
    total, _ = SFTObjective(model)(b["input_ids"], b["attention_mask"], b["labels"], fn, None, n)
    total.backward()
    assert torch.equal(total, ref.total)
    grads = dict(full.named_parameters())
    assert all(torch.equal(p.grad, grads[k].grad) for k, p in model.named_parameters())


def test_micro_batches_and_head_chunks_give_the_weights_of_the_whole_batch(tmp_path):
    """Gradient accumulation over micro-batches of 3, 3 and 2 sequences (different token counts each) and the head in
    chunks of 5 positions: the loss is still the mean over every trained token of the batch, so the weights after 4
    steps and the logged curve equal the unsplit run's to float tolerance."""
    from varup.lm.sft import fit

    build, tok, data = _fresh_toy(tmp_path)
    refs = lm_references(build().get_input_embeddings().weight, data["labels"][:, 1:], num_clusters=4)
    spec = {"steps": 4, "batch_size": 8, "lr": 1e-3, "warmup_steps": 1, "max_length": 24, "log_every": 1,
            "ckpt_every": 100, "seed": 1, "loss": OURS}
    runs = {}
    for name, extra in (("whole", {"head_chunk": None}), ("split", {"micro_batch": 3, "head_chunk": 5})):
        model = build()
        fit(model, tok, data, LMTrainConfig(**spec, **extra), refs=refs, out_dir=tmp_path / name,
            work_dir=tmp_path / f"{name}_work", device="cpu")
        curve = [json.loads(x) for x in (tmp_path / f"{name}_work" / "metrics.jsonl").read_text().splitlines()]
        runs[name] = (model.state_dict(), curve)
    (wa, ca), (wb, cb) = runs["whole"], runs["split"]
    moved = build().state_dict()
    assert any(not torch.allclose(wa[k], moved[k]) for k in wa)  # it trained
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)
    for x, y in zip(ca, cb):
        for k in ("loss", "ce", "l2nd", "lse", "grad_norm", "pred_entropy"):
            assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-8), (x["step"], k)


def test_no_tensor_of_a_step_holds_more_than_a_chunk_of_positions_times_the_vocabulary(tmp_path):
    """Every tensor that a step (a log step included) creates with a vocabulary-sized last dimension has at most
    head_chunk rows: the peak is chunk x V, not batch x length x V (the full logits of 8 x ~20 positions)."""
    from torch.overrides import TorchFunctionMode

    from varup.lm.sft import fit

    build, tok, data = _fresh_toy(tmp_path)
    model = build()
    V = model.get_output_embeddings().weight.shape[0]
    rows = []

    def note(x):
        if isinstance(x, torch.Tensor) and x.ndim >= 1 and x.shape[-1] == V:
            rows.append(x.numel() // V)
        elif isinstance(x, (tuple, list)):
            for y in x:
                note(y)

    class Sizes(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            note(out)
            return out

    refs = lm_references(model.get_input_embeddings().weight, data["labels"][:, 1:], num_clusters=4)
    spec = {"steps": 2, "batch_size": 8, "lr": 1e-3, "warmup_steps": 1, "max_length": 24, "log_every": 1,
            "ckpt_every": 100, "seed": 1, "loss": OURS, "head_chunk": 4}
    with Sizes():
        fit(model, tok, data, LMTrainConfig(**spec), refs=refs, out_dir=tmp_path / "out", work_dir=tmp_path / "w",
            device="cpu")
    assert V not in (32, 64, 16) and rows and max(rows) == 4  # the head ran, 4 positions at a time at most


DDP_SCRIPT = """
import json, sys
from pathlib import Path
import torch
from varup.base.utils import read_jsonl
from varup.lm.hub import load_causal_lm, load_tokenizer
from varup.lm.sft import LMTrainConfig, encode_records, fit
from varup.training.references import load_references

base, corpus, refs, out, spec = sys.argv[1:6]
spec = json.loads(spec)
model, tok = load_causal_lm(base), load_tokenizer(base)
model.unused = torch.nn.Linear(3, 3)  # a parameter the objective never uses: frozen, or DDP would fail
torch.nn.init.constant_(model.unused.weight, 0.5)
torch.nn.init.constant_(model.unused.bias, 0.5)
data = encode_records(tok, read_jsonl(Path(corpus) / "train.jsonl"), spec["max_length"])
torch.manual_seed(spec["seed"])
fit(model, tok, data, LMTrainConfig(**spec), refs=load_references(refs), out_dir=Path(out),
    work_dir=Path(out + "_work"), device="cpu")
"""


def test_two_gloo_processes_with_micro_batches_and_chunks_equal_the_single_process(tmp_path):
    """2 gloo processes, each its 4 sequences in micro-batches of 2 and the head in chunks of 3 positions, and a
    parameter the objective never uses (frozen, not left for DDP to trip on): the weights of one process that takes
    the whole batch at once, and the unused parameter untouched."""
    import os
    import subprocess
    import sys

    from varup.lm.stages import write_lm_references

    corpus, base = _toy(tmp_path)
    write_lm_references(base, corpus, tmp_path / "refs.pt", max_length=24, loss_tokens="response", num_clusters=4,
                        cluster_seed=0, support_k=None)
    script = tmp_path / "sft_script.py"
    script.write_text(DDP_SCRIPT)
    spec = {"steps": 4, "batch_size": 8, "lr": 1e-3, "warmup_steps": 1, "max_length": 24, "log_every": 1,
            "ckpt_every": 100, "seed": 2, "loss": OURS}
    env = {**os.environ, "VARUP_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}

    def args(name, **extra):
        return [str(script), str(base), str(corpus), str(tmp_path / "refs.pt"), str(tmp_path / name),
                json.dumps({**spec, **extra})]

    r = subprocess.run([sys.executable, *args("single", head_chunk=None)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        *args("ddp", micro_batch=2, head_chunk=3)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "frozen, as the objective gives them no gradient: unused.weight, unused.bias" in r.stderr
    wa, wb = _weights(tmp_path / "single"), _weights(tmp_path / "ddp")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)
    assert (wb["unused.weight"] == 0.5).all() and (wb["unused.bias"] == 0.5).all()
    a, b = ([json.loads(x) for x in (tmp_path / f"{n}_work" / "metrics.jsonl").read_text().splitlines()]
            for n in ("single", "ddp"))
    for x, y in zip(a, b):
        for k in ("loss", "ce", "l2nd", "lse", "pred_entropy"):
            assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-6), (x["step"], k)


def test_the_step_memory_estimate_at_the_paper_config():
    """The estimate counts what it says: the body scales with the micro-batch's tokens, the head with the chunk, and
    at the paper's Qwen1.5-0.5B step (64 x 512, bf16) micro-batching and chunking take the peak from more than one
    GPU's memory to a few GB."""
    from varup.lm.memory import QWEN15_05B, body_bytes_per_token, head_chunk_bytes, step_activation_bytes

    q = QWEN15_05B
    kw = {"intermediate": q["intermediate"], "layers": q["layers"], "kv": q["kv"]}
    whole = step_activation_bytes(64, None, 512, q["vocab"], q["hidden"], None, "bf16", **kw)
    split = step_activation_bytes(64, 4, 512, q["vocab"], q["hidden"], 2048, "bf16", **kw)
    per_token = body_bytes_per_token(q["hidden"], q["intermediate"], q["layers"], q["kv"], "bf16", "fp32")
    assert whole["body"] == 64 * 512 * per_token and split["body"] == 4 * 512 * per_token
    assert whole["head"] == head_chunk_bytes(64 * 512, q["vocab"], q["hidden"], "bf16")
    # the logits alone (64 x 512 x V in bf16) are the 10 GB; the head holds 16 bytes per logit
    assert 64 * 512 * q["vocab"] * 2 == pytest.approx(10e9, rel=0.01)
    assert whole["head"] - q["vocab"] * q["hidden"] * 6 == 64 * 512 * q["vocab"] * 16
    assert whole["peak"] > 80e9 and split["peak"] < 12e9
    assert step_activation_bytes(64, None, 512, q["vocab"], q["hidden"], 2048, "bf16", world=8, **kw)["body"] == \
        8 * 512 * per_token
    with pytest.raises(ValueError, match="dtype"):
        step_activation_bytes(64, 4, 512, 10, 8, None, "int8", **kw)


# ------------------------------------------------------------------------------------ the stop rule (issue 24)
def _chain_model(tok, succ: dict[str, str], default: str):
    """A one-layer Qwen2 whose greedy next token is a function of the current token alone: ``succ`` (else
    ``default``). Attention and MLP outputs are zero, so the residual stream is the one-hot embedding."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    V, H = len(tok), 64
    cfg = Qwen2Config(vocab_size=V, hidden_size=H, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    model = Qwen2ForCausalLM(cfg).eval()
    head = torch.zeros(V, H)
    for a in range(V):
        head[tok.convert_tokens_to_ids(succ.get(tok.convert_ids_to_tokens(a), default)), a] = 10.0
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(V, H))
        model.lm_head.weight.copy_(head)
    return model


def test_generation_stops_at_the_templates_next_instruction_header(tmp_path):
    """A model that answers "red" and then opens a new "### instruction :" block forever: with the default stop rule
    its row ends at the header and stores "red"; the other row of the batch (which never writes the header) runs on
    to max_new_tokens; with ``stop: eos`` the row runs on into the new blocks, as before the rule."""
    from transformers import StoppingCriteriaList

    from varup.lm.generate import StopAtText, as_decoded, generate
    from varup.lm.toy import build_toy_tokenizer

    tok = build_toy_tokenizer(TOY_TEMPLATE)
    model = _chain_model(tok, {":": "red", "red": "###", "###": "instruction", "instruction": ":"}, "green")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    header = TOY_TEMPLATE.format(instruction="name a colour")
    ev = tmp_path / "eval.jsonl"
    ev.write_text("".join(json.dumps({"prompt": p, "response": "red"}) + "\n" for p in (header, "name a colour green")))
    dec = {"n_per_prompt": 1, "max_new_tokens": 12, "do_sample": False, "batch_size": 2}
    generate(tmp_path / "m", ev, tmp_path / "stop.jsonl", decode=dec, seed=0, device="cpu")
    generate(tmp_path / "m", ev, tmp_path / "eos.jsonl", decode={**dec, "stop": "eos"}, seed=0, device="cpu")
    stop, eos = read_jsonl(tmp_path / "stop.jsonl"), read_jsonl(tmp_path / "eos.jsonl")
    assert [r["generation"] for r in stop] == ["red", " ".join(["green"] * 12)]
    # the toy's word-level decoder writes "###" as "#" glued to the word before: the header as it is decoded
    assert eos[0]["generation"] == "red# instruction : red# instruction : red# instruction :" and eos[1] == stop[1]
    stops = as_decoded(tok, ["### instruction :"])
    assert stops == ["### instruction :", "# instruction :"]
    # the stopped row is padded from the step after the header while the other row goes on
    enc = tok([header, "name a colour green"], return_tensors="pt", padding=True, add_special_tokens=False)
    start = enc["input_ids"].shape[1]
    out = model.generate(**enc, do_sample=False, max_new_tokens=12, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id,
                         stopping_criteria=StoppingCriteriaList([StopAtText(tok, stops, start)]))
    assert out.shape[1] == start + 12
    assert tok.convert_ids_to_tokens(out[0, start:start + 4]) == ["red", "###", "instruction", ":"]
    assert (out[0, start + 4:] == tok.pad_token_id).all() and (out[1, start:] == tok.convert_tokens_to_ids("green")).all()


def test_the_stop_header_of_each_template_and_a_header_inside_a_token():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from varup.lm.dolly import format_prompt
    from varup.lm.generate import DecodeConfig, StopAtText, cut_at_stop, instruction_header, stop_strings

    assert instruction_header("dolly") == "### Instruction:" and instruction_header(TOY_TEMPLATE) == "### instruction :"
    assert instruction_header("plain") is None and instruction_header("Q: {instruction}\nA:") == "Q:"
    rec = {"instruction": "Say hi", "context": ""}
    assert stop_strings([format_prompt(rec, "dolly")], "template") == ["### Instruction:"]
    assert stop_strings([format_prompt(rec, TOY_TEMPLATE)], "template") == ["### instruction :"]
    assert stop_strings([format_prompt(rec, "plain")], "template") == []  # no header: eos only
    assert stop_strings([format_prompt(rec, "dolly")], "eos") == []
    assert stop_strings(["Q: hi\nA:"], "template", template="Q: {instruction}\nA:") == ["Q:"]
    assert DecodeConfig().stop == "template"
    with pytest.raises(ValueError, match="lm.generate.stop"):
        DecodeConfig(stop="never")
    # a header that starts inside a token ("done.###") is found on the decoded text, and the text is cut before it
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", "done.###", "Instruction:", "###", "Hi"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # words joined by single spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    ids = torch.tensor([[5, 4, 6, 3, 4], [5, 4, 6, 3, 0], [0, 0, 6, 5, 6]])  # the prompt (first 2) holds a header
    crit = StopAtText(tok, ["### Instruction:"], start=2)
    assert crit(ids, None).tolist() == [True, False, False]
    text = tok.decode(ids[0, 2:], skip_special_tokens=True)
    assert text == "Hi done.### Instruction:" and cut_at_stop(text, crit.stops) == "Hi done."
    assert cut_at_stop("no header here", crit.stops) == "no header here"


def test_lm_generate_stop_is_typed_and_self_bleu_within_prompts_needs_two_samples():
    """``lm.generate.stop`` takes template | eos; ``self_bleu_over: prompt`` with one sample per prompt is refused when
    the workflow is planned (it would be a NaN), naming both keys."""
    from pathlib import Path

    import yaml

    from varup.config.errors import ConfigError
    from varup.config.lmplan import check_lm
    from varup.config.schema import validate

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "config.yaml").read_text())
    cfg = json.loads(json.dumps(raw))
    cfg["lm"]["generate"]["stop"] = "eos"
    check_lm(validate(cfg))
    cfg["lm"]["generate"]["stop"] = "never"
    with pytest.raises(ConfigError, match="lm/generate/stop: 'never' is not one of"):
        validate(cfg)
    cfg = json.loads(json.dumps(raw))
    cfg["lm"]["score"]["self_bleu_over"] = "prompt"
    cfg["lm"]["generate"]["n_per_prompt"] = 1
    with pytest.raises(ConfigError, match=r"lm/score/self_bleu_over: 'prompt'.*lm/generate/n_per_prompt >= 2"):
        check_lm(validate(cfg))
    cfg["lm"]["generate"]["n_per_prompt"] = 2
    check_lm(validate(cfg))
