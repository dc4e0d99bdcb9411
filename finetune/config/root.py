"""The repository's root folder (where conf/, models/ and outputs/ are), defined once, below everything else."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
