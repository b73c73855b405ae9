"""The tokenizer stage: training the multi-scale VQVAE from scratch (train), the gate on its reconstructions
(gate), and the token cache every later stage reads (tokens)."""
