"""Datasets: the seeded toy shapes dataset (toy), real image folders with VAR's preprocessing (folder), fetching
and preparing real datasets (prepare), captions (captions), the mode classifier's training data (modes), and the
seeded batch order every trainer reads (batches). Nothing is imported here, so ``import varup.data.toy`` does not
pull in torch and a stage's code fingerprint holds only the modules it uses."""
