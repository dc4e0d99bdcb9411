"""The chooser: backend, method (when method=auto), micro batch, gradient checkpointing, ZeRO stage, offload and
data/tensor-parallel sizes that fit the hardware, preferring the fastest plan that fits. Standard library +
omegaconf only (runs at plan time, before anything is written).

Every combination is estimated (finetune/auto/estimator.py); a combination fits when its per-device estimate is at
most `headroom` of the device memory (GPU memory, or the node's RAM shared by the processes on it) and what it
offloads fits in host memory. Among those that fit, the highest estimated throughput wins:

    tokens/s = processes x device FLOP/s x efficiency / training FLOPs per token

efficiency = base (GPU 0.45, CPU 0.35) x tokens per micro batch / (that + n0) (small batches waste the device)
x penalties for ZeRO-3 / offload / tensor parallel / several nodes. Ties go to the earlier backend in
backend.candidates. Keys the user typed (micro_batch_size=..., gradient_checkpointing=..., hardware.deepspeed_stage,
launcher.nproc_per_node) are kept as given.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional

from finetune.auto.estimator import LORA_LIKE, Estimate, GiB, MethodParams, ModelShape, Setup, estimate

CONF = Path(__file__).resolve().parents[2] / "conf"
AUTO_METHODS = ("lora", "qlora", "freeze", "galore", "badam", "full")  # method=auto tries these
QLORA_SPEED = 0.7  # 4/8-bit weights are dequantised in every forward and backward: QLoRA steps are slower than
# LoRA's (reported 0.6-0.8x on GPUs); so a plan picks QLoRA when LoRA does not fit
GPU_HEADROOM = 0.90
CPU_HEADROOM = 0.85


@dataclass(kw_only=True)
class Request(MethodParams):
    """What the user asked for, read from the config (method settings: MethodParams)."""

    batch_size: int
    seq_len: int
    method: str = "auto"  # a method name, or auto
    precision: str = "fp32"
    model_kind: str = "causal_lm"
    data_format: str = "alpaca"
    candidates: List[str] = field(default_factory=lambda: ["alpacalora", "llamafactory", "collie"])
    prefer: str = "fastest"
    # fixed by the user (None: the planner chooses)
    micro_batch_size: Optional[int] = None
    gradient_checkpointing: Optional[bool] = None
    zero_stage: Optional[int] = None
    zero_fixed: bool = False
    nproc_per_node: Optional[int] = None
    memory_efficient_attention: bool = True
    total_tokens: float = 0.0  # tokens the run will process (rows x epochs x seq, upper bound);
    # 0: unknown, ranked as 10 million tokens


# Seconds before the first step (imports, model and data loading), seen on this project's CPU machines:
# our HF Trainer recipe imports torch + transformers + peft; LLaMA-Factory adds about 7 s of its own imports;
# Collie starts in its own environment with DeepSpeed. They decide between backends only for short runs.
STARTUP_S = {"alpacalora": 8.0, "llamafactory": 15.0, "collie": 30.0, "flagembedding": 10.0}


@dataclass
class Machine:
    device: str  # cpu | cuda
    gpus_per_node: int = 0
    gpu_memory_gb: float = 0.0  # GiB per GPU
    gpu_type: Optional[str] = None
    nnodes: int = 1
    cpus: int = 1
    memory_gb: float = 0.0  # GiB of RAM per node
    flops: float = 1e12  # peak FLOP/s of one process's device


@dataclass
class Candidate:
    backend: str
    method: str
    micro_batch_size: int
    grad_accum: int
    gradient_checkpointing: bool
    zero_stage: Optional[int]
    offload_optimizer: bool
    offload_param: bool
    dp: int
    tp: int
    nproc_per_node: int
    nnodes: int
    estimate: Estimate
    limit_bytes: float
    host_limit_bytes: float
    tokens_per_s: float
    fits: bool
    why_not: str = ""
    est_time_s: float = 0.0  # startup + total tokens / tokens per second

    @property
    def need_bytes(self) -> float:
        return self.estimate.total

    def label(self) -> str:
        z = "-" if self.zero_stage is None else f"z{self.zero_stage}"
        if self.offload_optimizer:
            z += "+off_opt"
        if self.offload_param:
            z += "+off_param"
        return (
            f"{self.backend}/{self.method} mbs={self.micro_batch_size} accum={self.grad_accum} "
            f"gc={'on' if self.gradient_checkpointing else 'off'} zero={z} dp={self.dp} tp={self.tp}"
        )

    def sort_key(self, order: Dict[str, int], prefer: str = "fastest"):
        """Lower is better. fastest: estimated wall time (near-ties within 2 % go to the earlier backend in
        backend.candidates, then to less memory); least_memory: memory first."""
        if prefer == "least_memory":
            return (self.need_bytes, order.get(self.backend, 99), self.est_time_s)
        return (
            round(math.log(max(self.est_time_s, 1e-9)) / math.log(1.02)),
            order.get(self.backend, 99),
            self.need_bytes,
        )

    def summary(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("estimate",)}
        d["estimate_gib"] = round(self.estimate.gib(), 3)
        d["estimate_parts_gib"] = {k: round(v / GiB, 3) for k, v in self.estimate.parts.items()}
        d["host_offload_gib"] = round(self.estimate.host_bytes / GiB, 3)
        d["limit_gib"] = round(self.limit_bytes / GiB, 3)
        d["total_params"] = self.estimate.total_params
        d["trainable_params"] = self.estimate.trainable_params
        return d


@dataclass
class Choice:
    chosen: Optional[Candidate]
    candidates: List[Candidate]
    reason: str
    machine: Machine
    skipped_backends: Dict[str, str] = field(default_factory=dict)
    order: Dict[str, int] = field(default_factory=dict)
    prefer: str = "fastest"

    def overrides(self) -> List[str]:
        """The overrides that pin this choice (replay them instead of backend=auto to reproduce)."""
        c = self.chosen
        if c is None:
            return []
        out = [
            f"backend={c.backend}",
            f"method={c.method}",
            f"micro_batch_size={c.micro_batch_size}",
            f"gradient_checkpointing={str(c.gradient_checkpointing).lower()}",
            f"hardware.deepspeed_stage={'null' if c.zero_stage is None else c.zero_stage}",
            f"launcher.nproc_per_node={c.nproc_per_node}",
        ]
        if c.offload_optimizer:
            out.append("hardware.offload_optimizer=true")
        if c.offload_param:
            out.append("hardware.offload_param=true")
        if c.backend == "collie":
            out += [f"backend.dp_size={c.dp}", f"backend.tp_size={c.tp}"]
        return out

    def to_dict(self) -> dict:
        return {
            "chosen": self.chosen.summary() if self.chosen else None,
            "reason": self.reason,
            "overrides": self.overrides(),
            "machine": asdict(self.machine),
            "skipped_backends": dict(self.skipped_backends),
            "considered": len(self.candidates),
            "fitting": sum(1 for c in self.candidates if c.fits),
        }

    def explain(self, limit: int = 12) -> str:
        m = self.machine
        if m.device == "cuda":
            where = (
                f"{m.nnodes} node(s) x {m.gpus_per_node} GPU(s) {m.gpu_type or ''} with {m.gpu_memory_gb:g} GiB each "
                f"({m.flops / 1e12:g} TFLOP/s)"
            )
        else:
            where = f"CPU: {m.cpus} cores, {m.memory_gb:.1f} GiB RAM ({m.flops / 1e12:.2f} TFLOP/s)"
        lines = [f"[auto] hardware: {where}"]
        for b, why in self.skipped_backends.items():
            lines.append(f"[auto] backend {b} not considered: {why}")
        best = {}

        def rank(c):
            return (0, c.sort_key(self.order, self.prefer)) if c.fits else (1, c.need_bytes / max(1.0, c.limit_bytes))

        for c in self.candidates:  # best per (backend, method): fitting first, then fastest / smallest
            key = (c.backend, c.method)
            cur = best.get(key)
            if cur is None or rank(c) < rank(cur):
                best[key] = c
        rows = sorted(best.values(), key=rank)[:limit]
        lines.append(f"[auto] {len(self.candidates)} combinations estimated; best per backend/method:")
        lines.append(
            f"  {'':1} {'plan':<74} {'need GiB':>9} {'limit':>7} {'tokens/s':>10} {'est. s':>8}  "
            "parts GiB (weights/grads/optim/act/runtime)"
        )
        for c in rows:
            p = c.estimate.parts
            mark = "*" if c is self.chosen else ("+" if c.fits else "x")
            parts = "/".join(
                f"{p[k] / GiB:.2f}" for k in ("weights", "gradients", "optimizer", "activations", "runtime")
            )
            lines.append(
                f"  {mark} {c.label():<74} {c.need_bytes / GiB:9.2f} {c.limit_bytes / GiB:7.1f} "
                f"{c.tokens_per_s:10.0f} {c.est_time_s:8.0f}  {parts}" + (f"  ({c.why_not})" if c.why_not else "")
            )
        lines.append("  (* chosen, + fits, x does not fit; est. s = startup + tokens / throughput)")
        lines.append(f"[auto] choice: {self.reason}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ backends


def backend_info(name: str) -> dict:
    """methods / model_kinds / data_formats of a backend, from its conf/backend/<name>.yaml (one source of truth)."""
    from omegaconf import OmegaConf

    y = OmegaConf.load(CONF / "backend" / f"{name}.yaml")
    b = y.get("backend", {})
    return {
        "methods": list(b.get("methods", [])),
        "model_kinds": list(b.get("model_kinds", ["causal_lm"])),
        "data_formats": list(b.get("data_formats", ["alpaca", "sharegpt"])),
    }


DEVICES = {
    "alpacalora": ("cpu", "cuda"),
    "llamafactory": ("cpu", "cuda"),
    "collie": ("cuda",),
    "flagembedding": ("cpu", "cuda"),
}
TENSOR_PARALLEL = {"collie"}


def backend_available(name: str, machine: Machine, collie_venv: Optional[str] = None) -> Optional[str]:
    """None when the backend can run here, else why not."""
    if machine.device not in DEVICES.get(name, ("cpu", "cuda")):
        return f"runs on {' or '.join(DEVICES[name])} only (hardware.device={machine.device})"
    if name == "llamafactory" and importlib.util.find_spec("llamafactory") is None:
        return "package llamafactory is not installed"
    if name == "flagembedding" and importlib.util.find_spec("FlagEmbedding") is None:
        return "package FlagEmbedding is not installed"
    if name == "alpacalora" and importlib.util.find_spec("finetune.recipes.alpacalora") is None:
        return "its recipe finetune/recipes/alpacalora.py is missing"
    if name == "collie":
        venv = Path(collie_venv or ".venv-collie")
        if not (venv / "bin" / "python").exists():
            return f"its environment {venv} does not exist (scripts/setup_collie_env.sh)"
    return None


def request_for(backend: str, base_req: Request, per_backend: Optional[Dict[str, Request]]) -> Request:
    """The request as ``backend`` would see it (its own defaults), else the user's."""
    return (per_backend or {}).get(backend, base_req)


