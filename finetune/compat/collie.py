"""Monkeypatches that let collie-lm 1.0.7 run on a machine without a GPU (CPU torch, gloo).

Runs inside Collie's own environment (.venv-collie), imported by the Collie recipe (finetune/recipes/collie.py)
BEFORE ``import collie``.
``apply(device)`` follows the run's configured hardware.device, never what happens to be installed: ``cpu`` always
patches (also on a GPU machine: the run asked for the CPU); ``cuda`` never patches, and stops with one line when
this process sees no GPU (a CPU build of torch, a job without GPUs), instead of training on the CPU in silence.
Each patch names the Collie line it works around (notes/collie-on-cpu.md); removing any one of the first five
brings back an error, removing the sixth an intermittent segfault. No file in site-packages is edited.
"""

from __future__ import annotations

import functools

# what these patches were written against (requirements-collie.lock; tests/test_compat.py checks the lock)
DIST, PINNED = "collie-lm", "1.0.7"
ALSO_PINNED = {"megatron-core": "0.2.0", "deepspeed": "0.19.8", "transformers": "4.50.3"}
TOUCHES = (
    "deepspeed.init_distributed",
    "megatron.core.tensor_parallel.layers._initialize_affine_weight_cpu",
    "collie.models.llama.model.RotaryPositionEmbedding.forward",
    "torch.distributed.all_reduce",
)
APPLIED = []


def apply(device: str = "cpu") -> list:
    """Apply the six patches for a CPU run. Returns the names of the patches applied."""
    import torch

    if device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(
                f"hardware.device=cuda, but Collie's torch {torch.__version__} (CUDA build "
                f"{torch.version.cuda}) sees no GPU here"
            )
        return APPLIED
    if APPLIED:
        return APPLIED

    # 1) collie/utils/dist_utils.py setup_distribution: deepspeed.init_distributed(dist_backend="nccl", ...)
    #    -> "Distributed package doesn't have NCCL built in". Use gloo.
    import deepspeed

    _orig_init_distributed = deepspeed.init_distributed

    @functools.wraps(_orig_init_distributed)
    def _init_distributed(*args, **kwargs):
        kwargs["dist_backend"] = "gloo"
        return _orig_init_distributed(*args, **kwargs)

    deepspeed.init_distributed = _init_distributed
    APPLIED.append("init_distributed:gloo")

    # 2) collie/utils/dist_utils.py: torch.cuda.set_device(torch.device("cuda:<LOCAL_RANK>"))
    torch.cuda.set_device = lambda *a, **k: None
    APPLIED.append("cuda.set_device:noop")

    # 3) set_seed -> megatron model_parallel_cuda_manual_seed -> CudaRNGStatesTracker.add -> torch.cuda.get_rng_state()
    #    (tracker.fork() at weight init uses it too): serve the CPU generator's state.
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    APPLIED.append("cuda.get_rng_state:cpu")

    # 4) collie/models/llama/model.py: megatron VocabParallelEmbedding allocates on torch.cuda.current_device()
    #    unless use_cpu_initialization=True; with low_cpu_mem_usage=True (Collie's default) the weight is on
    #    'meta', so the CPU init must be skipped there (from_pretrained loads the real weights afterwards).
    from megatron.core import tensor_parallel as _tp
    from megatron.core.tensor_parallel import layers as _mlayers

    #    At tp_size > 1 Collie's ColumnParallelLinearWithoutBias / RowParallelLinearWithoutBias are the megatron
    #    layers themselves (at tp 1 they are plain nn.Linear) and allocate on CUDA the same way: same fix.
    def _cpu_init(cls):
        orig = cls.__init__

        @functools.wraps(orig)
        def init(self, *args, **kwargs):
            kwargs["use_cpu_initialization"] = True
            return orig(self, *args, **kwargs)

        cls.__init__ = init

    for cls in (_tp.VocabParallelEmbedding, _tp.ColumnParallelLinear, _tp.RowParallelLinear):
        _cpu_init(cls)
    _orig_init_cpu = _mlayers._initialize_affine_weight_cpu

    @functools.wraps(_orig_init_cpu)
    def _init_cpu(weight, *args, **kwargs):
        if weight.is_meta:
            return None
        return _orig_init_cpu(weight, *args, **kwargs)

    _mlayers._initialize_affine_weight_cpu = _init_cpu
    APPLIED.append("megatron parallel layers:cpu_init")

    # 5) Collie calls tensor.cuda() unconditionally: utils/padder.py (every batch), controller/evaluator.py,
    #    utils/dist_utils.py broadcast helpers, models/base.py (TP gather), ... -> make it return the tensor.
    torch.Tensor.cuda = lambda self, *a, **k: self
    APPLIED.append("Tensor.cuda:noop")

    # 6) collie/controller/trainer.py train_fn ends every step with
    #    dist.all_reduce(loss, op=ReduceOp.AVG, group=env.dp_group) on the loss tensor itself, which still carries
    #    its autograd history. On gloo, torch (2.9.1 and 2.13.0 measured) segfaults inside that call now and then:
    #    about one 30-step dp=2 run in 20, and 15 of 16 runs of 20,000 such calls. The same call on a detached tensor
    #    never did (tests/test_collie.py). A collective never records autograd history, so reduce through the
    #    detached alias: the same storage, so the caller's tensor holds the result as before.
    _install_detached_all_reduce()
    APPLIED.append("all_reduce:detached")
    return APPLIED


