"""What every worker process of ours shares (the recipes run as their own processes; standard library at import,
torch only inside the functions that need it):

- reading the run's resolved config (secrets put back from the environment), plain log lines, atomic writes
- the device a worker runs on (a GPU job that sees no GPU stops), DeepSpeed's one-process environment, threads
- tokens/s as other tools count it (TokenMeter: every input token, and the supervised ones apart)
- history.jsonl (one row per log event, live: the driver's progress line reads it) and complete checkpoints

The data and prompt code is in finetune/recipes/data.py and templates.py, the merge in finetune/recipes/merge.py.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Dict, Optional

from finetune.osutil import atomic_write as atomic_write_text  # noqa: F401 - the workers' name for it
from finetune.osutil import (
    atomic_write_bytes,  # noqa: F401 - used by the recipes
    peak_rss_bytes,
)
from finetune.run_files import HISTORY

IGNORE_INDEX = -100  # the label of a token that is not trained on


def log(msg: str) -> None:
    """Plain log lines (the launcher writes them to <run>/logs/<step>.log); rank 0 only."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class ConfigView(dict):
    """A worker's config, read-only: the resolved config as nested dicts, where a key that is neither in the file
    nor a key of the schema fails loudly, with the close matches, also through ``.get`` (``cfg.get("lora_rank")``
    would be None in silence with a plain dict). The schema's keys come with the file (``_keys``, written by the
    driver: finetune/config/keys.py schema_keys), so no schema is imported here (Collie's environment has no
    omegaconf); a file without them (a run folder from before) is read unchecked. Free-form mappings below the
    schema's groups (backend.extra, data.mix, ...) are plain dicts. A worker given other paths on its command line
    takes a new view: ``cfg.with_values({"model.path": ...})``."""

    def __init__(self, data: dict, known: Optional[Dict[str, list]] = None, path: str = ""):
        super().__init__(data)
        self._path, self._known = path, known or {}
        for k, v in self.items():
            sub = f"{path}.{k}" if path else str(k)
            if isinstance(v, dict) and not isinstance(v, ConfigView) and (sub in self._known or not known):
                dict.__setitem__(self, k, ConfigView(v, known, sub))

    def _read_only(self, *a, **kw):
        raise TypeError("the run's config is read-only in a worker; take a new view with cfg.with_values({...})")

    __setitem__ = __delitem__ = update = setdefault = pop = popitem = clear = _read_only

    def with_values(self, values: Dict[str, object]) -> "ConfigView":
        """A new view with the dotted keys set (``{"model.path": p, "target_path": t}``)."""
        data = json.loads(json.dumps(self))
        for dotted, value in values.items():
            *parents, last = dotted.split(".")
            node = data
            for part in parents:
                node = node[part]
            node[last] = value
        return ConfigView(data, self._known or None, self._path)

    def _unknown(self, key) -> KeyError:
        import difflib

        where = f"{self._path}.{key}" if self._path else str(key)
        close = difflib.get_close_matches(str(key), [*self.keys(), *self._known.get(self._path, [])], n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        return KeyError(f"{where}: not a key of the run's config{hint}")

    def __getitem__(self, key):
        try:
            return dict.__getitem__(self, key)
        except KeyError:
            raise self._unknown(key) from None

    def get(self, key, default=None):
        if key not in self and self._known and self._path in self._known and key not in self._known[self._path]:
            raise self._unknown(key)
        return dict.get(self, key, default)


def read_config(path: str) -> dict:
    """The run's resolved_config.json (written by the driver, secrets redacted), with the secrets put back from
    this process's environment (finetune/secrets.py), as a read-only ConfigView (checked against the schema's keys
    when the file names them)."""
    from finetune.secrets import merge_secrets

    data = merge_secrets(json.loads(Path(path).read_text(encoding="utf-8")))
    known = data.get("_keys")
    return ConfigView(data, known if isinstance(known, dict) and "" in known else None)


def deepspeed_env() -> None:
    """DeepSpeed needs the torchrun environment even for one process: without RANK/WORLD_SIZE it falls into MPI
    discovery (ModuleNotFoundError: mpi4py). torchrun sets them for several processes; this fills them for one."""
    if "RANK" not in os.environ:
        from finetune.osutil import free_port

        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
        )


