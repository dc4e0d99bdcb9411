"""submitit internals (submitit 1.5.4): the sbatch text it would write for a job."""

from __future__ import annotations

from finetune.compat import private

DIST, PINNED = "submitit", "1.5.4"
TOUCHES = ("submitit.slurm.slurm.SlurmExecutor._make_submission_file_text",)


def submission_text(executor, command: str, job_id: str = "%j") -> str:
    """The sbatch script an AutoExecutor would submit for ``command`` (shown by the dry run, kept in the run)."""
    slurm = private(executor, "_executor", DIST, PINNED)
    return private(slurm, "_make_submission_file_text", DIST, PINNED)(command, job_id)
