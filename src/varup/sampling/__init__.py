"""The sampling stage: CFG with top-k/top-p, editing masks, MC-Dropout passes and sample shards (sampler)."""
