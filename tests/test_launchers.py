"""Launchers: local / torchrun (multi-process, multi-node join), Slurm through submitit on a real cluster, k8s
manifests.

Tiers:
- fast: argv/env of each launcher, refusals (exit 2, one line), k8s manifests parsed as YAML, run_process.
- slow: real processes through torchrun (dummy backend), a two-node rendezvous on localhost training the tiny Llama.
- slurm (+slow): a single-node Slurm cluster with accounting (scripts/slurm_cluster.py) started by a module
  fixture; a run, a failing run, a cancelled run and a 2-job sweep go through it. Skipped with the reason when
  slurm-wlm/slurmdbd/mariadb-server are not installed or we are not root.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import PY, REPO, TINY_JOB, read_json, run_train, start_train, user_env

# ------------------------------------------------------------------------------------------------ helpers


CONF = REPO / "conf"


def _compose(*overrides):
    from hydra import compose, initialize_config_dir

    from finetune.cli import setup

    setup()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose("config", overrides=["backend=dummy", *overrides])


def _refusal(*overrides) -> str:
    """The ConfigError message for a config (composed and validated in-process: fast)."""
    from finetune.errors import ConfigError
    from finetune.run import prepare

    with pytest.raises(ConfigError) as e:
        prepare(_compose(*overrides), list(overrides))
    return str(e.value)


def _dry(capsys, *overrides):
    """The dry run's plan text (in-process; the driver writes nothing)."""
    from finetune.run import run

    capsys.readouterr()
    assert run(_compose("dry_run=true", *overrides)) is None
    return capsys.readouterr().out


def _argv_lines(out):
    """argv of the dummy backend's training step (a fresh checkout also plans a build_model step first)."""
    argvs = [json.loads(ln.split("argv: ", 1)[1]) for ln in out.splitlines() if ln.strip().startswith("argv: ")]
    return [a for a in argvs if "finetune.recipes.dummy" in a]


# ------------------------------------------------------------------------------------------------ fast


def test_local_and_torchrun_argv(capsys, tmp_path):
    """local: plain argv for one process, torchrun for nproc>1; launcher=torchrun: --standalone or the fixed port."""
    (one,) = _argv_lines(_dry(capsys, "launcher=local"))
    assert "torch.distributed.run" not in one
    (two,) = _argv_lines(_dry(capsys, "launcher=local", "launcher.nproc_per_node=2"))
    i = two.index("torch.distributed.run")
    assert two[i + 1 : i + 3] == ["--nproc_per_node=2", "--nnodes=1"] and any(
        a.startswith("--master_port=") for a in two
    )
    (tr,) = _argv_lines(_dry(capsys, "launcher=torchrun", "launcher.nproc_per_node=1"))
    assert "--standalone" in tr
    (mn,) = _argv_lines(
        _dry(
            capsys, "launcher=torchrun", "launcher.nnodes=2", "launcher.master_port=29511", f"output_dir={tmp_path}/mn"
        )
    )
    for a in ("--nnodes=2", "--node_rank=0", "--master_addr=127.0.0.1", "--master_port=29511"):
        assert a in mn, mn
    assert not (tmp_path / "mn").exists()


