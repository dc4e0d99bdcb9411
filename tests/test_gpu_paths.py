"""GPU and cluster code paths, checked on a CPU: what we generate for GPU hardware (argv, environment, DeepSpeed JSON,
Trainer arguments, sbatch scripts, k8s manifests), with GPUs made visible to the planner by a stand-in nvidia-smi
where detection matters, and the library calls the GPU paths make, made on CPU tensors.

Tests that truly need a GPU are marked `gpu` (skipped here with the reason).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from conftest import PY, REPO, run_train, user_env

A100 = "{i}, NVIDIA A100-SXM4-80GB, 81920, 8.0"


def fake_nvidia_smi(folder: Path, n: int) -> dict:
    """A stand-in nvidia-smi listing n A100s (what the real one prints for the query finetune makes)."""
    smi = folder / "bin" / "nvidia-smi"
    smi.parent.mkdir(parents=True, exist_ok=True)
    smi.write_text("#!/bin/sh\n" + "".join(f"echo '{A100.format(i=i)}'\n" for i in range(n)))
    smi.chmod(0o755)
    return {"PATH": f"{smi.parent}{os.pathsep}{os.environ['PATH']}"}


def dry(tmp_path, *overrides, env=None) -> str:
    proc, _ = run_train(*overrides, "dry_run=true", outputs=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def refused(tmp_path, *overrides, env=None) -> str:
    proc, _ = run_train(*overrides, outputs=tmp_path, env=env)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    return lines[0]


def argv_of(out: str, step: str) -> list:
    block = out.split(f". {step}  (log:", 1)[1]
    return json.loads(re.search(r"argv: (\[.*\])", block).group(1))


def env_of(out: str, step: str) -> dict:
    block = out.split(f". {step}  (log:", 1)[1].split("\n  ", 1)[1]
    m = re.search(r"^     env: (\{.*\})$", re.split(r"\n  \d\. ", block)[0], re.M)
    return json.loads(m.group(1)) if m else {}


# ------------------------------------------------------------------------------------------- process layout


@pytest.mark.parametrize(
    "hardware,nproc", [("single_gpu", 1), ("multi_gpu", 8), ("a100_80g_x8", 8), ("h100_x8", 8), ("rtx4090", 1)]
)
def test_hardware_sets_the_process_layout(tmp_path, hardware, nproc):
    out = dry(tmp_path, f"hardware={hardware}")
    argv = argv_of(out, "train")
    if nproc > 1:
        assert argv[1:4] == ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}"], argv
    else:
        assert "torch.distributed.run" not in argv
    assert "global batch 64 = micro 4 x accumulation" in out and f"x {nproc} process(es)" in out


def test_multi_node_hardware_reaches_the_launcher(tmp_path):
    out = dry(tmp_path, "hardware=multi_node", "launcher=torchrun", f"output_dir={tmp_path / 'shared'}")
    argv = argv_of(out, "train")
    assert "--nproc_per_node=8" in argv and "--nnodes=2" in argv
    assert "x 16 process(es)" in out  # the ZeRO shards the planner sized: 16 ranks


@pytest.mark.parametrize(
    "overrides,words",
    [
        (["hardware=single_gpu", "launcher.nproc_per_node=2"], ["launcher.nproc_per_node=2", "1 GPU(s) per node"]),
        (["hardware=multi_node", "launcher=torchrun", "launcher.nnodes=1"], ["launcher.nnodes=1", "describes 2 nodes"]),
        (
            ["hardware=a100_80g_x8", "launcher=slurm", "launcher.gpus_per_node=0"],
            ["launcher.gpus_per_node=0", "0 GPU(s) per node for 8 GPU process(es)"],
        ),
        (["hardware=auto", "launcher=slurm"], ["hardware='auto'", "not the slurm nodes"]),
        (["hardware=auto", "launcher=k8s"], ["hardware='auto'", "not the k8s nodes"]),
        (["hardware=single_gpu"], ["hardware='single_gpu'", "this machine has 0 visible GPU(s)"]),
    ],
)
def test_layouts_that_cannot_work_are_refused(tmp_path, overrides, words):
    line = refused(tmp_path, *overrides)
    for w in words:
        assert w in line, line


def test_gpu_hardware_detected_by_nvidia_smi(tmp_path):
    """hardware=auto with 4 GPUs visible: 4 processes, bf16 (compute capability 8.0), CUDA_VISIBLE_DEVICES as the
    user set it (not renumbered)."""
    env = fake_nvidia_smi(tmp_path, 4)
    out = dry(tmp_path, "hardware=auto", env=env)
    assert "--nproc_per_node=4" in argv_of(out, "train")
    cfg = subprocess.run(
        [PY, str(REPO / "train.py"), "hardware=auto", "--cfg", "job", "--resolve"],
        cwd=REPO,
        env=user_env(**env),
        capture_output=True,
        text=True,
    ).stdout
    assert "precision: auto" in cfg  # composed; detection happens at validation (the dry run above)
    mine = dry(tmp_path, "hardware=auto", env={**env, "CUDA_VISIBLE_DEVICES": "2,3"})
    assert "--nproc_per_node=2" in argv_of(mine, "train")


def test_local_launcher_keeps_the_users_visible_devices(monkeypatch, tmp_path):
    """The user's CUDA_VISIBLE_DEVICES (indices, MIG UUIDs) is never renumbered: a step takes the first of them."""
    from finetune.launchers.local import job_devices

    cfg = _compose_gpu("hardware=single_gpu")
    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path, 4)["PATH"])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    cfg.launcher.nproc_per_node = 2
    assert job_devices(cfg, 2) == "0,1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert job_devices(cfg, 1) == "3"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-1f2e,MIG-9a8b")
    assert job_devices(cfg, 2) == "MIG-1f2e,MIG-9a8b"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,6,7")
    assert job_devices(cfg, 2) == "5,6"


