"""The report layer: tables and figures made from result files only (tables, figures, uncertainty, modes) and their
formats (tablefmt). Imported by nothing but the CLI (an import-linter contract), so an edit here re-runs only the
report rules."""
