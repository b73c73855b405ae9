#!/usr/bin/env bash
# Snakemake runs this once inside the conda env it has just created from varup.yaml (--sdm conda); its content is
# part of the env's hash. The env holds varup's pinned dependencies only. The library itself is the workflow's own
# src/, found at job time through VARUP_SRC (set by workflow/rules/common.smk; Snakemake removes PYTHONPATH from
# conda jobs): an edit to src/ needs no new env, and checkouts sharing a --conda-prefix each run their own code.
set -euo pipefail

prefix=$(python -c 'import sys; print(sys.prefix)')
site=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

# Every interpreter of the env (the varup command, python -m varup, torchrun's workers) puts $VARUP_SRC first on
# sys.path; without VARUP_SRC nothing changes and `import varup` fails, naming the module.
echo 'import os, sys; p = os.environ.get("VARUP_SRC"); p and sys.path.insert(0, p)' > "$site/varup-src.pth"

# The rules call `varup <stage>`, the console script a pip install would have made.
cat > "$prefix/bin/varup" <<EOF
#!/bin/sh
exec "$prefix/bin/python" -m varup "\$@"
EOF
chmod +x "$prefix/bin/varup"