def require_device(hw: dict) -> str:
    """The torch device a worker runs on, from the config's hardware.device: 'cpu', or 'cuda' only when this
    process sees a CUDA GPU. A GPU hardware option where the job got no GPU (a Slurm node, a pod, a laptop) fails
    here with one line, instead of training on the CPU in silence."""
    if hw.get("device") != "cuda":
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        raise SystemExit(
            f"hardware.device=cuda, but this process sees no CUDA GPU (torch {torch.__version__}, CUDA "
            f"build {torch.version.cuda}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}) "
            "on " + os.uname().nodename
        )
    return "cuda"


def peak_rss_mb() -> float:
    """Peak resident set size of this process, in MiB (finetune.osutil.peak_rss_bytes)."""
    return peak_rss_bytes() / 2**20


# ---------------------------------------------------------------------------------------------- tokens/s


def target_tokens(labels) -> int:
    """Tokens that are really trained on: labels (after the causal shift) that are not -100."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def input_tokens(inputs, pad_id=None) -> int:
    """Non-padding input tokens of a batch (what other tools count as tokens/s): the attention masks' sum, also for
    nested batches (FlagEmbedding's queries + passages); packed rows (no mask) count every token that is not
    padding or is trained on (a pad id that is also a real token, such as EOS, is trained on)."""
    mask = inputs.get("attention_mask") if hasattr(inputs, "get") else None
    if mask is not None:
        return int(mask.sum())
    if hasattr(inputs, "get") and inputs.get("input_ids") is not None:
        ids, labels = inputs["input_ids"], inputs.get("labels")
        real = ids != pad_id if pad_id is not None else ids == ids
        if labels is not None:
            real = real | (labels != IGNORE_INDEX)
        return int(real.sum())
    values = inputs.values() if hasattr(inputs, "values") else inputs if isinstance(inputs, (list, tuple)) else []
    return sum(input_tokens(v, pad_id) for v in values if hasattr(v, "get") or isinstance(v, (list, tuple)))


class TokenMeter:
    """Tokens a training run processes, for the tokens/s in every log event: input tokens (every non-padding token,
    ``tokens_per_s``, what other tools mean) and supervised target tokens (``target_tokens_per_s``), over all
    ranks (this rank's count x world size), per interval between two log events."""

    def __init__(self, world_size: int = 1, pad_id=None):
        self.world, self.pad_id = world_size, pad_id
        self.input = self.target = 0
        self._mark = None  # (time, input, target) at the start or the last log event

    def count(self, inputs) -> None:
        if self._mark is None:
            self._mark = (time.perf_counter(), 0, 0)
        self.input += input_tokens(inputs, self.pad_id)
        labels = inputs.get("labels") if hasattr(inputs, "get") else None
        shifted = inputs.get("shift_labels") if hasattr(inputs, "get") else None
        if shifted is not None:  # a padding-free row: its targets (shifted per example, the masked ones left out)
            self.target += int((shifted != IGNORE_INDEX).sum())
        elif labels is not None:
            self.target += target_tokens(labels)

    def rates(self) -> Dict[str, float]:
        """tokens_per_s and target_tokens_per_s since the last call (or the first counted batch)."""
        if self._mark is None:
            return {}
        now = time.perf_counter()
        t0, i0, g0 = self._mark
        self._mark = (now, self.input, self.target)
        if now <= t0:
            return {}
        out = {"tokens_per_s": (self.input - i0) * self.world / (now - t0)}
        if self.target:
            out["target_tokens_per_s"] = (self.target - g0) * self.world / (now - t0)
        return out


# ---------------------------------------------------------------------------------------------- history callback


def history_callback(run_dir: Path):
    """A TrainerCallback that appends each log event to <run>/history.jsonl (rank 0): every number the Trainer
    logged (loss, learning rate, grad norm, tokens/s, ...), the step out of total_steps (what the driver's progress
    line reads while the step runs) and peak RSS, and prints a plain log line."""
    from transformers import TrainerCallback

    class HistoryCallback(TrainerCallback):
        def __init__(self):
            self.path = Path(run_dir) / HISTORY

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or not logs:
                return
            row = {"step": state.global_step, "total_steps": state.max_steps, "epoch": round(state.epoch or 0.0, 4)}
            for k, v in logs.items():
                if isinstance(v, (int, float)):
                    row[k] = v
            row["peak_rss_mb"] = round(peak_rss_mb(), 1)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            shown = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
            print(shown, flush=True)

    return HistoryCallback()


COMPLETE = "FINETUNE_COMPLETE"  # written into checkpoint-N last, once the checkpoint is whole
PAUSE_FILE = "FINETUNE_PAUSE_FILE"  # the driver creates this file on the first Ctrl-C / SIGTERM (launchers/process.py)
PAUSED_EXIT = 75  # a training step that saved a complete checkpoint and stopped on request (EX_TEMPFAIL: resume later)


def checkpoint_marker():
    """A TrainerCallback: FINETUNE_COMPLETE in checkpoint-N once the Trainer has finished saving it (every rank's
    shards). For Trainers whose _save_checkpoint we do not own (FlagEmbedding's, LLaMA-Factory's)."""
    from transformers import TrainerCallback

    class CompleteCheckpoints(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.barrier()
            if state.is_world_process_zero:
                atomic_write_text(
                    Path(args.output_dir) / f"checkpoint-{state.global_step}" / COMPLETE, str(time.time())
                )

    return CompleteCheckpoints()


def pause_callback():
    """A TrainerCallback that turns the driver's pause request (the file named by FINETUNE_PAUSE_FILE, made on the
    first Ctrl-C) into a clean stop: at the end of the current optimizer step every rank saves the checkpoint
    (ranks agree through one all_reduce, so none waits for a save the others skip) and training stops. After
    trainer.train() returns, ``paused_at`` is the step saved (None: not paused); the worker then exits PAUSED_EXIT
    instead of saving its final model."""
    from transformers import TrainerCallback

    flag = os.environ.get(PAUSE_FILE)

    class PauseOnRequest(TrainerCallback):
        paused_at = None

        def on_step_end(self, args, state, control, **kw):
            if not flag:
                return
            asked = os.path.exists(flag)
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                import torch

                t = torch.tensor([1.0 if asked else 0.0])
                dist.all_reduce(t)  # SUM: any rank that saw the request stops them all
                asked = bool(t.item() > 0)
            if asked:
                control.should_save = True
                control.should_training_stop = True
                self.paused_at = state.global_step
                log(f"pause requested: saving checkpoint-{state.global_step} and stopping")

        def on_epoch_end(self, args, state, control, **kw):
            if self.paused_at is not None:  # the epoch was cut short: no evaluation or second save of it
                control.should_evaluate = control.should_save = False

    return PauseOnRequest()


def last_complete_checkpoint(ckpt_dir: Path):
    """The newest checkpoint-N folder holding the COMPLETE marker (one cut by a kill has none), or None."""
    import re

    found = [
        (int(p.name.split("-")[1]), p)
        for p in Path(ckpt_dir).glob("checkpoint-*")
        if re.fullmatch(r"checkpoint-\d+", p.name) and (p / COMPLETE).exists()
    ]
    return max(found)[1] if found else None


def truncate_history(run_dir: Path, last_step: int) -> None:
    """On resume: drop history rows logged after the checkpoint we continue from (they will be logged again)."""
    path = Path(run_dir) / HISTORY
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if int(row.get("step", 0)) <= last_step:
            keep.append(line + "\n")
    atomic_write_text(path, "".join(keep))


def quiet_false_tying_warning(model) -> None:
    """PEFT 0.18 warns "Model has `tie_word_embeddings=True` and a tied layer is part of the adapter" for every model
    class that declares ``_tied_weights_keys`` (every Llama) when an embedding is in modules_to_save, also when the
    model's config unties them (peft/utils/other.py ``_get_module_names_tied_with_embedding``: "will not check if
    weight tying is disabled by the model's config"). On such a model the line is false, so it is silenced there;
    on a tied model (SmolLM2) it stays."""
    import warnings

    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text is not None and getattr(text, "tie_word_embeddings", None) is False:
        warnings.filterwarnings(
            "ignore", message=r"Model has `tie_word_embeddings=True` and a tied layer", category=UserWarning
        )