def _compose_gpu(*overrides):
    from hydra import compose, initialize_config_dir

    from finetune.cli import setup

    setup()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        return compose("config", overrides=list(overrides))


@pytest.mark.slow
def test_parallel_sweep_jobs_get_their_own_gpus(tmp_path):
    """hydra/launcher=parallel on a stand-in 2-GPU machine: the two jobs that run at once get GPU 0 and GPU 1 (each
    its own slot, shown by the dry run), and a sweep asking for more GPUs than are visible is refused in one line
    before any job starts."""
    env = fake_nvidia_smi(tmp_path, 2)
    sweep = ["-m", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2", "hardware=single_gpu", "lora_r=4,8"]
    proc, _ = run_train(*sweep, "dry_run=true", outputs=tmp_path / "ok", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    devices = sorted(set(re.findall(r'"CUDA_VISIBLE_DEVICES": "([^"]*)"', proc.stdout)))
    assert devices == ["0", "1"], proc.stdout[-3000:]
    proc, _ = run_train(
        *sweep[:2], "hydra.launcher.n_jobs=3", *sweep[3:4], "lora_r=4,8,16", outputs=tmp_path / "no", env=env
    )
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and lines == [
        "error: hydra.launcher.n_jobs=3: 3 jobs at once x 1 GPU(s) each = 3 GPUs, but 2 are visible (nvidia-smi); "
        "lower hydra.launcher.n_jobs to 2 or the processes per job"
    ], proc.stderr
    assert not (tmp_path / "no").exists()


def test_gpu_slots_are_exclusive_while_jobs_run(tmp_path):
    """Slots are flocks: two jobs alive at once never hold the same one, and a finished job's slot is free again."""
    import multiprocessing as mp

    from finetune.launchers import slots

    ctx = mp.get_context("spawn")
    q, hold = ctx.Queue(), ctx.Event()
    p = ctx.Process(target=_hold_slot, args=(str(tmp_path), q, hold))
    p.start()
    try:
        assert q.get(timeout=60) == 0  # the other job took slot 0
        assert slots.claim(tmp_path, 2, 0, dry_run=False).index == 1  # job 0 again (launch order) gets slot 1
        assert slots.devices_of(slots.current(), ["0", "1"], 1) == ["1"]
    finally:
        hold.set()
        p.join(30)
        slots.release()
    assert slots.claim(tmp_path, 2, 1, dry_run=False).index == 0  # freed when that job's process ended
    slots.release()


def _hold_slot(folder, q, hold):
    from finetune.launchers import slots

    q.put(slots.claim(Path(folder), 2, 1, dry_run=False).index)
    hold.wait(60)


# ------------------------------------------------------------------------------------------- Slurm and k8s


def plan_file(out: str, name: str) -> str:
    """A file of the plan, as the dry run prints it."""
    return re.split(r"\n--- |\ndry run: ", out.split(f"--- {name}\n", 1)[1], maxsplit=1)[0]


def sbatch(out: str, step: str = "train") -> str:
    return plan_file(out, f"slurm/{step}.sbatch")


def test_slurm_job_asks_for_the_hardwares_gpus_cpus_and_memory(tmp_path):
    script = sbatch(dry(tmp_path, "launcher=slurm", "hardware=a100_80g_x8", "launcher.partition=gpu"))
    for line in (
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=128",
        "#SBATCH --mem=921GB",
        "#SBATCH --nodes=1",
        "#SBATCH --partition=gpu",
    ):
        assert line in script, script
    cpu = sbatch(dry(tmp_path, "launcher=slurm"))
    assert "--gpus-per-node" not in cpu and "#SBATCH --cpus-per-task=2" in cpu and "#SBATCH --mem=4GB" in cpu
    two = sbatch(dry(tmp_path, "launcher=slurm", "hardware=multi_node", f"output_dir={tmp_path / 'r'}"))
    assert "#SBATCH --nodes=2" in two and "#SBATCH --gpus-per-node=8" in two


def test_k8s_pod_asks_for_the_hardwares_gpus(tmp_path):
    import yaml

    out = dry(tmp_path, "launcher=k8s", "hardware=a100_80g_x8")
    manifest = yaml.safe_load(plan_file(out, "k8s/train.yaml"))
    c = manifest["spec"]["template"]["spec"]["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "8" and c["resources"]["requests"]["cpu"] == "128"
    assert c["command"][1:4] == ["-m", "torch.distributed.run", "--nproc_per_node=8"]


def test_slurm_sweep_launcher_asks_for_the_hardwares_gpus():
    from hydra import compose, initialize_config_dir

    from finetune.cli import setup

    setup()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        cfg = compose(
            "config", overrides=["hydra/launcher=slurm_sweep", "hardware=a100_80g_x8"], return_hydra_config=True
        )
    assert cfg.hydra.launcher.gpus_per_node == 8 and cfg.hydra.launcher.cpus_per_task == 128


# ------------------------------------------------------------------------------------------- alpacalora


def _alpacalora_cfg(*overrides) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from finetune.cli import setup

    setup()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        cfg = compose("config", overrides=list(overrides))
    c = OmegaConf.to_container(cfg, resolve=True)
    c["_run_dir"] = "/tmp/run"
    return c


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_alpacalora_mixed_precision_arguments_for_a_gpu(precision, tmp_path):
    """fp16 reaches TrainingArguments (autocast + loss scaling), not only bf16; with DeepSpeed the same flag fills its
    fp16/bf16 "auto" block. Built on this CPU for GPU hardware."""
    import transformers
    from transformers import TrainingArguments

    from finetune.recipes.alpacalora import training_arguments

    cfg = _alpacalora_cfg("hardware=single_gpu", f"hardware.precision={precision}")
    kw = training_arguments(cfg, world=1, ds_config=None, has_eval=True)
    assert kw["fp16"] is (precision == "fp16") and kw["bf16"] is (precision == "bf16") and kw["use_cpu"] is False
    ds = tmp_path / "ds.json"
    ds.write_text(
        json.dumps(
            {
                "train_batch_size": "auto",
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
                "fp16": {"enabled": "auto"},
                "bf16": {"enabled": "auto"},
                "zero_optimization": {"stage": 2},
            }
        )
    )
    kw = training_arguments(cfg, world=1, ds_config=str(ds), has_eval=True)
    real = transformers.training_args.is_torch_bf16_gpu_available
    transformers.training_args.is_torch_bf16_gpu_available = lambda *a, **k: True  # no GPU here to ask
    try:
        args = TrainingArguments(**{**kw, "output_dir": str(tmp_path)})
    finally:
        transformers.training_args.is_torch_bf16_gpu_available = real
    assert args.hf_deepspeed_config.config[precision]["enabled"] is True


def test_alpacalora_fp16_freeze_forward_needs_autocast():
    """Why fp16 must reach the Trainer: a frozen fp16 layer feeding trainable fp32 weights fails without autocast
    and runs under it (the call the GPU path makes, on CPU tensors)."""
    import torch

    frozen, trainable = torch.nn.Linear(8, 8).half(), torch.nn.Linear(8, 8)
    x = torch.randn(2, 8).half()
    with pytest.raises(RuntimeError, match="same dtype"):
        trainable(frozen(x))
    with torch.autocast("cpu", dtype=torch.float16):
        assert trainable(frozen(x)).dtype == torch.float16


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["backend.attn_implementation=flash_attention_2", "hardware=single_gpu"], "backend.attn_implementation"),
        (["backend=llamafactory", "+backend.extra.flash_attn=fa2", "hardware=single_gpu"], "backend.extra.flash_attn"),
    ],
)
def test_flash_attention_refused_unless_installed(tmp_path, overrides, key):
    line = refused(tmp_path, *overrides, "dry_run=true")
    assert line.startswith(f"error: {key}=") and "flash-attn package is not installed" in line
    # with flash-attn 2.7.0 installed (a stand-in package on the path) the same plan is accepted
    fake = tmp_path / "site"
    (fake / "flash_attn").mkdir(parents=True)
    (fake / "flash_attn" / "__init__.py").write_text("__version__ = '2.7.0'\n")
    (fake / "flash_attn-2.7.0.dist-info").mkdir()
    (fake / "flash_attn-2.7.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: flash-attn\nVersion: 2.7.0\n"
    )
    dry(tmp_path / "ok", *overrides, env={"PYTHONPATH": str(fake)})