def why_cannot_train(req: Request, info: dict) -> Optional[str]:
    """None when the backend (its backend_info) trains this model kind, data format and method; else why not."""
    if req.model_kind not in info["model_kinds"]:
        return f"does not train {req.model_kind} models"
    if req.data_format not in info["data_formats"]:
        return f"does not read data.format={req.data_format}"
    if req.method != "auto" and req.method not in info["methods"]:
        return f"cannot run method={req.method}"
    return None


def usable_backends(
    base_req: Request, machine: Machine, collie_venv: Optional[str], per_backend: Optional[Dict[str, Request]]
):
    """([(backend, its backend_info)] in backend.candidates order, {skipped backend: why})."""
    usable, skipped = [], {}
    for backend in base_req.candidates:
        why = backend_available(backend, machine, collie_venv)
        info = backend_info(backend) if why is None else {}
        why = why or why_cannot_train(request_for(backend, base_req, per_backend), info)
        if why:
            skipped[backend] = why
        else:
            usable.append((backend, info))
    return usable, skipped


# ------------------------------------------------------------------------------------------------ search


def _divisors(n: int, cap: int = 128) -> List[int]:
    return [d for d in range(1, min(n, cap) + 1) if n % d == 0]


def _efficiency(
    machine: Machine,
    tokens_per_micro: int,
    zero: Optional[int],
    off_opt: bool,
    off_param: bool,
    tp: int,
    nnodes: int,
    dp: int,
) -> float:
    base, n0 = (0.45, 2048.0) if machine.device == "cuda" else (0.35, 64.0)
    eff = base * tokens_per_micro / (tokens_per_micro + n0)
    if zero == 3 and dp > 1:
        eff *= 0.8 if nnodes == 1 else 0.65
    elif zero in (1, 2) and dp > 1:
        eff *= 0.95
    if off_opt:
        eff *= 0.5
    if off_param:
        eff *= 0.5
    if tp > 1:
        eff *= 0.9 ** math.log2(tp)
    if nnodes > 1:
        eff *= 0.9
    return eff