def test_node_rank_refused_in_one_line_exit_2(tmp_path):
    proc, run = run_train(
        "backend=dummy",
        "launcher=torchrun",
        "launcher.nnodes=2",
        "launcher.node_rank=1",
        f"output_dir={tmp_path}/x",
        outputs=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2 and run is None and not (tmp_path / "x").exists()
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "launcher.node_rank=1" in lines[0] and "finetune.launchers.torchrun join" in lines[0], (
        proc.stderr
    )


@pytest.mark.parametrize(
    "overrides,words",
    [
        (("launcher=torchrun", "launcher.nnodes=2"), ("output_dir", "join")),
        (("launcher=local", "launcher.nnodes=2"), ("launcher.nnodes", "launcher=torchrun")),
        (("launcher=torchrun", "launcher.nnodes=2", f"output_dir={REPO / 'conf'}"), ("output_dir", "not empty")),
        (("launcher=torchrun", "launcher.rdzv_backend=etcd"), ("launcher.rdzv_backend", "static")),
        (
            ("launcher=slurm", "+launcher.additional_parameters.partition=gpu"),
            ("launcher.additional_parameters.partition", "launcher.partition"),
        ),
        (("launcher=slurm", "launcher.cluster=aws"), ("launcher.cluster",)),
        (("launcher=slurm", "launcher.node_rank=1", "launcher.nnodes=2"), ("Slurm assigns",)),
        (("launcher=k8s",), ("launcher.apply", "dry_run=true")),
        (("launcher=k8s", "launcher.namespace=Bad_NS", "dry_run=true"), ("launcher.namespace",)),
    ],
)
def test_launcher_refusals(overrides, words):
    msg = _refusal(*overrides)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg


def test_k8s_manifests_are_valid(capsys):
    """One node: a batch/v1 Job; two nodes: a PyTorchJob whose torchrun takes rank and master from the operator."""
    out = _dry(
        capsys,
        "launcher=k8s",
        "launcher.image=registry.example/finetune:1.0",
        "launcher.pvc=work",
        "launcher.cpus_per_task=8",
        "launcher.mem_gb=32",
        "launcher.gpus_per_node=2",
        "model=tiny_llama_30m",
        "launcher.nproc_per_node=2",
        "output_dir=/workspace/runs/r1",
    )
    text = out.split("--- k8s/dummy_train.yaml\n", 1)[1].split("\ndry run:", 1)[0]
    job = yaml.safe_load(text)
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == "registry.example/finetune:1.0"
    assert c["command"][1:6] == ["-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1", "--standalone"]
    assert c["command"][-2:] == ["--config", "/workspace/runs/r1/resolved_config.json"]
    assert c["resources"]["limits"] == {"cpu": "8", "memory": "32768Mi", "nvidia.com/gpu": "2"}
    assert {"name": "OMP_NUM_THREADS", "value": "4"} in c["env"]
    vols = job["spec"]["template"]["spec"]["volumes"]
    assert vols[0]["persistentVolumeClaim"]["claimName"] == "work"
    assert job["spec"]["activeDeadlineSeconds"] == 3600 and job["spec"]["backoffLimit"] == 0

    out = _dry(
        capsys,
        "launcher=k8s",
        "launcher.nnodes=3",
        "launcher.nproc_per_node=2",
        "batch_size=48",
        "output_dir=/workspace/r2",
    )
    pj = yaml.safe_load(out.split("--- k8s/dummy_train.yaml\n", 1)[1].split("\ndry run:", 1)[0])
    assert pj["apiVersion"] == "kubeflow.org/v1" and pj["kind"] == "PyTorchJob"
    specs = pj["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] == 2
    cmd = specs["Worker"]["template"]["spec"]["containers"][0]["command"]
    assert "--nnodes=3" in cmd and "--node_rank=$(RANK)" in cmd and "--master_addr=$(MASTER_ADDR)" in cmd


def test_slurm_dry_run_shows_node_command(capsys):
    (a,) = _argv_lines(_dry(capsys, "launcher=slurm", "launcher.nnodes=2", "launcher.nproc_per_node=2"))
    assert "--nnodes=2" in a and "--node_rank=0" in a and any("first host of the job" in x for x in a)


def test_environment_set_per_launcher(monkeypatch):
    """Threads: what the user typed (launcher.omp_num_threads, backend.torch_threads), else the OMP_NUM_THREADS they
    exported, else the CPUs shared out between the step's processes (Slurm/k8s: cpus_per_task); the same on every
    launcher, for every model size. Repo on PYTHONPATH, GPUs pinned to the ranks asked for (local/torchrun); on
    Slurm CUDA_VISIBLE_DEVICES is left to Slurm's allocation."""
    from finetune.launchers import k8s, local, slurm
    from finetune.plan import Step

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cpus = len(os.sched_getaffinity(0))
    step = Step(name="train", argv=[sys.executable, "-m", "x"], distributed="torchrun")
    launchers = {"local": local, "slurm": slurm, "k8s": k8s}
    for launcher, model in (("local", "tiny_llama"), ("slurm", "tiny_bert"), ("k8s", "tiny_llama_30m")):
        tcfg = _compose(f"launcher={launcher}", f"model={model}", "launcher.cpus_per_task=16")
        expect = cpus if launcher == "local" else 16
        assert launchers[launcher].env(step, tcfg)["OMP_NUM_THREADS"] == str(expect)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # a user on a shared machine
        assert launchers[launcher].env(step, tcfg)["OMP_NUM_THREADS"] == ("1" if launcher != "k8s" else "16")
        tcfg.launcher.omp_num_threads = 2  # typed for this run: wins over the environment
        assert launchers[launcher].env(step, tcfg)["OMP_NUM_THREADS"] == "2"
        monkeypatch.delenv("OMP_NUM_THREADS")
    cfg = _compose("launcher=local", "launcher.nproc_per_node=2", "model=tiny_llama_30m")
    e = local.env(step, cfg)
    assert e["OMP_NUM_THREADS"] == str(max(1, cpus // 2))
    assert local.threads(step, cfg) == (max(1, cpus // 2), f"{cpus} CPU(s) for this step / 2 processes")
    assert str(REPO) in e["PYTHONPATH"].split(os.pathsep) and e["TOKENIZERS_PARALLELISM"] == "false"
    assert "CUDA_VISIBLE_DEVICES" not in e  # CPU hardware: nothing to pin
    cfg.hardware.device, cfg.hardware.gpus_per_node = "cuda", 8
    assert local.env(step, cfg)["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert local.env(Step(name="merge", argv=["python"]), cfg)["CUDA_VISIBLE_DEVICES"] == "0"
    cfg.launcher.omp_num_threads = 3
    assert local.env(step, cfg)["OMP_NUM_THREADS"] == "3"
    scfg = _compose("launcher=slurm", "launcher.nproc_per_node=2", "launcher.cpus_per_task=16", "model=tiny_llama_30m")
    se = slurm.env(step, scfg)
    assert se["OMP_NUM_THREADS"] == "8" and "CUDA_VISIBLE_DEVICES" not in se
    acfg = _compose("backend=alpacalora", "backend.torch_threads=1")
    assert local.threads(Step(name="train", argv=["python"]), acfg) == (1, "backend.torch_threads")


def test_threads_do_not_follow_the_load(tmp_path, monkeypatch):
    """A run started while other processes keep every core busy gets the same threads as one on an idle machine
    (the product never reads the load average); the step's log says how many and why."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    busy = [subprocess.Popen([PY, "-c", "import time\nt=time.time()\nwhile time.time()-t<60: pass"]) for _ in range(2)]
    try:
        time.sleep(1)
        from finetune.launchers import local
        from finetune.plan import Step

        cfg = _compose("launcher=local", "model=tiny_llama_30m")
        n, why = local.threads(Step(name="train", argv=["python"]), cfg)
        cpus = len(os.sched_getaffinity(0))
        assert (n, why) == (cpus, f"{cpus} CPU(s) for this step")
        step = Step(name="s", argv=[PY, "-c", "print(1)"])
        assert local.launch(step, step.argv, {}, tmp_path, cfg=cfg).ok
        head = (tmp_path / step.log).read_text().splitlines()[:3]
        assert head[1] == f"[finetune] threads: {n} per process ({why})", head
    finally:
        for p in busy:
            p.kill()
            p.wait()


def test_run_process_exit_codes_and_timeout(tmp_path):
    from finetune.launchers.process import run_process

    ok = run_process("ok", [PY, "-c", "print('hello')"], {}, str(tmp_path), tmp_path / "ok.log", echo=False)
    assert ok.ok and ok.exit_code == 0 and ok.tail == ["hello"] and "hello" in (tmp_path / "ok.log").read_text()
    bad = run_process(
        "bad", [PY, "-c", "import sys; print('boom'); sys.exit(5)"], {}, str(tmp_path), tmp_path / "bad.log", echo=False
    )
    assert bad.status == "failed" and bad.exit_code == 5 and "code 5" in bad.reason()
    t0 = time.monotonic()
    slow = run_process(
        "slow",
        [PY, "-c", "import time; time.sleep(60)"],
        {},
        str(tmp_path),
        tmp_path / "s.log",
        timeout_s=1,
        echo=False,
    )
    assert slow.status == "timeout" and time.monotonic() - t0 < 30
    missing = run_process("missing", ["/no/such/binary"], {}, str(tmp_path), tmp_path / "m.log", echo=False)
    assert missing.status == "failed" and missing.exit_code == 127


def test_join_refuses_a_folder_without_plan_or_a_finished_run(tmp_path):
    from finetune.launchers.torchrun import join

    assert join(tmp_path, 1, wait_s=0.5) == 2
    (tmp_path / "manifest.json").write_text(json.dumps({"status": "completed", "plan": {"steps": []}}))
    assert join(tmp_path, 1, wait_s=0.5) == 2


# ------------------------------------------------------------------------------------------------ slow: torchrun


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    proc, run = run_train(
        "backend=dummy", "launcher=torchrun", "launcher.nproc_per_node=2", outputs=tmp_path, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (run / "logs" / "dummy_train.log").read_text()
    assert "rank 0" in log and "rank 1" in log and "torch.distributed.run" in log
    m = read_json(run / "manifest.json")
    assert m["status"] == "completed" and m["steps"][-1]["exit_code"] == 0
    assert read_json(run / "metrics.json")["train_loss"] < read_json(run / "metrics.json")["first_train_loss"]


# a tiny LoRA job that two ranks (two nodes, or two processes of a Slurm job) share: 6 steps of 8 rows
TWO_RANK_JOB = (
    "backend=alpacalora",
    "max_steps=6",
    "batch_size=8",
    "micro_batch_size=4",
    "logging_steps=1",
    "val_set_size=8",
    "learning_rate=3e-3",
    "merge=false",
)


def _two_nodes(tmp_path, *overrides, timeout=600):
    """Node 0 through train.py, node 1 through the join command, both on localhost sharing one run folder."""
    run_dir = tmp_path / "shared-run"
    env = user_env()
    node0 = start_train(
        "launcher=torchrun",
        "launcher.nnodes=2",
        "launcher.nproc_per_node=1",
        f"output_dir={run_dir}",
        *overrides,
        env=env,
        stderr=subprocess.STDOUT,
    )
    node1 = subprocess.run(
        [PY, "-m", "finetune.launchers.torchrun", "join", str(run_dir), "--node-rank", "1", "--wait-min", "5"],
        cwd=str(REPO),
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    out0, _ = node0.communicate(timeout=timeout)
    assert node0.returncode == 0, out0[-4000:]
    assert node1.returncode == 0, node1.stdout[-3000:] + node1.stderr[-3000:]
    node = read_json(run_dir / "nodes" / "node1.json")
    assert node["status"] == "completed" and node["steps"][0]["exit_code"] == 0
    assert "--node_rank=1" in node["steps"][0]["argv"] and "--nnodes=2" in node["steps"][0]["argv"]
    assert read_json(run_dir / "manifest.json")["status"] == "completed"
    return run_dir


@pytest.mark.slow
def test_two_nodes_on_localhost_dummy(tmp_path):
    run_dir = _two_nodes(tmp_path, "backend=dummy")
    assert "rank 1" in (run_dir / "logs" / "dummy_train.node1.log").read_text()
    assert "rank 0" in (run_dir / "logs" / "dummy_train.log").read_text()


@pytest.mark.slow
def test_two_nodes_train_tiny_llama_data_parallel(tmp_path, tiny_model):
    """The real thing: two torchrun agents (node_rank 0 and 1) rendezvous and train the tiny Llama with LoRA."""
    tiny_model("tiny_llama")
    run_dir = _two_nodes(tmp_path, *TWO_RANK_JOB)
    metrics = read_json(run_dir / "metrics.json")
    assert metrics["world_size"] == 2 and metrics["global_step"] == 6
    assert metrics["train_loss"] < metrics["first_train_loss"]
    assert (run_dir / "lazyllm_lora" / "adapter_config.json").exists()
    assert (run_dir / "logs" / "train.node1.log").exists()  # (merging is alpacalora's test; merge=false saves time)


@pytest.mark.slow
def test_submitit_job_body_without_slurm(tmp_path):
    """launcher=slurm launcher.cluster=local: the same submitit job body, run by submitit's local executor."""
    proc, run = run_train(
        "backend=dummy",
        "launcher=slurm",
        "launcher.cluster=local",
        "launcher.poll_s=0.5",
        outputs=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    step = read_json(run / "manifest.json")["steps"][-1]
    assert step["slurm_cluster"] == "local" and step["nodes"][0]["exit_code"] == 0
    assert read_json(run / "metrics.json")["train_loss"] == pytest.approx(2.0 / 3, abs=1e-3)


@pytest.mark.slow
def test_parallel_sweep_through_hydra_joblib(tmp_path):
    sweep = tmp_path / "sweep"
    proc, _ = run_train(
        "hydra/launcher=parallel",
        "backend=dummy",
        "backend.steps=2,3",
        f"hydra.sweep.dir={sweep}",
        outputs=tmp_path,
        multirun=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = sorted((read_json(p) for p in sweep.glob("*/result.json")), key=lambda r: r["metrics"]["steps"])
    assert [(r["status"], r["metrics"]["steps"]) for r in results] == [("completed", 2), ("completed", 3)]


# ------------------------------------------------------------------------------------------------ slurm


def _cluster_module():
    spec = importlib.util.spec_from_file_location("slurm_cluster", REPO / "scripts" / "slurm_cluster.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """A single-node Slurm cluster with accounting, for this module's slurm tests; stopped afterwards."""
    sc = _cluster_module()
    # on CI (CI=true) the cluster must come up: a skipped Slurm tier must not turn CI green
    unavailable = pytest.fail if os.environ.get("CI", "").lower() == "true" else pytest.skip
    missing = sc.missing_tools()
    if missing:
        unavailable(
            f"Slurm is not installed ({', '.join(missing)} missing): "
            "apt-get install -y slurm-wlm slurmdbd mariadb-server"
        )
    if os.geteuid() != 0:
        unavailable("the test Slurm cluster runs its daemons as root")
    base = Path(tempfile_short())
    try:
        env = sc.start(base, nodes=2)  # two slurmd on this machine: multi-node jobs are real
    except sc.ClusterError as e:
        sc.stop(base)
        unavailable(f"could not start a Slurm cluster: {e}")
    yield {"SLURM_CONF": env["SLURM_CONF"], "base": base}
    sc.stop(base)


def tempfile_short() -> str:
    """Unix socket paths are limited to 108 bytes: keep the cluster folder short."""
    import tempfile

    return tempfile.mkdtemp(prefix="slurm-", dir="/tmp")


def _slurm_run(tmp_path, cluster, *overrides):
    return run_train(
        "backend=dummy",
        "launcher=slurm",
        "launcher.poll_s=0.5",
        *overrides,
        outputs=tmp_path,
        env={"SLURM_CONF": cluster["SLURM_CONF"]},
        timeout=300,
    )


@pytest.mark.slow
@pytest.mark.slurm
def test_slurm_two_node_run_completes(tmp_path, slurm_cluster):
    """One Slurm job on 2 nodes: each node's task runs torchrun as node SLURM_NODEID of one rendezvous."""
    proc, run = _slurm_run(
        tmp_path, slurm_cluster, "launcher.nnodes=2", "launcher.nproc_per_node=1", "launcher.cpus_per_task=1"
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "RUNNING" in proc.stdout and "COMPLETED" in proc.stdout  # state changes were shown
    step = read_json(run / "manifest.json")["steps"][-1]
    assert step["slurm_state"] == "COMPLETED" and step["slurm_job_id"].isdigit()
    assert Path(step["slurm_stdout"]).exists() and Path(step["slurm_stderr"]).exists()
    assert [n["node"] for n in step["nodes"]] == [0, 1] and all(n["status"] == "completed" for n in step["nodes"])
    assert "--node_rank=1" in step["nodes"][1]["argv"] and "--nnodes=2" in step["nodes"][1]["argv"]
    assert "rank 0" in (run / "logs" / "dummy_train.log").read_text()
    assert "rank 1" in (run / "logs" / "dummy_train.node1.log").read_text()
    assert read_json(run / "result.json")["status"] == "completed"
    jobs = read_json(run / "slurm" / "jobs.json")
    assert jobs["dummy_train"]["slurm_job_id"] == step["slurm_job_id"]
    sacct = subprocess.run(
        ["sacct", "-n", "-X", "-j", step["slurm_job_id"], "-o", "State"],
        capture_output=True,
        text=True,
        env={**os.environ, "SLURM_CONF": slurm_cluster["SLURM_CONF"]},
    )
    assert sacct.stdout.split()[0] == "COMPLETED"


@pytest.mark.slow
@pytest.mark.slurm
def test_slurm_trains_tiny_llama(tmp_path, slurm_cluster, tiny_model):
    """A real training run as a Slurm job: LoRA on the tiny Llama, 2 ranks (torchrun inside the job), loss falls."""
    tiny_model("tiny_llama")
    proc, run = run_train(
        *TWO_RANK_JOB,
        "launcher=slurm",
        "launcher.poll_s=0.5",
        "launcher.nproc_per_node=2",
        outputs=tmp_path,
        env={"SLURM_CONF": slurm_cluster["SLURM_CONF"]},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = read_json(run / "manifest.json")
    assert [s["slurm_state"] for s in m["steps"] if "slurm_state" in s] == ["COMPLETED"] * len(m["plan"]["steps"])
    metrics = read_json(run / "metrics.json")
    assert metrics["global_step"] == 6 and metrics["world_size"] == 2
    assert metrics["train_loss"] < metrics["first_train_loss"]
    assert (run / "lazyllm_lora" / "adapter_config.json").exists()


@pytest.mark.slow
@pytest.mark.slurm
def test_slurm_failed_job_fails_the_run(tmp_path, slurm_cluster):
    proc, run = _slurm_run(tmp_path, slurm_cluster, "backend.fail=true")
    assert proc.returncode == 1
    assert "FAILED" in proc.stderr and "failing as asked" in proc.stderr  # state and log tail
    m = read_json(run / "manifest.json")
    assert m["status"] == "failed" and m["steps"][-1]["slurm_state"] == "FAILED"
    assert read_json(run / "result.json")["status"] == "failed"


@pytest.mark.slow
@pytest.mark.slurm
def test_slurm_cancelled_job_fails_the_run(tmp_path, slurm_cluster):
    env = user_env(SLURM_CONF=slurm_cluster["SLURM_CONF"])
    proc = start_train(
        "backend=dummy",
        "launcher=slurm",
        "launcher.poll_s=0.5",
        "backend.steps=400",
        "backend.sleep_s=0.25",
        "name=cancelme",
        f"output_dir={tmp_path / 'runs' / 'today' / 'cancelme'}",
        env=env,
    )
    job_id, deadline = None, time.monotonic() + 120
    while job_id is None and time.monotonic() < deadline:
        for f in tmp_path.glob("runs/*/*cancelme*/slurm/jobs.json"):
            info = json.loads(f.read_text())["dummy_train"]
            if info["slurm_state"] == "RUNNING":
                job_id = info["slurm_job_id"]
        time.sleep(0.5)
    assert job_id, "the job never ran"
    subprocess.run(["scancel", job_id], env=env, check=True)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 1, out[-2000:] + err[-2000:]
    assert "CANCELLED" in err
    (run,) = tmp_path.glob("runs/*/*cancelme*")
    assert read_json(run / "manifest.json")["steps"][-1]["slurm_state"].startswith("CANCELLED")


@pytest.mark.slow
@pytest.mark.slurm
def test_slurm_sweep_through_hydra_submitit(tmp_path, slurm_cluster):
    sweep = tmp_path / "sweep"
    proc, _ = run_train(
        "hydra/launcher=slurm_sweep",
        "backend=dummy",
        "backend.steps=2,4",
        f"hydra.sweep.dir={sweep}",
        outputs=tmp_path,
        env={"SLURM_CONF": slurm_cluster["SLURM_CONF"]},
        multirun=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = sorted((read_json(p) for p in sweep.glob("*/result.json")), key=lambda r: r["metrics"]["steps"])
    assert [r["status"] for r in results] == ["completed", "completed"]
    assert [r["metrics"]["steps"] for r in results] == [2, 4]
    assert list(sweep.glob(".submitit/*/*_log.out")), "no Slurm job logs"


REQUEUE_RUN = [*TINY_JOB, "save_steps=4", "merge=false"]


@pytest.mark.slow
@pytest.mark.slurm
def test_slurm_requeued_job_resumes_and_ends_like_an_uninterrupted_run(tmp_path, slurm_cluster):
    """A running Slurm job is requeued (`scontrol requeue`, what a preemption with PreemptMode=REQUEUE does): it leaves
    no result, Slurm reruns it, the rerun resumes from the last complete checkpoint, the run completes, and its loss
    curve equals an uninterrupted run's (the same steps, the same numbers)."""
    env = {**os.environ, "SLURM_CONF": slurm_cluster["SLURM_CONF"]}
    ref_proc, ref = run_train(*REQUEUE_RUN, outputs=tmp_path / "ref", timeout=600)
    assert ref_proc.returncode == 0, ref_proc.stderr[-3000:]
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [PY, str(REPO / "train.py"), *REQUEUE_RUN, "launcher=slurm", "launcher.poll_s=0.5", f"output_dir={out}"],
        cwd=str(REPO),
        env=user_env(SLURM_CONF=slurm_cluster["SLURM_CONF"]),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    marker = out / "checkpoints" / "checkpoint-4" / "FINETUNE_COMPLETE"
    deadline = time.monotonic() + 300
    while not marker.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert marker.exists(), "no complete checkpoint-4 before the job ended"
    job = read_json(out / "slurm" / "jobs.json")["train"]["slurm_job_id"]
    subprocess.run(["scontrol", "requeue", job], env=env, check=True, capture_output=True)
    # Slurm holds a requeued job back for a while (BeginTime); let it start again at once
    for _ in range(60):
        time.sleep(1)
        if (
            subprocess.run(
                ["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, capture_output=True
            ).returncode
            == 0
        ):
            break
    stdout, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, stdout[-4000:]
    assert "is requeued (restart 1" in stdout
    step = next(s for s in read_json(out / "manifest.json")["steps"] if s["name"] == "train")
    assert step["slurm_state"] == "COMPLETED" and step["slurm_restarts"] == 1 and step["nodes"][0]["restarts"] == 1
    log = (out / "logs" / "train.log").read_text()
    assert "resuming from" in log and "SIGTERM" in (Path(step["slurm_stdout"]).read_text() + log)

    def curve(run):
        rows = map(json.loads, (run / "history.jsonl").read_text().splitlines())
        return [(r["step"], r["loss"]) for r in rows if "loss" in r]

    assert curve(out) == curve(ref) and len(curve(ref)) == 12
