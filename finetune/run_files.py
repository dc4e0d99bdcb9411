"""The names of what a run folder holds, defined once (standard library only: the workers in Collie's own
environment import it too). A run folder (finetune/run_dir.py claims it):

    manifest.json         what ran and how it ended: resolved config, overrides, git, packages, data hashes, steps
    config.yaml           the resolved config as YAML (secrets redacted)
    overrides.yaml        the overrides as typed (`finetune reproduce` replays them)
    resolved_config.json  the resolved config the workers read, with the run folder under RUN_DIR_KEY
    history.jsonl         one row per logged step (loss, learning rate, evaluations) from every backend
    metrics.json          the final metrics
    result.json           status and the sweep metric of the run (what a sweep's summary reads)
    train_summary.json    the alpacalora worker's summary of its training
    checkpoints/          the Trainer's checkpoint-N folders
    logs/<step>.log       each step's output
    .finetune.lock        held (flock) for the run's life
"""

MANIFEST = "manifest.json"
CONFIG_YAML = "config.yaml"
OVERRIDES = "overrides.yaml"
RESOLVED_CONFIG = "resolved_config.json"
HISTORY = "history.jsonl"
METRICS = "metrics.json"
RESULT = "result.json"
TRAIN_SUMMARY = "train_summary.json"
CHECKPOINTS = "checkpoints"
LOGS = "logs"
LOCK = ".finetune.lock"
# the key of resolved_config.json that holds the run folder (added by the driver; not a config key)
RUN_DIR_KEY = "_run_dir"