class Combination(NamedTuple):
    """One way to run a backend, before it is estimated."""

    request: Request  # the request as this backend sees it
    params: dict  # method settings for the estimator's Setup
    world: int  # processes in the whole job
    knobs: dict  # what the search turned: the Candidate fields backend, method,
    # micro_batch_size, grad_accum, gradient_checkpointing, zero_stage,
    # offload_optimizer, offload_param, dp, tp, nproc_per_node


def process_counts(req: Request, machine: Machine):
    """(processes in the job, processes per node): one per GPU, one on a CPU, or launcher.nproc_per_node."""
    world = machine.gpus_per_node * machine.nnodes if machine.device == "cuda" else 1
    procs_per_node = machine.gpus_per_node if machine.device == "cuda" else 1
    if req.nproc_per_node:
        procs_per_node = int(req.nproc_per_node)
        world = procs_per_node * machine.nnodes
    return world, procs_per_node


def method_options(req: Request, info: dict) -> List[str]:
    """method=auto: every AUTO_METHODS entry the backend runs; else the method asked for."""
    return [m for m in AUTO_METHODS if m in info["methods"]] if req.method == "auto" else [req.method]


def method_family(method: str) -> str:
    """What the estimator calls the method: LoRA variants count as lora."""
    return "lora" if method in LORA_LIKE else method


