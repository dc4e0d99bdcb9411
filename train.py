"""finetune: one Hydra config, every fine-tuning backend.

    python train.py                                  # tiny Llama + LoRA on the shipped data, on CPU
    python train.py backend=collie lora_r=16         # any group option, any top-level key
    python train.py -m lora_r=4,8,16                 # a sweep
    python train.py --help                           # every group and option

Composing and validating import only hydra/omegaconf; the backends run as separate processes.
"""

import hydra

from finetune.cli import setup, task


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def hydra_main(cfg):
    return task(cfg)


def main():
    setup()  # schemas, resolvers, our error reporting; resume=true's recorded overrides into sys.argv
    hydra_main()


if __name__ == "__main__":
    main()
