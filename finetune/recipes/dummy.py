"""The dummy backend's process: reads the resolved config and logs a synthetic, falling loss (no training)."""

import argparse
import json
import os
import sys
import time
from pathlib import Path

from finetune.recipes.common import read_config
from finetune.run_files import HISTORY, RUN_DIR_KEY


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    cfg = read_config(ap.parse_args().config)
    run_dir = Path(cfg[RUN_DIR_KEY])
    rank = int(os.environ.get("RANK", "0"))
    b = cfg["backend"]
    print(f"dummy finetune: rank {rank}, backend args {json.dumps({k: v for k, v in b.items() if k != 'methods'})}")
    if b.get("fail"):
        print("dummy finetune: failing as asked (backend.fail=true)", file=sys.stderr)
        return 3
    if rank == 0:
        with open(run_dir / HISTORY, "w") as f:  # a rerun (requeued job) starts over: no duplicates
            for step in range(1, b["steps"] + 1):
                time.sleep(b.get("sleep_s", 0))
                f.write(
                    json.dumps({"step": step, "loss": round(2.0 / step, 4), "learning_rate": cfg["learning_rate"]})
                    + "\n"
                )
                f.flush()
                print(f"step {step} loss {2.0 / step:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