def method_settings(method: str, req: Request) -> dict:
    """The request's method settings for this method: QLoRA defaults to 4 bits, non-LoRA methods load unquantised."""
    params = req.method_params()
    if method == "qlora":
        params["quantization_bit"] = params.get("quantization_bit") or 4
    elif method_family(method) != "lora":
        params["quantization_bit"] = None
    return params


def tensor_parallel_options(backend: str, machine: Machine, procs_per_node: int) -> List[int]:
    """Tensor-parallel sizes to try: Collie on GPUs splits layers over 1, 2, 4 or 8 of a node's processes."""
    return [
        t for t in (1, 2, 4, 8) if backend in TENSOR_PARALLEL and machine.device == "cuda" and procs_per_node % t == 0
    ] or [1]


def micro_batch_options(req: Request, per_rank: int) -> List[int]:
    """The typed micro_batch_size, else every divisor of the per-rank batch; only sizes that divide it."""
    options = [req.micro_batch_size] if req.micro_batch_size else _divisors(per_rank)
    return [mbs for mbs in options if per_rank % mbs == 0]


def checkpointing_options(req: Request) -> List[bool]:
    return [req.gradient_checkpointing] if req.gradient_checkpointing is not None else [False, True]


def zero_options(backend: str, method: str, req: Request, machine: Machine, dp: int):
    """[(ZeRO stage, offload optimizer, offload params)] to try: the typed stage, none where DeepSpeed does not
    apply (CPU, Collie), else sharding / offload steps; minus what the method cannot use."""
    family = method_family(method)
    if req.zero_fixed:
        options = [(req.zero_stage, False, False)]
    elif machine.device != "cuda" or backend == "collie":
        options = [(None, False, False)]
    elif dp > 1:
        options = [(None, False, False), (2, False, False), (3, False, False), (3, True, False), (3, True, True)]
    else:
        options = [(None, False, False), (2, True, False), (3, True, True)]
    if family == "galore":
        options = [z for z in options if z[0] is None] or [(None, False, False)]
    if method == "qlora":  # quantised weights are not partitioned by ZeRO-3 (refused)
        options = [z for z in options if z[0] != 3] or [(None, False, False)]
    if family == "badam" and req.badam_mode == "layer" and dp > 1:
        options = [z for z in options if z[0] == 3]
    return options


