"""What run_all.py is made of: the notebooks' registry (notebooks.toml), their templates and the cleaning of
executed notebooks (notebooks), the results folders' safety rules (folders) and what results/README.md
and summary.csv say (summary)."""
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = tomllib.loads((ROOT / "notebooks.toml").read_text())
EXPERIMENTS = tuple(name for name, entry in NOTEBOOKS.items() if entry["path"].startswith("Experiments/"))
ON_CLUSTER = tuple(name for name, entry in NOTEBOOKS.items() if entry.get("cluster"))
# Parameters that say how a notebook was run, not what it computed: never baked into a stored
# notebook (a cluster's address means nothing to a reader, and would fail a rerun).
HOW_RUN = ("scheduler",)
