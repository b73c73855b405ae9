"""The configuration layer, imported by the Snakefile: schema validation (schema, with every default in
schema.yaml), the checks a schema cannot make (checks), the run plans of the image arm (plan), the text-conditioned
arm (textplan) and the LM arm (lmplan), cluster and device policy (cluster), report inputs (reporting) and results
ownership (ownership). It imports no torch (an import-linter contract), so ``snakemake -n`` stays fast."""
