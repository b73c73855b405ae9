"""varup.lm.textmetrics: Self-BLEU against an independent BLEU, featurize batched == one text at a time, MAUVE."""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from varup.lm.textmetrics import distinct_n, featurize, mauve_score, self_bleu

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------ Self-BLEU
def _ngrams(words, n):
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def _bleu(hyp: str, refs: list[str], max_order: int) -> float:
    """Textbook BLEU (Papineni et al.): clipped n-gram precisions against several references, brevity penalty with
    the closest reference length (ties: the shorter), geometric mean. No smoothing: asserts every order matches."""
    h = hyp.split()
    rs = [r.split() for r in refs]
    logp = 0.0
    for n in range(1, max_order + 1):
        hc = _ngrams(h, n)
        max_ref = Counter()
        for r in rs:
            for g, c in _ngrams(r, n).items():
                max_ref[g] = max(max_ref[g], c)
        correct = sum(min(c, max_ref[g]) for g, c in hc.items())
        total = sum(hc.values())
        assert correct > 0 and total > 0, "test texts must match at every order (no smoothing)"
        logp += math.log(correct / total) / max_order
    ref_len = min((abs(len(r) - len(h)), len(r)) for r in rs)[1]
    bp = 1.0 if len(h) >= ref_len else math.exp(1 - ref_len / len(h))
    return bp * math.exp(logp)


def _self_bleu_ref(texts, max_order):
    return float(np.mean([_bleu(t, texts[:i] + texts[i + 1:], max_order) for i, t in enumerate(texts)]))


TEXTS = ["the cat sat on the mat", "the cat sat on a mat", "a dog sat on the mat the end",
         "the dog sat on the mat", "the cat sat on the"]


@pytest.mark.parametrize("max_order", [2, 4])
@pytest.mark.parametrize("tokenize", ["none", "13a"])
def test_self_bleu_matches_independent_bleu(max_order, tokenize):
    want = _self_bleu_ref(TEXTS, max_order)
    got = self_bleu(TEXTS, max_order=max_order, tokenize=tokenize)
    assert got == pytest.approx(want, abs=1e-6)
    assert 0.0 < got < 1.0


