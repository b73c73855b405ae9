"""The LM arm (the paper's Table 6): supervised fine-tuning of a causal LM with cross-entropy and with
the uncertainty-preserving objective, generation for held-out prompts, MAUVE and Self-BLEU.

* :mod:`varup.lm.grammar` — the offline corpus: a seeded grammar of instruction/response pairs with known modes.
* :mod:`varup.lm.dolly` — databricks-dolly-15k: reading, prompt formatting, the held-out split.
* :mod:`varup.lm.hub` — fetching a hub model's files (sha256-checked) and loading models/tokenizers through
  transformers (a hub folder, or a folder written by ``save_pretrained``).
* :mod:`varup.lm.sft` — the toy model, pre-training and SFT (CE or the objective), resumable.
* :mod:`varup.lm.generate` — sampling responses with fixed decoding settings.
* :mod:`varup.lm.textmetrics` — MAUVE (mauve-text) over LM features, Self-BLEU (sacrebleu).
* :mod:`varup.lm.score` — one run's scores: MAUVE, Self-BLEU and, on the toy, mode coverage.
"""