def combinations(backends, base_req: Request, machine: Machine, per_backend: Optional[Dict[str, Request]]):
    """Every combination to estimate, in a fixed order (backend, method, tp, micro batch, checkpointing, ZeRO):
    ties between equally good plans go to the first."""
    for backend, info in backends:
        req = request_for(backend, base_req, per_backend)
        world, procs_per_node = process_counts(req, machine)
        tp_options = tensor_parallel_options(backend, machine, procs_per_node)
        for method in method_options(req, info):
            if method_family(method) == "badam" and req.badam_mode == "ratio" and world > 1:
                continue  # ratio-mode BAdam runs in one process only
            params = method_settings(method, req)
            for tp in tp_options:
                dp = max(1, world // tp)
                if req.batch_size % dp:
                    continue
                per_rank = req.batch_size // dp
                for mbs, gc, (zero, off_opt, off_param) in itertools.product(
                    micro_batch_options(req, per_rank),
                    checkpointing_options(req),
                    zero_options(backend, method, req, machine, dp),
                ):
                    knobs = dict(
                        backend=backend,
                        method=method,
                        micro_batch_size=mbs,
                        grad_accum=per_rank // mbs,
                        gradient_checkpointing=bool(gc),
                        zero_stage=zero,
                        offload_optimizer=off_opt,
                        offload_param=off_param,
                        dp=dp,
                        tp=tp,
                        nproc_per_node=procs_per_node,
                    )
                    yield Combination(request=req, params=params, world=world, knobs=knobs)


def memory_limits(machine: Machine, procs_per_node: int):
    """(usable bytes per device, usable host bytes per process for offload). On a CPU the processes of a node share
    its RAM and offload stays in the same RAM (no separate host limit)."""
    gpu_limit = machine.gpu_memory_gb * GiB * GPU_HEADROOM
    host_node = machine.memory_gb * GiB * CPU_HEADROOM if machine.memory_gb else float("inf")
    if machine.device == "cuda":
        return gpu_limit, host_node / max(1, procs_per_node)
    return host_node / max(1, procs_per_node), float("inf")


def why_it_does_not_fit(need: float, limit: float, host_need: float, host_limit: float) -> str:
    if need > limit:
        return f"needs {need / GiB:.1f} GiB > {limit / GiB:.1f} GiB"
    if host_need > host_limit:
        return f"offload needs {host_need / GiB:.1f} GiB host RAM > {host_limit / GiB:.1f}"
    return ""


def tokens_per_second(machine: Machine, combo: Combination, est: Estimate, quantized: bool) -> float:
    """processes x device FLOP/s x efficiency / training FLOPs per token (divided over the tensor-parallel group)."""
    k = combo.knobs
    eff = _efficiency(
        machine,
        k["micro_batch_size"] * combo.request.seq_len,
        k["zero_stage"],
        k["offload_optimizer"],
        k["offload_param"],
        k["tp"],
        machine.nnodes,
        k["dp"],
    ) * (QLORA_SPEED if quantized else 1.0)
    return combo.world * machine.flops * eff / max(1.0, est.flops_per_step_token) / max(1, k["tp"])


def evaluate(shape: ModelShape, combo: Combination, machine: Machine) -> Candidate:
    """Estimate one combination: memory against the limits, throughput, time including startup."""
    req, k = combo.request, combo.knobs
    setup = Setup(
        method=method_family(k["method"]),
        precision=req.precision,
        device=machine.device,
        micro_batch_size=k["micro_batch_size"],
        seq_len=req.seq_len,
        gradient_checkpointing=k["gradient_checkpointing"],
        memory_efficient_attention=req.memory_efficient_attention,
        zero_stage=k["zero_stage"],
        offload_optimizer=k["offload_optimizer"],
        offload_param=k["offload_param"],
        dp=k["dp"],
        tp=k["tp"],
        **combo.params,
    )
    est = estimate(shape, setup)
    limit, host_limit = memory_limits(machine, k["nproc_per_node"])
    host_need = est.host_bytes if machine.device == "cuda" else 0.0
    tokens_per_s = tokens_per_second(machine, combo, est, quantized=bool(setup.quantization_bit))
    est_time = STARTUP_S.get(k["backend"], 10.0) + (req.total_tokens or 1e7) / max(tokens_per_s, 1e-9)
    return Candidate(
        **k,
        nnodes=machine.nnodes,
        estimate=est,
        limit_bytes=limit,
        host_limit_bytes=host_limit,
        tokens_per_s=tokens_per_s,
        fits=est.total <= limit and host_need <= host_limit,
        why_not=why_it_does_not_fit(est.total, limit, host_need, host_limit),
        est_time_s=est_time,
    )


# ------------------------------------------------------------------------------------------------ the choice


def no_backend_reason(skipped: Dict[str, str]) -> str:
    return "no candidate backend can run here: " + "; ".join(f"{b}: {w}" for b, w in skipped.items())


def nothing_fits_reason(candidates: List[Candidate], req: Request) -> str:
    """Why no plan: the batch cannot be split, or the smallest plan (relative to its limit) with its numbers."""
    if not candidates:
        return f"no plan: batch_size={req.batch_size} cannot be split over the processes of this hardware"
    smallest = min(candidates, key=lambda c: c.need_bytes / max(1.0, c.limit_bytes))
    p = smallest.estimate.parts
    return (
        f"nothing fits: the smallest plan ({smallest.label()}) needs {smallest.need_bytes / GiB:.1f} GiB "
        f"per device (weights {p['weights'] / GiB:.1f}, gradients {p['gradients'] / GiB:.1f}, "
        f"optimizer {p['optimizer'] / GiB:.1f}, activations {p['activations'] / GiB:.1f}, runtime "
        f"{p['runtime'] / GiB:.1f}) for {smallest.estimate.total_params / 1e9:.2f}B parameters, "
        f"but the hardware has {smallest.limit_bytes / GiB:.1f} GiB usable per device"
    )


def choice_reason(best: Candidate, fitting: List[Candidate], candidates: List[Candidate], prefer: str) -> str:
    share = best.need_bytes / max(1.0, best.limit_bytes)
    return (
        f"{best.label()}: estimated {best.need_bytes / GiB:.2f} GiB of {best.limit_bytes / GiB:.1f} GiB usable "
        f"per device ({share:.0%}), about {best.tokens_per_s:,.0f} tokens/s, about {best.est_time_s:,.0f} s "
        f"with startup; {'fastest' if prefer != 'least_memory' else 'least memory'} of {len(fitting)} "
        f"fitting plans (of {len(candidates)} estimated)"
    )


def plan_choice(
    shape: ModelShape,
    req: Request,
    machine: Machine,
    collie_venv: Optional[str] = None,
    per_backend: Optional[Dict[str, Request]] = None,
) -> Choice:
    """Estimate every combination and pick one. ``per_backend``: the request as each backend would see it (its
    own defaults for batch size, LoRA modules_to_save, ...); ``req`` otherwise."""
    backends, skipped = usable_backends(req, machine, collie_venv, per_backend)
    candidates = [evaluate(shape, combo, machine) for combo in combinations(backends, req, machine, per_backend)]
    if not backends:
        return Choice(None, candidates, no_backend_reason(skipped), machine, skipped)
    order = {b: i for i, b in enumerate(req.candidates)}
    fitting = [c for c in candidates if c.fits]
    if not fitting:
        return Choice(None, candidates, nothing_fits_reason(candidates, req), machine, skipped, order, req.prefer)
    best = min(fitting, key=lambda c: c.sort_key(order, req.prefer))
    return Choice(
        best, candidates, choice_reason(best, fitting, candidates, req.prefer), machine, skipped, order, req.prefer
    )