def test_a_gpu_job_that_sees_no_gpu_fails(tmp_path):
    """GPU hardware where the job got no GPU (a node, a pod): the worker stops with one line, never trains on CPU."""
    from finetune.recipes.common import require_device

    assert require_device({"device": "cpu"}) == "cpu"
    with pytest.raises(SystemExit, match="hardware.device=cuda, but this process sees no CUDA GPU"):
        require_device({"device": "cuda"})


# ------------------------------------------------------------------------------------ LLaMA-Factory, FlagEmbedding


def test_llamafactory_deepspeed_on_one_gpu_forces_torchrun(tmp_path):
    out = dry(tmp_path, "backend=llamafactory", "hardware=single_gpu", "hardware.deepspeed_stage=2")
    assert env_of(out, "train")["FORCE_TORCHRUN"] == "1"
    assert '"--device", "cuda"' in out  # the worker checks the job's GPU


def test_flagembedding_deepspeed_config_has_numbers_and_gathers_zero3_weights(tmp_path):
    out = dry(tmp_path, "backend=flagembedding", "hardware.deepspeed_stage=3")
    ds = json.loads(plan_file(out, "ds_config.json"))
    zero = ds["zero_optimization"]
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    for k in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
        assert isinstance(zero[k], int) and zero[k] > 0, (k, zero[k])


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 3])
def test_flagembedding_deepspeed_one_process_trains_and_saves_full_weights(tmp_path, stage):
    """One process under DeepSpeed (no torchrun): no MPI discovery; ZeRO-3 saves the gathered weights, not the
    empty partitions."""
    from safetensors.torch import load_file

    proc, run = run_train(
        "backend=flagembedding",
        f"hardware.deepspeed_stage={stage}",
        "backend.query_max_len=32",
        "backend.passage_max_len=32",
        "backend.train_group_size=4",
        "max_steps=3",
        "batch_size=4",
        "micro_batch_size=4",
        "gradient_checkpointing=false",
        "save_steps=0",
        "backend.eval=false",
        outputs=tmp_path,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tensors = load_file(str(run / "embedder" / "model.safetensors"))
    assert len(tensors) == 39 and all(t.numel() > 0 for t in tensors.values())


# ------------------------------------------------------------------------------------------- Collie


def test_collie_reduce_device_follows_the_backend(monkeypatch):
    from finetune.recipes.collie import reduce_device

    class Dist:
        def __init__(self, backend):
            self.backend = backend

        def is_initialized(self):
            return self.backend is not None

        def get_backend(self):
            return self.backend

    import torch

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert reduce_device(Dist(None)) == "cpu" and reduce_device(Dist("gloo")) == "cpu"
    assert reduce_device(Dist("nccl")) == "cuda:3"


def test_collie_uses_its_cuda_lock_for_gpu_hardware(tmp_path):
    out = dry(tmp_path, "backend=collie", "hardware=single_gpu", f"backend.venv={tmp_path / 'collie-venv'}")
    argv = argv_of(out, "setup_collie")
    assert argv[-1] == "--cuda"
    gpu_env = env_of(out, "collie_train")
    assert gpu_env["CUDA_VISIBLE_DEVICES"] == "0" and "DS_ACCELERATOR" not in gpu_env  # the job's GPU
    cpu = dry(tmp_path / "cpu", "backend=collie")
    assert (
        env_of(cpu, "collie_train")["CUDA_VISIBLE_DEVICES"] == ""
        and env_of(cpu, "collie_train")["DS_ACCELERATOR"] == "cpu"
    )
    lock = subprocess.run(
        ["bash", str(REPO / "scripts" / "setup_collie_env.sh"), "--print-lock", "--cuda"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert lock == "requirements-collie-cuda.lock"


@pytest.mark.slow
def test_collie_cuda_lock_pins_everything_pypis_torch_requires(tmp_path):
    """The CUDA build of torch on PyPI (its metadata, no download): every Linux requirement is pinned in
    requirements-collie-cuda.lock (installed with --no-deps, a missing one would break `import torch`)."""
    report = tmp_path / "r.json"
    pin = next(
        ln for ln in (REPO / "requirements-collie-cuda.lock").read_text().splitlines() if ln.startswith("torch==")
    )
    proc = subprocess.run(
        [
            PY,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            "--report",
            str(report),
            "--only-binary=:all:",
            "--index-url",
            "https://pypi.org/simple",
            pin,
        ],
        env=user_env(PIP_CONFIG_FILE="/dev/null", PIP_FIND_LINKS=""),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0 and "Could not" in proc.stderr and os.environ.get("CI", "").lower() != "true":
        pytest.skip(f"PyPI not reachable: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731
    locked = {
        norm(ln.split("==")[0]): ln.split("==")[1]
        for ln in (REPO / "requirements-collie-cuda.lock").read_text().splitlines()
        if "==" in ln
    }
    resolved = {
        norm(i["metadata"]["name"]): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]
    }
    missing = {n: v for n, v in resolved.items() if n not in locked}
    assert not missing, f"PyPI's torch needs packages the CUDA lock does not pin: {missing}"


def test_collie_cpu_patches_follow_the_configured_device():
    """In Collie's environment: device=cpu always patches (a CPU run on a GPU machine stays on the CPU); device=cuda
    never patches and stops when no GPU is seen (here: none)."""
    venv = REPO / ".venv-collie" / "bin" / "python"
    if not venv.exists():
        pytest.skip("Collie's environment is not built (scripts/setup_collie_env.sh)")
    code = (
        "import sys; from finetune.compat import collie as p\n"
        "print(len(p.apply('cpu')))\n"
        "p.APPLIED.clear()\n"
        "p.apply('cuda')\n"
    )
    proc = subprocess.run(
        [str(venv), "-c", code],
        cwd=REPO,
        env=user_env(PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.stdout.strip().splitlines()[-1] == "6", proc.stdout + proc.stderr
    assert proc.returncode == 1 and "hardware.device=cuda, but Collie's torch" in proc.stderr


# ------------------------------------------------------------------------------------------- on a real GPU


@pytest.mark.gpu
def test_gpu_smoke_matrix(tmp_path):
    """On a machine with GPUs: the one-shot smoke matrix runs and every case passes."""
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_smoke.sh"), "--out", str(tmp_path / "smoke.jsonl")],
        cwd=REPO,
        env=user_env(),
        capture_output=True,
        text=True,
        timeout=3600,
    )
    rows = [json.loads(ln) for ln in (tmp_path / "smoke.jsonl").read_text().splitlines()]
    assert proc.returncode == 0 and rows and all(r["exit_code"] == 0 for r in rows), proc.stdout[-3000:]


@pytest.mark.slow
def test_gpu_smoke_dry_run_prints_every_case_and_each_plans_on_gpus(tmp_path):
    """scripts/gpu_smoke.sh --dry-run on this CPU prints the matrix; with 4 GPUs made visible (a stand-in
    nvidia-smi) every case's command validates and plans (as a dry run) on them."""
    env = fake_nvidia_smi(tmp_path, 4)
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_smoke.sh"), "--dry-run", "--out", str(tmp_path / "smoke" / "smoke.jsonl")],
        cwd=REPO,
        env=user_env(**env),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = dict(ln.split(": ", 1) for ln in proc.stdout.splitlines())
    expected = {
        "alpacalora_lora_bf16",
        "alpacalora_zero2",
        "alpacalora_zero3_full",
        "alpacalora_zero2_offload",
        "alpacalora_fp16",
        "alpacalora_qlora",
        "llamafactory_lora",
        "llamafactory_zero2",
        "flagembedding",
        "collie",
        "auto_explain",
        "estimator",
    }
    assert set(lines) == expected
    for name, cmd in lines.items():
        argv = cmd.split()
        if "dry_run=true" not in argv:
            argv.append("dry_run=true")
        if name == "collie":
            argv.append(f"backend.venv={tmp_path / 'collie-cuda-venv'}")  # built by the run's first step
        run = subprocess.run(argv, cwd=REPO, env=user_env(**env), capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, f"{name}: {run.stderr[-2000:]}"
        if name not in ("estimator", "auto_explain"):  # 4 processes: torchrun's, or LLaMA-Factory's own
            assert "--nproc_per_node=4" in run.stdout or '"NPROC_PER_NODE": "4"' in run.stdout, name
    assert not (tmp_path / "smoke").exists()  # a dry run writes nothing


def test_a_slurm_array_sweep_over_hardware_is_refused(tmp_path):
    line = refused(tmp_path / "s", "hydra/launcher=slurm_sweep", "hardware=single_gpu,a100_80g_x8", "-m")
    assert line.startswith("error: hardware='single_gpu,a100_80g_x8': hydra/launcher=slurm_sweep asks Slurm for one")
