"""The training stage: the VAR trainer (loop), the paper's objective (losses), its references built once per
tokenizer (references), and warm starts from released weights (warmstart)."""