def test_self_bleu_two_texts_by_hand():
    # "a b c d e f" vs "a b c d e": precisions 5/6, 4/5, 3/4, 2/3, no penalty; the reverse: precisions 1, brevity
    # penalty exp(1 - 6/5)
    want = 0.5 * ((5 / 6 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25 + math.exp(1 - 6 / 5))
    assert self_bleu(["a b c d e f", "a b c d e"]) == pytest.approx(want, abs=1e-9)


def test_self_bleu_extremes_and_errors():
    assert self_bleu(["a b c d e f"] * 4) == pytest.approx(1.0)
    assert self_bleu(["alpha beta gamma delta", "one two three four", "red green blue yellow"]) == pytest.approx(0.0,
                                                                                                              abs=1e-9)
    with pytest.raises(ValueError, match="at least 2"):
        self_bleu(["only one"])
    with pytest.raises(ValueError):
        self_bleu([])


def test_self_bleu_sample_is_seeded_subset():
    per = [_bleu(t, TEXTS[:i] + TEXTS[i + 1:], 2) for i, t in enumerate(TEXTS)]
    full = self_bleu(TEXTS, max_order=2)
    assert self_bleu(TEXTS, max_order=2, sample=len(TEXTS) + 3) == pytest.approx(full)
    s = self_bleu(TEXTS, max_order=2, sample=2, seed=3)
    assert s == self_bleu(TEXTS, max_order=2, sample=2, seed=3)
    pairs = [(per[i] + per[j]) / 2 for i in range(len(per)) for j in range(i + 1, len(per))]
    assert min(abs(s - p) for p in pairs) < 1e-6


def test_distinct_n():
    assert distinct_n(["a b a b", "a b"], 1) == pytest.approx(2 / 6)
    assert distinct_n(["a b a b", "a b"], 2) == pytest.approx(2 / 4)  # (a b) x3, (b a) x1
    assert distinct_n(["a", ""], 2) == 0.0


# ------------------------------------------------------------------------------------------------ featurize
WORDS = "the cat dog sat ran on a mat red blue big small and then".split()


@pytest.fixture(scope="module")
def lm():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<eos>"] + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0, eos_token_id=2)
    model = Qwen2ForCausalLM(cfg).eval()
    return model, tok


def _one(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, -1].numpy()


FTEXTS = ["the cat sat on the mat", "a dog", "big red dog ran and then sat on a small blue mat", "cat", "",
          "then the dog ran", "on a mat and then on a mat and then", "zebra the"]


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_featurize_batched_equals_one_at_a_time(lm, side, batch_size):
    model, tok = lm
    tok.padding_side = side
    got = featurize(model, tok, FTEXTS, batch_size=batch_size)
    assert got.dtype == np.float32 and got.shape == (len(FTEXTS), 32)
    for t, g in zip(FTEXTS, got):
        ids = tok(t)["input_ids"] or [tok.eos_token_id]
        np.testing.assert_allclose(g, _one(model, ids), atol=1e-5, rtol=0)
    # rows really differ (a wrong index into the padding would make short texts collapse onto pad features)
    assert np.abs(got[1] - got[3]).max() > 1e-3


def test_featurize_empty_text_is_eos_and_truncation(lm):
    model, tok = lm
    tok.padding_side = "right"
    f = featurize(model, tok, ["", "the cat sat on the mat", "the cat sat"], max_length=3, batch_size=4)
    np.testing.assert_allclose(f[0], _one(model, [tok.eos_token_id]), atol=1e-5, rtol=0)
    np.testing.assert_allclose(f[1], f[2], atol=1e-5, rtol=0)  # first 3 tokens kept
    assert not model.training


# ------------------------------------------------------------------------------------------------ MAUVE
def test_mauve_same_vs_shifted_and_deterministic():
    rng = np.random.default_rng(0)
    p = rng.standard_normal((200, 8)).astype(np.float32)
    q = rng.standard_normal((200, 8)).astype(np.float32)
    same = mauve_score(p, q)
    assert same["mauve"] > 0.9, same
    assert same["num_buckets"] == 20 and 0.0 <= same["frontier_integral"] <= 1.0
    far = mauve_score(p, q + np.float32(10.0))
    assert far["mauve"] < 0.2, far
    again = mauve_score(p, q)
    assert again["mauve"] == same["mauve"] and again["frontier_integral"] == same["frontier_integral"]
    assert mauve_score(p, q, num_buckets=5)["num_buckets"] == 5


def test_mauve_needs_two_samples():
    x = np.zeros((5, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="p=1, q=5"):
        mauve_score(x[:1], x)
    with pytest.raises(ValueError, match="p=5, q=0"):
        mauve_score(x, x[:0])


# ------------------------------------------------------------------------------------ MAUVE's equal truncation
def test_mauve_cuts_human_and_generated_texts_to_the_same_first_tokens(lm, tmp_path):
    """Human responses and generations that share their first ``max_length`` featurizer tokens and differ after
    them are the same texts to MAUVE (score 1), whatever the featurizer tokenizer's own ``truncation_side``
    (here ``left``, which would keep the differing ends), and the number cut on each side is recorded."""
    import json

    from varup.lm.score import n_truncated, score_generations

    model, tok = lm
    folder = tmp_path / "feat"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)  # a tokenizer whose config asks for left truncation (some hub tokenizers do)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "truncation_side": "left"}))
    heads = ["the cat sat on the mat", "a big red dog ran on", "then the small blue cat sat",
             "on a mat and then a", "the dog and the cat ran", "a red mat and a blue"]
    human = [{"prompt": f"p{i}", "response": f"{h} and then the dog ran"} for i, h in enumerate(heads)]
    gens = [{"prompt_id": i, "sample": 0, "prompt": f"p{i}", "generation": f"{h} blue blue red"}
            for i, h in enumerate(heads)] + [{"prompt_id": 9, "sample": 0, "prompt": "p9", "generation": "a dog"}]
    human.append({"prompt": "p9", "response": "a dog"})
    for name, recs in (("eval", human), ("gens", gens)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = score_generations(tmp_path / "gens.jsonl", tmp_path / "eval.jsonl", folder, tmp_path / "scores.json",
                            score={"max_length": 6, "batch_size": 4}, toy=False, featurizer_label="t", device="cpu")
    assert out["truncated"] == {"human": 6, "generated": 6, "max_length": 6}
    assert out["mauve"] == pytest.approx(1.0)
    assert json.loads((tmp_path / "scores.json").read_text())["truncated"] == out["truncated"]
    assert n_truncated(tok, ["the cat sat on the mat", "the cat sat on the mat red"], 6) == 1