def _install_detached_all_reduce() -> None:
    import torch.distributed as dist

    orig = dist.all_reduce
    if getattr(orig, "_finetune_detached", False):
        return

    @functools.wraps(orig)
    def all_reduce(tensor, *args, **kwargs):
        if getattr(tensor, "requires_grad", False):
            tensor = tensor.detach()
        return orig(tensor, *args, **kwargs)

    all_reduce._finetune_detached = True
    dist.all_reduce = all_reduce


def speed_up_rotary() -> str:
    """Collie's Llama rotary embedding rebuilds its position table on every call, for all 2**17 positions.

    collie/models/llama/model.py RotaryPositionEmbedding.forward computes ``torch.outer(torch.arange(2**16 * 2),
    inv_freq)`` and its ``torch.polar`` (12 MB of fresh tensors) in every layer of every forward, then keeps the
    rows ``start_pos:start_pos + seq_len``. On the tiny model that is a third of the training step, and the page
    faults of those allocations make two runs sharing two cores six times slower than one. This computes the same
    rows only (each entry is the same float32 product ``position * inv_freq``, so the result is bit-identical) and
    keeps Collie's arithmetic otherwise. Not a CPU fix: applied on every device. Returns the patch's name.
    """
    import torch
    from collie.models.llama import model as llama

    cls = llama.RotaryPositionEmbedding
    if getattr(cls.forward, "_finetune_rows_only", False):
        return "llama rotary:rows_only"

    def forward(self, query, key, seq_len: int, start_pos: int = 0):
        t = query.dtype
        query = torch.view_as_complex(query.float().reshape(*query.shape[:-1], -1, 2))
        key = torch.view_as_complex(key.float().reshape(*key.shape[:-1], -1, 2))
        positions = torch.arange(start_pos, start_pos + seq_len, device=self.inv_freq.device)
        freqs = torch.outer(positions, self.inv_freq).float()
        freqs_cis = torch.polar(torch.ones_like(freqs), freqs)
        shape = [d if i == 1 or i == query.ndim - 1 else 1 for i, d in enumerate(query.shape)]
        freqs_cis = freqs_cis.view(*shape)
        query = torch.view_as_real(query * freqs_cis).flatten(3)
        key = torch.view_as_real(key * freqs_cis).flatten(3)
        return query.type(t), key.type(t)

    forward._finetune_rows_only = True
    cls.forward = forward
    return "llama rotary:rows_only"
