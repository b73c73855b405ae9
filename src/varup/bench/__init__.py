"""Benchmarks that print figures (not tests): training and sampling speed (suite, ``python -m varup.bench.suite``),
FLOP counts (flops), and the objective's gradient strength (strength)."""
