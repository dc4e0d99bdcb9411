"""flagembedding backend: exact plan (fast), refusals at compose time (exit 2, one line), and real CPU runs of the
embedder and the reranker on the tiny random BERT (slow): the loss falls, the saved model loads with
FlagEmbedding's FlagModel / FlagReranker and scores like the run's own evaluation, metrics.json carries
recall@k / MRR before and after training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import REPO, read_json, run_train
from hydra import compose, initialize_config_dir

from finetune.cli import setup
from finetune.interfaces import PlanContext

setup()

# small and fast on 2 busy cores: lengths 32, group 4, 2 epochs of 60 rows at batch 4 -> 30 steps
FAST = [
    "backend=flagembedding",
    "backend.query_max_len=32",
    "backend.passage_max_len=32",
    "backend.train_group_size=4",
    "num_epochs=2",
    "batch_size=4",
    "micro_batch_size=4",
    "gradient_checkpointing=false",
    "save_steps=0",
    "backend.eval_batch_size=128",
    "launcher.omp_num_threads=1",
]  # 1 thread: a 120k-parameter model gains nothing from 2, and loses 15x on busy cores
# no query instruction: a random model's mean pooling would be dominated by the shared instruction tokens
EMBED = FAST + [
    "learning_rate=1e-3",
    "backend.sentence_pooling_method=mean",
    "backend.temperature=0.1",
    "backend.query_instruction_for_retrieval=null",
]
# the reranker learns on the packaged pretrained MiniLM (a fresh 1-label head): on the tiny random BERT every
# (query, passage) pair gets the same [CLS] features and the loss stays at ln(group) for hundreds of steps
# eval_max_corpus=10: rank each query's own pos + 7 neg (160 pairs) instead of all 80 passages (1600 pairs)
RERANK = FAST + [
    "backend.task=reranker",
    "model=minilm",
    "learning_rate=1e-4",
    "backend.query_instruction_for_rerank=null",
    "backend.eval_max_corpus=10",
]


def _compose(overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        return compose("config", overrides=overrides)


def _plan(overrides, tmp_path):
    from finetune.backends import flagembedding as fe
    from finetune.run import prepare

    cfg = _compose(overrides)
    facts, _, _ = prepare(cfg, overrides)
    ctx = PlanContext(data=facts["data"], world_size=fe.world_size(cfg), run_dir=str(tmp_path))
    return cfg, fe.plan(cfg, tmp_path, ctx)


def _flags(argv):
    """--key value pairs of a FlagEmbedding command."""
    out, i = {}, 0
    while i < len(argv):
        if argv[i] == "--":  # the wrapper's arguments end here; FlagEmbedding's follow
            i += 1
        elif argv[i].startswith("--"):
            out[argv[i][2:]] = argv[i + 1]
            i += 2
        else:
            i += 1
    return out


# ------------------------------------------------------------------------------------------------ plan (fast)


def test_embedder_plan_reference_defaults(tmp_path):
    cfg, plan = _plan(["backend=flagembedding"], tmp_path)
    assert [s.name for s in plan.steps] == ["eval_before", "train", "eval_after"]
    train = plan.steps[1]
    assert train.distributed == "torchrun"
    # FlagEmbedding's own runner, wrapped for history.jsonl, tokens/s and complete checkpoints
    assert train.argv[1:5] == ["-m", "finetune.recipes.flagembedding", "--task", "embedder"]
    assert train.progress == "history.jsonl"
    f = _flags(train.argv)
    # the reference's embedder defaults (LazyLLM's FlagembeddingFinetune)
    assert f["train_group_size"] == "8" and f["query_max_len"] == "512" and f["passage_max_len"] == "512"
    assert f["pad_to_multiple_of"] == "8" and f["query_instruction_format"] == "{}{}"
    assert f["query_instruction_for_retrieval"] == "Represent this sentence for searching relevant passages: "
    assert f["learning_rate"] == "1e-05" and f["num_train_epochs"] == "1.0"
    assert f["per_device_train_batch_size"] == "2" and f["gradient_accumulation_steps"] == "1"
    assert f["dataloader_drop_last"] == "True" and f["warmup_ratio"] == "0.1" and f["weight_decay"] == "0.01"
    assert f["logging_steps"] == "1" and f["save_steps"] == "1000"
    assert f["temperature"] == "0.02" and f["sentence_pooling_method"] == "cls"
    assert f["normalize_embeddings"] == "True" and f["kd_loss_type"] == "kl_div"
    assert f["gradient_checkpointing"] == "True" and f["use_cpu"] == "True"
    # rejected by FlagEmbedding 1.4.2 + transformers 5.6, or impossible here: never passed
    for flag in ("overwrite_output_dir", "fp16", "negatives_cross_device", "deepspeed"):
        assert flag not in f, flag
    assert Path(f["model_name_or_path"]).is_absolute() and Path(f["train_data"]).is_absolute()
    assert f["output_dir"] == str(tmp_path / "embedder") and plan.outputs["model"] == f["output_dir"]
    assert train.env["TENSORBOARD_LOGGING_DIR"] == str(tmp_path / "tensorboard")
    assert any("negatives_cross_device" in n for n in plan.notes)


def test_reranker_plan_drops_embedder_only_flags(tmp_path):
    _, plan = _plan(
        ["backend=flagembedding", "backend.task=reranker", "backend.query_instruction_for_rerank=Q: "], tmp_path
    )
    train = plan.steps[1]
    assert train.argv[2:5] == ["finetune.recipes.flagembedding", "--task", "reranker"]
    f = _flags(train.argv)
    assert f["query_max_len"] == "256" and f["passage_max_len"] == "256"  # reference reranker lengths
    assert f["query_instruction_for_rerank"] == "Q: "
    embedder_only = "temperature sentence_pooling_method normalize_embeddings kd_loss_type negatives_cross_device"
    for flag in [*embedder_only.split(), "query_instruction_for_retrieval", "overwrite_output_dir"]:
        assert flag not in f, flag


def test_two_ranks_and_deepspeed(tmp_path):
    """World size 2: cross-device negatives on, accumulation split across ranks; DeepSpeed JSON from hardware."""
    _, plan = _plan(
        [
            "backend=flagembedding",
            "launcher.nproc_per_node=2",
            "batch_size=8",
            "micro_batch_size=2",
            "hardware.deepspeed_stage=2",
        ],
        tmp_path,
    )
    f = _flags(plan.steps[1].argv)
    assert f["negatives_cross_device"] == "True" and f["gradient_accumulation_steps"] == "2"
    assert f["deepspeed"] == str(tmp_path / "ds_config.json") and "use_cpu" not in f
    ds = json.loads(plan.files["ds_config.json"])
    assert ds["zero_optimization"]["stage"] == 2 and ds["train_micro_batch_size_per_gpu"] == "auto"


def test_experiment_uses_the_packaged_minilm():
    cfg = _compose(["experiment=embedding_finetune"])
    path = Path(cfg.model.path)
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file(), path
    assert json.loads((path / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"] is True
    assert cfg.backend.sentence_pooling_method == "mean"


def test_shipped_retrieval_set_is_deterministic(tmp_path):
    from finetune.tools.make_samples import make

    make(tmp_path)
    for part in ("train", "eval", "corpus"):
        name = f"tiny_embedding_{part}.jsonl"
        assert (tmp_path / name).read_bytes() == (REPO / "data" / "samples" / name).read_bytes(), name
    corpus = {json.loads(line)["id"] for line in (tmp_path / "tiny_embedding_corpus.jsonl").read_text().splitlines()}
    evals = [json.loads(line) for line in (tmp_path / "tiny_embedding_eval.jsonl").read_text().splitlines()]
    train = [json.loads(line) for line in (tmp_path / "tiny_embedding_train.jsonl").read_text().splitlines()]
    assert all(r["pos_id"] in corpus for r in evals)
    assert not {r["pos"][0] for r in evals} & {p for r in train for p in r["pos"] + r["neg"]}  # held out


# ------------------------------------------------------------------------------------------------ refusals


def _bad(tmp_path, rows):
    p = tmp_path / "bad.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


GOOD = {"query": "q", "pos": ["a"], "neg": ["b", "c"]}


@pytest.mark.parametrize(
    "rows,extra,expect",
    [
        (
            [GOOD, GOOD, {"query": "q", "pos": ["a"], "neg": []}],
            [],
            "bad.jsonl row 3: field 'neg' must be a non-empty list",
        ),
        ([GOOD, {"query": "q", "pos": "a", "neg": ["b"]}], [], "row 2"),
        (
            [GOOD, {"query": "q", "pos": ["a"], "neg": ["b"], "prompt": 3}],
            [],
            "bad.jsonl row 2: field 'prompt' must be a string",
        ),
        (
            [GOOD],
            ["backend.knowledge_distillation=true"],
            "bad.jsonl row 1: backend.knowledge_distillation=true needs field 'pos_scores'",
        ),
        ([GOOD], ["hardware.precision=fp16"], "hardware.precision='fp16': fp16 needs a GPU"),
        (
            [GOOD],
            ["backend.task=ranker"],
            "backend.task='ranker': one of embedder, reranker (did you mean 'reranker'?)",
        ),
        (
            [GOOD],
            ["backend.sentence_pooling_method=max"],
            "backend.sentence_pooling_method='max': one of cls, last_token, mean",
        ),
        (
            [GOOD],
            ["backend.query_instruction_format='Q: {}'"],
            "backend.query_instruction_format='Q: {}': must hold exactly two {}",
        ),
    ],
)
def test_bad_input_refused_at_compose_time(tmp_path, rows, extra, expect):
    bad = _bad(tmp_path, rows)
    proc, run = run_train("backend=flagembedding", f"data.path={bad}", *extra, outputs=tmp_path / "out", timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and expect in lines[0], proc.stderr
    assert run is None  # nothing written


# ------------------------------------------------------------------------------------------------ real runs (slow)


def _history_losses(run):
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines() if line.strip()]
    return [r["loss"] for r in rows if "loss" in r]


def _run(overrides, tmp_path_factory, tiny_model, name):
    if "model=minilm" not in overrides:
        tiny_model("tiny_bert")
    out = tmp_path_factory.mktemp(name)
    proc, run = run_train(*overrides, outputs=out, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def embedder_run(tmp_path_factory, tiny_model):
    return _run(EMBED, tmp_path_factory, tiny_model, "fe_embed")


@pytest.fixture(scope="module")
def reranker_run(tmp_path_factory, tiny_model):
    return _run(RERANK, tmp_path_factory, tiny_model, "fe_rerank")


def _check_common(run, task):
    m = read_json(run / "metrics.json")
    losses = _history_losses(run)
    assert len(losses) == 30  # 2 epochs x 60 rows / batch 4, logged every step
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)  # the loss falls
    assert m["first_train_loss"] == losses[0] and m["train_loss"] == losses[-1]
    for k in (
        "eval_recall_at_1",
        "eval_recall_at_5",
        "eval_recall_at_10",
        "eval_mrr",
        "eval_ndcg_at_10",
        "eval_loss",
        "base_eval_recall_at_1",
        "base_eval_mrr",
        "base_eval_loss",
        "eval_mrr_gain",
    ):
        assert isinstance(m[k], float) and math.isfinite(m[k]), k
    assert 0 <= m["eval_recall_at_1"] <= m["eval_recall_at_5"] <= m["eval_recall_at_10"] <= 1
    assert m["task"] == task and m["total_params"] == m["trainable_params"] > 100_000
    assert m["tokens_per_s"] > 0 and m["train_runtime_s"] > 0
    assert (run / "loss.png").exists() and list((run / "tensorboard").glob("events.out.tfevents.*"))
    before, after = read_json(run / "eval" / "before.json"), read_json(run / "eval" / "after.json")
    assert before["queries"] == after["queries"] == 20 and before["corpus"] == 80
    manifest = read_json(run / "manifest.json")
    assert manifest["status"] == "completed"
    return m, after


@pytest.mark.slow
def test_embedder_trains_and_loads_with_flagmodel(embedder_run):
    m, after = _check_common(embedder_run, "embedder")
    assert m["eval_loss"] < m["base_eval_loss"]  # the held-out contrastive loss improved
    import numpy as np
    from FlagEmbedding import FlagModel

    cfg = read_json(embedder_run / "resolved_config.json")
    model = FlagModel(
        str(embedder_run / "embedder"),
        use_fp16=False,
        devices="cpu",
        pooling_method="mean",
        query_instruction_for_retrieval=cfg["backend"]["query_instruction_for_retrieval"],
    )
    ev = [json.loads(x) for x in (REPO / "data/samples/tiny_embedding_eval.jsonl").read_text().splitlines()]
    corpus = [json.loads(x) for x in (REPO / "data/samples/tiny_embedding_corpus.jsonl").read_text().splitlines()]
    q = model.encode_queries([r["query"] for r in ev])
    p = model.encode_corpus([c["text"] for c in corpus])
    assert q.shape == (20, 64) and p.shape == (80, 64)
    assert np.allclose(np.linalg.norm(p, axis=1), 1, atol=1e-4)
    # the run's recall@1, recomputed here from the saved model
    top = np.argmax(q @ p.T, axis=1)
    r1 = np.mean([corpus[t]["id"] == r["pos_id"] for t, r in zip(top, ev)])
    assert abs(r1 - m["eval_recall_at_1"]) < 1e-9


@pytest.mark.slow
def test_reranker_trains_and_loads_with_flagreranker(reranker_run):
    m, after = _check_common(reranker_run, "reranker")
    from FlagEmbedding import FlagReranker

    model = FlagReranker(str(reranker_run / "reranker"), use_fp16=False, devices="cpu")
    ev = [json.loads(x) for x in (REPO / "data/samples/tiny_embedding_eval.jsonl").read_text().splitlines()]
    s = model.compute_score([(r["query"], r["pos"][0]) for r in ev] + [(r["query"], r["neg"][1]) for r in ev])
    assert len(s) == 40 and all(math.isfinite(x) for x in s)
    assert len(set(round(x, 5) for x in s)) > 1  # it tells pairs apart


@pytest.mark.slow
def test_resume_after_sigkill_continues_from_the_last_complete_checkpoint(tmp_path):
    """Killed mid-training, `output_dir=<run> resume=true` continues from the newest checkpoint that carries the
    completion marker (the same rule as alpacalora); a checkpoint cut by the kill is never resumed from."""
    import subprocess
    import time

    from conftest import PY, signal_workers, user_env

    out = tmp_path / "run"
    argv = [
        PY,
        str(REPO / "train.py"),
        *[o for o in EMBED if not o.startswith("save_steps")],
        "save_steps=5",
        "backend.eval=false",
        f"output_dir={out}",
    ]
    proc = subprocess.Popen(argv, cwd=str(REPO), env=user_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = out / "checkpoints" / "checkpoint-10" / "FINETUNE_COMPLETE"
    deadline = time.time() + 400
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert marker.exists(), "no complete checkpoint-10 before the run ended"
    assert signal_workers("flagembedding", out)  # the worker (its own session); then the driver
    proc.kill()
    proc.wait()
    assert not (out / "flagembedding_train.json").exists()  # it really died mid-training
    cut = out / "checkpoints" / "checkpoint-15"  # as if the kill came in the middle of a save
    cut.mkdir(exist_ok=True)
    (cut / "config.json").write_text("{}")
    done, _ = run_train(f"output_dir={out}", "resume=true", outputs=tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log = (out / "logs" / "train.log").read_text()
    assert "resuming from" in log and "checkpoint-10" in log.split("resuming from")[-1].splitlines()[0]
    s = read_json(out / "flagembedding_train.json")
    assert s["resumed_from"].endswith("checkpoint-10") and s["global_step"] == 30
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, 31))  # every step once: no duplicates after the resume
    assert "resume: loaded the encoder's weights from" in log
    assert (out / "embedder" / "model.safetensors").exists()
    m = read_json(out / "manifest.json")
    assert m["status"] == "completed" and len(m["resumes"]) == 1


def test_eval_device_follows_the_hardware(monkeypatch):
    """The embedding evaluation runs where the run trains: one GPU (cuda:0 of the visible ones) on GPU hardware, the
    CPU on hardware=cpu; GPU hardware where the process sees no GPU fails with one line (never evaluates on CPU in
    silence). The GPU case is checked with torch reporting a GPU, the way a GPU job sees it."""
    import torch

    from finetune.recipes.flagembedding_eval import eval_device

    assert eval_device({"device": "cpu"}) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert eval_device({"device": "cuda"}) == "cuda:0"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="hardware.device=cuda, but this process sees no CUDA GPU"):
        eval_device({"device": "cuda"})
