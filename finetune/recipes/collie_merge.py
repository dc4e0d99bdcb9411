"""The collie backend's export check and merge, run in the MAIN environment (transformers/peft of the project).

    python -m finetune.recipes.collie_merge --config <run>/resolved_config.json

LoRA: base model + the exported adapter (target_path) -> logits; merge_and_unload() -> logits again; both must
match Collie's own logits recorded by the worker (<run>/collie_probe.json). This is what proves the q/k row
layout was converted back from Collie's. Then the merged model is saved to merge_path with the tokenizer files.
Full fine-tuning: the model Collie saved in merge_path is loaded and checked against the same probe.
Writes <run>/merge_check.json; exits 1 when a check fails (never writes a merged model that does not match).
"""

from __future__ import annotations

import argparse
import glob
import json
import shutil
import sys
from pathlib import Path

from finetune.config.derived import adapter_dir, merged_dir
from finetune.recipes.common import quiet_false_tying_warning, read_config
from finetune.run_files import RUN_DIR_KEY

TOL = 1e-3  # max |logit difference|; fp32 on CPU gives ~1e-6, a wrong q/k layout gives ~1e-1


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    for name in ("--model", "--data", "--target", "--merge"):
        ap.add_argument(name, required=True)
    args = ap.parse_args()
    cfg = read_config(args.config)
    cfg = cfg.with_values({"model.path": args.model, "target_path": args.target, "merge_path": args.merge})
    run_dir = Path(cfg[RUN_DIR_KEY])

    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base_path = cfg["model"]["path"]
    target, merge = adapter_dir(cfg, run_dir), merged_dir(cfg, run_dir)
    probe_file = run_dir / "collie_probe.json"
    probe = json.loads(probe_file.read_text()) if probe_file.exists() else None
    trust = bool(cfg.get("trust_remote_code"))
    report = {"tolerance": TOL}

    def logits_of(model):
        model.eval()
        with torch.no_grad():
            return [model(input_ids=torch.tensor([ids])).logits[0].float() for ids in probe["input_ids"]]

    def max_diff(a, b):
        return max(float((x - y).abs().max()) for x, y in zip(a, b))

    if cfg["method"]["uses_lora"]:
        from peft import PeftModel

        # the base as Collie held it (bf16/fp16 training rounds the frozen weights), computed in fp32 like the probe
        train_dtype = getattr(torch, (probe or {}).get("train_dtype", "float32"))
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=train_dtype, trust_remote_code=trust).float()
        quiet_false_tying_warning(base)
        model = PeftModel.from_pretrained(base, str(target))
        if probe is not None:
            collie = [torch.tensor(x) for x in probe["logits"]]
            adapter = logits_of(model)
            report["adapter_vs_collie"] = max_diff(adapter, collie)
        merged = model.merge_and_unload()
        if probe is not None:
            merged_logits = logits_of(merged)
            report["merged_vs_adapter"] = max_diff(merged_logits, adapter)
            report["merged_vs_collie"] = max_diff(merged_logits, collie)
        ok = all(v <= TOL for k, v in report.items() if k != "tolerance")
        report["ok"] = ok
        (run_dir / "merge_check.json").write_text(json.dumps(report, indent=1))
        print(f"[collie_merge] {json.dumps(report)}", flush=True)
        if not ok:
            print(
                "collie merge: the exported adapter does not reproduce Collie's logits (see merge_check.json)",
                file=sys.stderr,
            )
            return 1
        if cfg.get("merge", True):
            if train_dtype != torch.float32:  # the merged model: the original (unrounded) base + the adapter
                base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, trust_remote_code=trust)
                merged = PeftModel.from_pretrained(base, str(target)).merge_and_unload()
            merged.save_pretrained(str(merge))
            for pattern in ("tokeniz*", "special_tokens_map.json", "chat_template.jinja", "generation_config.json"):
                for f in glob.glob(str(Path(base_path) / pattern)):
                    if not (merge / Path(f).name).exists():
                        shutil.copy2(f, merge / Path(f).name)
            print(f"[collie_merge] merged model -> {merge}", flush=True)
        return 0

    # full fine-tuning: Collie wrote the model itself; check it loads in this environment and matches
    model = AutoModelForCausalLM.from_pretrained(str(merge), dtype=torch.float32, trust_remote_code=trust)
    if probe is not None:
        report["saved_vs_collie"] = max_diff(logits_of(model), [torch.tensor(x) for x in probe["logits"]])
    report["ok"] = all(v <= TOL for k, v in report.items() if k not in ("tolerance",))
    (run_dir / "merge_check.json").write_text(json.dumps(report, indent=1))
    print(f"[collie_merge] {json.dumps(report)}", flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
