"""``llamafactory-cli train <yaml>`` with this project's trainer callbacks, for a single-process run: LLaMA-Factory's
own ``run_exp`` (what its CLI calls for ``train`` when it does not relaunch itself under torchrun), given
complete-checkpoint markers, a pause on request (the driver's first Ctrl-C: a checkpoint at the end of the
current step, then exit 75) and the LoRA forward of finetune/recipes/lora_speed.py. Any other command, and a
distributed train (FORCE_TORCHRUN=1: LLaMA-Factory starts the ranks with its own launcher file), goes to
LLaMA-Factory's CLI unchanged.

    python -m finetune.recipes.llamafactory_cli train <run>/llamafactory/train.yaml [key=value ...]
"""

from __future__ import annotations

import os
import sys


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "train" and os.environ.get("FORCE_TORCHRUN") != "1":
        from llamafactory.train.tuner import run_exp

        from finetune.recipes.common import PAUSED_EXIT, checkpoint_marker, pause_callback
        from finetune.recipes.lora_speed import lora_speed_callback

        sys.argv.pop(1)  # as LLaMA-Factory's launcher does: run_exp reads the yaml and overrides from sys.argv
        pause = pause_callback()
        run_exp(callbacks=[checkpoint_marker(), pause, lora_speed_callback()])
        return PAUSED_EXIT if pause.paused_at is not None else 0
    from llamafactory.cli import main as cli

    cli()
    return 0


if __name__ == "__main__":
    sys.exit(main())
