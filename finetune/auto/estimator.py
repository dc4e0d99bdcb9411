"""Training-memory estimate from a model's config.json. Standard library only (runs at plan time).

The parameter count comes from the architecture (hidden size, layers, heads, KV heads, MLP width, vocabulary,
tied embeddings, biases), never from the model's name. The memory of one training process is the sum of:

  weights      frozen parameters in their storage dtype + trainable parameters (fp32 master copies under mixed
               precision, plus the 16-bit copy autocast keeps during the forward pass); quantised base weights
               for QLoRA (embeddings and lm_head stay 16-bit)
  gradients    one per trainable parameter (fp32 under mixed precision, 16-bit under pure_bf16)
  optimizer    AdamW: two states per trainable parameter (fp32, or 16-bit under pure_bf16); GaLore: states of the
               projected gradients (rank x larger side) plus the projection matrices; BAdam: only the active block
  activations  what the backward pass needs, per token and layer, counted from the block's operations
               (attention projections, SwiGLU/GELU MLP, norms, attention scores when not memory-efficient),
               the logits and the loss; with gradient checkpointing only each layer's input is kept, plus one
               layer recomputed at a time
  runtime      the framework itself (CUDA context + allocator slack on a GPU; the Python interpreter with torch,
               transformers and peft loaded on a CPU)

DeepSpeed ZeRO divides optimizer states (stage >= 1), gradients (>= 2) and weights (3) by the data-parallel size;
offloading moves optimizer states (and with offload_param the weights) to host memory. Tensor parallelism
divides weights, gradients, states and most activations by the TP size.

Calibration: the CPU runtime constant and the activation counts were checked against the peak RSS of real
HF Trainer runs on tiny Llama models (tests/test_auto.py), and the totals against LLaMA-Factory's published
memory table for 7B models (README "Hardware Requirement").

Measured here (torch 2.9.1, transformers 5.6.0, peft 0.18.1; tiny_llama_30m = 23.8M parameters, fp32, seq 128,
2 steps, peak RSS = VmHWM; `python -m finetune.auto.probe`), estimate / measured in GiB:
  LoRA q,v r=8  mbs 2: 1.253 / 1.252     mbs 8: 1.591 / 1.589     mbs 8 + checkpointing: 1.386 / 1.410
  full          mbs 2: 1.514 / 1.442     mbs 8: 1.840 / 1.782     mbs 8 + checkpointing: 1.642 / 1.557
  import baseline (torch + transformers + peft + Trainer): 0.944 GiB
Llama-2-7B (1 x 1024 tokens, checkpointing, GPU) vs LLaMA-Factory's table, GB: full AMP 124 / 120, pure_bf16
56 / 60, freeze 22 / 20, LoRA 16 / 16, GaLore (layer-wise) 18 / 16, BAdam 17 / 16, QLoRA 8/4/2-bit 9.6/6.3/4.6 vs
10/6/4.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

GiB = float(1 << 30)

# Bytes the framework needs besides tensors. GPU: CUDA context, cuBLAS workspace, allocator fragmentation.
# CPU: the Python process with torch + transformers + peft imported (measured on this project's venv: 0.94 GiB
# of RSS before the model is loaded) plus about 0.1 GiB the first training step adds besides tensors (model loading
# buffers, the Trainer, autograd bookkeeping).
RUNTIME_BYTES = {"cuda": 1.0 * GiB, "cpu": 1.05 * GiB}

# Layers' worth of activations alive at the peak under gradient checkpointing: the recomputed layer and its
# activation gradients (2) on a GPU, whose caching allocator reuses the same blocks layer after layer; 4 on a CPU,
# where glibc keeps what the recompute churned (fitted to the measured peak RSS of tiny runs, tests/test_auto.py).
GC_LAYERS = {"cuda": 2.0, "cpu": 4.0}

METHODS = ("full", "freeze", "lora", "galore", "badam")
LORA_LIKE = ("lora", "loraplus", "rslora", "dora", "pissa", "qlora")


_BIASED = dict(tied=True, glu=False, qkv_bias=True, o_bias=True, mlp_bias=True, norm_bias=True)


def _biased_mha(model_type: str, hidden: int, heads: int) -> dict:
    """What BERT-like encoders and GPT-2 share: full multi-head attention, tied embeddings, no gated MLP, biases on
    every linear layer and norm."""
    shape = dict(model_type=model_type, hidden=hidden, heads=heads, kv_heads=heads, head_dim=hidden // heads)
    return {**shape, **_BIASED}


def _first(meta: dict, *keys, default=None):
    for k in keys:
        if meta.get(k) is not None:
            return meta[k]
    return default


@dataclass
class ModelShape:
    """What the estimator needs to know about an architecture, read from config.json."""

    model_type: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool = False
    glu: bool = True  # gated MLP (SwiGLU: gate, up, down) or plain (up, down)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    norm_bias: bool = False  # LayerNorm (bias) vs RMSNorm
    experts: int = 1  # MoE: experts per layer (all hold weights)
    experts_per_token: int = 1  # MoE: experts each token goes through (activations, FLOPs)
    extra_embeddings: int = 0  # position / token-type embeddings (BERT, GPT-2)
    kind: str = "causal_lm"  # causal_lm | encoder
    names: Dict[str, str] = field(default_factory=dict)  # our role -> the module name in this family

    # ---------------------------------------------------------------- reading config.json

    @classmethod
    def from_config(cls, meta: dict) -> "ModelShape":
        """The shape from a config.json, one branch per way model families spell it (ChatGLM's kv_channels and
        padded vocabulary, multi-query attention, MoE experts, the Llama-like default). Longer than 80 lines on
        purpose: a lookup table read top to bottom, which split into functions would scatter one family's keys."""
        mt = str(meta.get("model_type", "")).lower()
        if mt in ("chatglm",) or "padded_vocab_size" in meta:
            heads = int(meta["num_attention_heads"])
            kv_ch = int(_first(meta, "kv_channels", default=int(meta["hidden_size"]) // heads))
            mq = bool(meta.get("multi_query_attention", False))
            kvh = int(meta.get("multi_query_group_num", heads)) if mq else heads
            return cls(
                model_type=mt or "chatglm",
                vocab=int(meta["padded_vocab_size"]),
                hidden=int(meta["hidden_size"]),
                layers=int(meta["num_layers"]),
                heads=heads,
                kv_heads=kvh,
                head_dim=kv_ch,
                intermediate=int(meta["ffn_hidden_size"]),
                tied=False,
                glu=True,
                qkv_bias=bool(meta.get("add_qkv_bias", False)) or bool(meta.get("add_bias_linear", False)),
                o_bias=bool(meta.get("add_bias_linear", False)),
                mlp_bias=bool(meta.get("add_bias_linear", False)),
                names={"qkv": "query_key_value", "o": "dense", "gate_up": "dense_h_to_4h", "down": "dense_4h_to_h"},
            )
        if mt in ("bert", "roberta", "xlm-roberta", "xlm_roberta", "electra"):
            h = int(meta["hidden_size"])
            heads = int(meta["num_attention_heads"])
            extra = int(meta.get("max_position_embeddings", 512)) * h + int(meta.get("type_vocab_size", 2)) * h
            return cls(
                **_biased_mha(mt, h, heads),
                vocab=int(meta["vocab_size"]),
                layers=int(meta["num_hidden_layers"]),
                intermediate=int(meta["intermediate_size"]),
                extra_embeddings=extra + 2 * h,
                kind="encoder",
                names={
                    "q": "query",
                    "k": "key",
                    "v": "value",
                    "o": "attention.output.dense",
                    "up": "intermediate.dense",
                    "down": "output.dense",
                },
            )
        if mt == "gpt2":
            h = int(meta["n_embd"])
            heads = int(meta["n_head"])
            return cls(
                **_biased_mha(mt, h, heads),
                vocab=int(meta["vocab_size"]),
                layers=int(meta["n_layer"]),
                intermediate=int(meta.get("n_inner") or 4 * h),
                extra_embeddings=int(meta.get("n_positions", 1024)) * h,
                names={"qkv": "c_attn", "o": "attn.c_proj", "up": "c_fc", "down": "mlp.c_proj"},
            )
        # Llama-like decoders: llama, mistral, qwen2, qwen3, internlm2, mixtral, yi, deepseek (dense), gemma ...
        try:
            h = int(meta["hidden_size"])
            heads = int(meta["num_attention_heads"])
            layers = int(meta["num_hidden_layers"])
            vocab = int(meta["vocab_size"])
            inter = int(meta["intermediate_size"])
        except KeyError as e:
            raise ValueError(
                f"config.json of model_type {mt!r} has no {e.args[0]!r}: the estimator knows "
                "Llama-like decoders (hidden_size, num_hidden_layers, num_attention_heads, "
                "intermediate_size, vocab_size), ChatGLM, BERT and GPT-2"
            ) from None
        kvh = int(_first(meta, "num_key_value_heads", default=heads))
        hd = int(_first(meta, "head_dim", default=h // heads))
        internlm = mt.startswith("internlm")
        qkv_bias = (
            bool(meta.get("attention_bias", False)) or bool(meta.get("bias", False)) or mt in ("qwen2", "qwen2_moe")
        )
        o_bias = bool(meta.get("attention_bias", False)) or (internlm and bool(meta.get("bias", False)))
        experts = int(_first(meta, "num_local_experts", "num_experts", "n_routed_experts", default=1) or 1)
        per_tok = int(_first(meta, "num_experts_per_tok", "num_experts_per_token", default=1) or 1)
        if experts > 1:
            inter = int(_first(meta, "moe_intermediate_size", default=inter))
        names = (
            {"qkv": "wqkv", "o": "wo", "gate": "w1", "up": "w3", "down": "w2"}
            if internlm
            else {
                "q": "q_proj",
                "k": "k_proj",
                "v": "v_proj",
                "o": "o_proj",
                "gate": "gate_proj",
                "up": "up_proj",
                "down": "down_proj",
            }
        )
        return cls(
            model_type=mt or "llama",
            vocab=vocab,
            hidden=h,
            layers=layers,
            heads=heads,
            kv_heads=kvh,
            head_dim=hd,
            intermediate=inter,
            tied=bool(meta.get("tie_word_embeddings", False)),
            glu=True,
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(meta.get("mlp_bias", False)),
            experts=experts,
            experts_per_token=min(per_tok, experts) if experts > 1 else 1,
            names=names,
        )

    @classmethod
    def from_path(cls, path) -> "ModelShape":
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        return cls.from_config(json.loads(p.read_text(encoding="utf-8")))

    # ---------------------------------------------------------------- parameter counts

    def linears(self) -> List[Tuple[str, int, int, int]]:
        """The linear layers of one block: (role, in_features, out_features, copies). MoE experts counted."""
        h, q, kv, i, e = (
            self.hidden,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
            self.intermediate,
            self.experts,
        )
        out = []
        if "qkv" in self.names:
            out.append(("qkv", h, q + 2 * kv, 1))
        else:
            out += [("q", h, q, 1), ("k", h, kv, 1), ("v", h, kv, 1)]
        out.append(("o", q, h, 1))
        if self.glu and "gate_up" in self.names:
            out.append(("gate_up", h, 2 * i, e))
        elif self.glu:
            out += [("gate", h, i, e), ("up", h, i, e)]
        else:
            out.append(("up", h, i, e))
        out.append(("down", i, h, e))
        return out

    def layer_params(self) -> int:
        n = sum(fi * fo * c for _, fi, fo, c in self.linears())
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        if self.qkv_bias:
            n += q + 2 * kv
        if self.o_bias:
            n += h
        if self.mlp_bias:
            n += ((2 if self.glu else 1) * self.intermediate + h) * self.experts
        if self.experts > 1:
            n += h * self.experts  # router
        n += 2 * h * (2 if self.norm_bias else 1)  # two norms per block
        return n

    def embedding_params(self) -> int:
        return self.vocab * self.hidden + self.extra_embeddings

    def head_params(self) -> int:
        if self.kind == "encoder":
            return 0
        return 0 if self.tied else self.vocab * self.hidden

    def total_params(self) -> int:
        final_norm = 0 if self.kind == "encoder" else self.hidden * (2 if self.norm_bias else 1)
        return self.embedding_params() + self.head_params() + self.layers * self.layer_params() + final_norm

    def module_shapes(self, names: Iterable[str]) -> List[Tuple[int, int, int]]:
        """(in, out, copies) per layer for the given module names (family names or 'all')."""
        names = [str(n) for n in names]
        everything = "all" in names or "all-linear" in names
        picked = []
        for role, fi, fo, c in self.linears():
            family = self.names.get(role, role)
            if everything or family in names or family.split(".")[-1] in names or role in names:
                picked.append((fi, fo, c))
        return picked

    def lora_params(self, r: int, targets: Iterable[str]) -> int:
        return self.layers * sum(r * (fi + fo) * c for fi, fo, c in self.module_shapes(targets))

    def saved_module_params(self, modules: Iterable[str]) -> int:
        """modules_to_save: PEFT trains a full copy of these (embeddings, lm_head)."""
        n = 0
        for m in modules or []:
            m = str(m)
            if m in ("embed_tokens", "tok_embeddings", "word_embeddings", "wte", "embedding"):
                n += self.vocab * self.hidden
            elif m in ("lm_head", "output", "output_layer"):
                n += self.vocab * self.hidden
        return n

    def flops_per_token(self, seq: int) -> float:
        """Forward FLOPs per token: 2 per weight the token passes through + attention scores."""
        active = self.layers * (
            self.layer_params() - sum(fi * fo * (c - min(c, self.experts_per_token)) for _, fi, fo, c in self.linears())
        )
        head = self.vocab * self.hidden if self.kind != "encoder" else 0
        attn = 2 * 2 * self.layers * seq * self.heads * self.head_dim * (0.5 if self.kind != "encoder" else 1.0)
        return 2.0 * (active + head) + attn


@dataclass
class MethodParams:
    """The method settings an estimate depends on; the planner's Request carries the same ones into each Setup."""

    lora_r: int = 8
    lora_targets: List[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    modules_to_save: List[str] = field(default_factory=list)
    freeze_trainable_layers: int = 2
    galore_rank: int = 16
    galore_layerwise: bool = False
    badam_mode: str = "layer"
    badam_update_ratio: float = 0.05
    optim: str = "adamw_torch"
    quantization_bit: Optional[int] = None  # QLoRA: 8, 4 or 2 (the frozen base weights' storage)

    def method_params(self) -> dict:
        return {
            f.name: (list(getattr(self, f.name)) if isinstance(getattr(self, f.name), list) else getattr(self, f.name))
            for f in fields(MethodParams)
        }


@dataclass
class Setup(MethodParams):
    """One way of training: the knobs the planner turns. Sizes are per process unless said otherwise."""

    method: str = "lora"  # full | freeze | lora | galore | badam (lora-like names count as lora)
    precision: str = "bf16"  # fp32 | bf16 | fp16 (mixed precision: fp32 master weights)
    pure_bf16: bool = False  # everything in 16-bit (LLaMA-Factory's pure_bf16)
    device: str = "cuda"  # cuda | cpu
    micro_batch_size: int = 1
    seq_len: int = 1024
    gradient_checkpointing: bool = False
    memory_efficient_attention: bool = True  # SDPA / flash: no seq x seq scores kept
    zero_stage: Optional[int] = None
    offload_optimizer: bool = False
    offload_param: bool = False
    dp: int = 1  # data-parallel size (ZeRO shards over it)
    tp: int = 1  # tensor-parallel size


@dataclass
class Estimate:
    total_params: int
    trainable_params: int
    parts: Dict[str, float]  # bytes on one device: weights, gradients, optimizer, activations, runtime
    host_bytes: float  # bytes offloaded to host memory (per process)
    flops_per_step_token: float  # training FLOPs per token (forward + backward [+ recompute])

    @property
    def total(self) -> float:
        return float(sum(self.parts.values()))

    def gib(self) -> float:
        return self.total / GiB

    def to_dict(self) -> dict:
        d = asdict(self)
        d["total_gib"] = round(self.gib(), 3)
        d["parts_gib"] = {k: round(v / GiB, 3) for k, v in self.parts.items()}
        return d


def _method_family(method: str) -> str:
    m = str(method)
    if m in LORA_LIKE:
        return "lora"
    if m not in METHODS:
        raise ValueError(f"method {m!r}: the estimator knows {', '.join(METHODS + LORA_LIKE)}")
    return m


def _optimizer_state_count(optim: str) -> float:
    """Optimizer states per trainable parameter, in units of the state dtype."""
    if optim in ("sgd",):
        return 0.0
    if optim in ("adafactor",):
        return 0.05  # factored second moment: rows + columns, no first moment by default
    if optim in ("adamw_8bit",):
        return 0.5  # two 8-bit states = one fp32-equivalent ... counted as 2 x 1 byte / 4
    if optim in ("rmsprop", "adagrad"):
        return 1.0
    return 2.0  # AdamW: exp_avg + exp_avg_sq


def activation_bytes_per_token(shape: ModelShape, s: Setup) -> Dict[str, float]:
    """Bytes kept for backward per token: per layer (no checkpointing), per layer input, logits + loss."""
    a = 4.0 if (s.precision == "fp32" and not s.pure_bf16) else 2.0  # activation dtype
    h, i = shape.hidden, shape.intermediate * shape.experts_per_token
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    # Per block (Llama-style, counted from the ops that save tensors for backward):
    #   norm 1: input + fp32 upcast + normalised output   norm 2: the same           (6h, the upcasts are fp32)
    #   q, k, v before and after RoPE, attention output + o_proj input             (2q + 4kv + q)
    #   MLP: gate, up, act(gate), act(gate)*up (down's input)                       (4i; GELU MLP: 2i)
    #   residual stream + dropout-free adds                                         (2h)
    #   grouped-query attention: k and v repeated to all heads for SDPA                 (2q - 2kv)
    # plus 10 % for what the count leaves out (rotary tables, masks, autograd bookkeeping); the per-token total
    # matched the measured RSS slope of tiny CPU runs within 2 % (tests/test_auto.py).
    norms = 2 * h * (a + 4.0 + a)
    per_layer = norms + (2 * h + 3 * q + 4 * kv + (4 if shape.glu else 2) * i) * a
    if kv < q and shape.kind != "encoder":
        per_layer += 2 * (q - kv) * a
    per_layer *= 1.1
    if not s.memory_efficient_attention:
        per_layer += 2 * shape.heads * s.seq_len * 4.0  # scores + probabilities (fp32 softmax)
    # LoRA adds the low-rank intermediate (r per target) and the dropout mask copy of each target's input
    if _method_family(s.method) == "lora":
        per_layer += sum(fi + s.lora_r for fi, _, _ in shape.module_shapes(s.lora_targets)) * a * 0.5
    per_layer /= max(1, s.tp)
    # logits (activation dtype) -> fp32 upcast for the loss -> log-softmax saved -> its gradient
    if shape.kind == "encoder":
        head = 2 * h * 4.0
    else:
        head = shape.vocab * (a + 4.0 + 4.0 + 4.0)
    layer_input = h * a
    return {"per_layer": per_layer, "layer_input": layer_input, "head": head}


@dataclass(frozen=True)
class Dtypes:
    """Bytes per value under a Setup's precision."""

    half: bool  # 16-bit storage (bf16 / fp16, mixed or pure)
    store: float  # frozen weights as loaded
    mixed: bool  # mixed precision: fp32 master copies of trainable weights + the 16-bit copy autocast keeps
    master: float  # trainable weights
    grad: float  # gradients
    state: float  # optimizer states

    @classmethod
    def of(cls, s: Setup) -> "Dtypes":
        half = s.pure_bf16 or s.precision in ("bf16", "fp16")
        full = 4.0 if not s.pure_bf16 else 2.0
        return cls(
            half=half, store=2.0 if half else 4.0, mixed=half and not s.pure_bf16, master=full, grad=full, state=full
        )


def trainable_split(shape: ModelShape, s: Setup, fam: str):
    """(trainable, frozen base parameters, extra weights besides the base model: LoRA adapters and full copies)."""
    P = shape.total_params()
    if fam == "full" or fam == "galore":
        return float(P), 0.0, 0.0
    if fam == "freeze":
        trainable = float(min(abs(int(s.freeze_trainable_layers)), shape.layers) * shape.layer_params())
        return trainable, P - trainable, 0.0
    if fam == "badam":
        if s.badam_mode == "ratio":
            trainable = float(P) * float(s.badam_update_ratio)
        else:
            trainable = float(shape.layer_params())  # one block (decoder layer) at a time
        return trainable, P - trainable, 0.0
    adapters = float(shape.lora_params(s.lora_r, s.lora_targets))  # lora
    copies = float(shape.saved_module_params(s.modules_to_save))
    trainable = adapters + copies
    return trainable, float(P), trainable


def weight_bytes(
    shape: ModelShape, s: Setup, fam: str, d: Dtypes, trainable: float, frozen: float, extra_weights: float
) -> float:
    """Frozen weights (quantised for QLoRA, embeddings and lm_head 16-bit) + trainable ones in their dtypes."""
    if s.quantization_bit:
        emb = shape.embedding_params() + shape.head_params()
        weights_frozen = (frozen - emb) * (s.quantization_bit / 8.0) * 1.03 + emb * 2.0  # + quantisation constants
    else:
        weights_frozen = frozen * d.store
    if fam == "badam":
        # the whole model stays in its storage dtype; the active block also gets an fp32 master copy when mixed
        return shape.total_params() * d.store + (trainable * 4.0 if (d.half and not s.pure_bf16) else 0.0)
    if fam in ("full", "galore", "freeze"):
        return weights_frozen + trainable * (d.master + (2.0 if d.mixed else 0.0))
    return weights_frozen + extra_weights * (d.master + (2.0 if d.mixed else 0.0))


def gradient_and_optimizer_bytes(shape: ModelShape, s: Setup, fam: str, d: Dtypes, trainable: float):
    """(gradients, optimizer states). GaLore keeps states of the projected gradients plus the projections (and,
    layer-wise, the gradients of one layer at a time)."""
    P = shape.total_params()
    n_states = _optimizer_state_count(s.optim)
    grads = trainable * d.grad
    if fam == "galore":
        mats = [(fi, fo, c) for fi, fo, c in shape.module_shapes(["all"])]
        proj = sum(
            shape.layers
            * c
            * (s.galore_rank * max(fi, fo) * n_states * d.state + s.galore_rank * min(fi, fo) * d.state)
            for fi, fo, c in mats
        )
        in_layers = sum(shape.layers * fi * fo * c for fi, fo, c in mats)
        optimizer = proj + (P - in_layers) * n_states * d.state
        if s.galore_layerwise:
            grads = shape.layer_params() * d.grad + (P - in_layers) * d.grad
        return grads, optimizer
    optimizer = trainable * n_states * d.state
    if fam == "badam" and not s.pure_bf16 and not d.half:
        optimizer = trainable * n_states * 4.0
    return grads, optimizer


def shard(s: Setup, d: Dtypes, trainable: float, weights: float, grads: float, optimizer: float):
    """DeepSpeed ZeRO (divide over dp, offload to host) and tensor parallelism (divide over tp):
    (weights, gradients, optimizer states on the device, bytes offloaded to the host)."""
    host = 0.0
    z = s.zero_stage or 0
    dp = max(1, s.dp)
    if z >= 1:
        optimizer /= dp
    if z >= 2:
        grads /= dp
    if z >= 3:
        weights /= dp
    if s.offload_optimizer and z >= 2:
        host += optimizer + (trainable * 4.0 / (dp if z >= 1 else 1) if d.mixed else 0.0)
        optimizer = 0.0
    if s.offload_param and z >= 3:
        host += weights
        weights = weights * 0.1  # the gathered working set of a few layers stays on the device
    tp = max(1, s.tp)
    return weights / tp, grads / tp, optimizer / tp, host


def activation_total(shape: ModelShape, s: Setup) -> float:
    """Activation bytes of one micro batch: every layer's, or under checkpointing each layer's input plus the layers
    being recomputed (see GC_LAYERS); plus the head."""
    act = activation_bytes_per_token(shape, s)
    tokens = s.micro_batch_size * s.seq_len
    L = shape.layers
    if s.gradient_checkpointing:
        gc_layers = GC_LAYERS.get(s.device, GC_LAYERS["cuda"])
        return tokens * (L * act["layer_input"] + gc_layers * act["per_layer"] + act["head"])
    return tokens * (L * act["per_layer"] + act["head"])


def step_flops_per_token(shape: ModelShape, s: Setup, fam: str, trainable: float) -> float:
    """Training FLOPs per token: forward + backward through activations + backward for the trained share of the
    weights [+ the recompute under checkpointing]."""
    fwd = shape.flops_per_token(s.seq_len)
    frac = 1.0 if fam in ("full", "galore") else min(1.0, trainable / max(1.0, shape.total_params()))
    return fwd * (1.0 + 1.0 + frac) + (fwd if s.gradient_checkpointing else 0.0)


def estimate(shape: ModelShape, s: Setup) -> Estimate:
    """Bytes on one device per part (module docstring) and the training FLOPs per token."""
    fam = _method_family(s.method)
    d = Dtypes.of(s)
    trainable, frozen, extra_weights = trainable_split(shape, s, fam)
    weights = weight_bytes(shape, s, fam, d, trainable, frozen, extra_weights)
    grads, optimizer = gradient_and_optimizer_bytes(shape, s, fam, d, trainable)
    weights, grads, optimizer, host = shard(s, d, trainable, weights, grads, optimizer)
    parts = {
        "weights": weights,
        "gradients": grads,
        "optimizer": optimizer,
        "activations": activation_total(shape, s),
        "runtime": RUNTIME_BYTES.get(s.device, RUNTIME_BYTES["cuda"]),
    }
    return Estimate(
        total_params=int(shape.total_params()),
        trainable_params=int(trainable),
        parts=parts,
        host_bytes=host,
        flops_per_step_token=step_flops_per_token(shape, s, fam, trainable),
    )


def load_shape(model_path) -> ModelShape:
    return ModelShape.from_path(model_path)
