"""Per-device memory of fine-tuning a Llama-shaped model: full FT, PEFT LoRA (matched count) and S²FT.

A step's peak is modelled as: frozen/trained weights (bf16, int8 or NF4 base) + what training keeps per trained
weight (fp32 master, grad, AdamW's two moments) + the activations autograd saves per token and layer + the
logits and loss + for FSDP the gathered working set (two decoder layers unsharded) + a fixed runtime reserve.
Sharding (FSDP, D devices) divides weights and training state by D. Activation checkpointing keeps each
layer's input per token and recomputes one layer at a time.

The saved-activation counts per token and layer were measured with saved-tensor hooks on CPU (SDPA attention,
fp32 and bf16, three shapes; `tools/bench.py memory` re-measures them on another shape) and are linear in the
hidden size h, the kv width (GQA) and the FFN size I: frozen layers keep 4h + 2kv + 3I elements (norm inputs,
q/k/v/out, SwiGLU terms), full fine-tuning 4h + I more (every linear's input), S²FT only the gathered input
columns of its blocks more, PEFT LoRA its adapters' inputs (fp32 by PEFT's default adapter dtype: 2h + I in an
fp32 model, 4h + I in a bf16 one, where q, k and v each cast their own copy) and rank-r intermediates more.
RMSNorm keeps its fp32 upcast input (2h elements at 4 bytes) in any model dtype.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

GIB = 2**30
NF4_BYTES = 0.5 + 1 / 64  # 4-bit codes + an int8 scale per 64 weights (torchao NF4, double-quantized scales)
INT8_BYTES = 1.0  # + one scale and zero point per output row (added per module below)
RESERVE_BYTES = 2 * GIB  # CUDA context, cuBLAS/attention workspaces, allocator slack


@dataclass(frozen=True)
class Shape:
    """A Llama-family decoder: hidden, layers, FFN, heads, kv heads, vocabulary, tied embeddings."""

    name: str
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False
    o_ratio: float = 0.052  # the paper's recipe for this model
    d_ratio: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_linear_params(self) -> int:
        h, kv, i = self.hidden, self.kv_width, self.intermediate
        return 2 * h * h + 2 * h * kv + 3 * h * i  # q, o, k, v, gate, up, down

    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    def params(self) -> int:
        return self.layers * (self.layer_linear_params() + 2 * self.hidden) + self.embedding_params() + self.hidden

    def s2ft_units(self) -> tuple[int, int]:
        """(O columns, Down columns) per layer the paper's ratios select (at least one head/channel each)."""
        k_o = max(1, round(self.o_ratio * self.heads)) * self.head_dim if self.o_ratio else 0
        k_d = max(1, round(self.d_ratio * self.intermediate)) if self.d_ratio else 0
        return k_o, k_d

    def s2ft_trainable(self) -> int:
        k_o, k_d = self.s2ft_units()
        return self.layers * self.hidden * (k_o + k_d)

    def lora_rank(self) -> int:
        """The uniform LoRA rank on q,k,v,up,down whose count is closest to S²FT's."""
        h, kv, i = self.hidden, self.kv_width, self.intermediate
        per_rank = self.layers * ((h + h) + 2 * (h + kv) + (h + i) + (i + h))
        return max(1, round(self.s2ft_trainable() / per_rank))

    def lora_trainable(self) -> int:
        h, kv, i = self.hidden, self.kv_width, self.intermediate
        return self.lora_rank() * self.layers * ((h + h) + 2 * (h + kv) + (h + i) + (i + h))


SHAPES = {
    "llama2-7b": Shape("llama2-7b", 4096, 32, 11008, 32, 32, 32000),
    "llama2-13b": Shape("llama2-13b", 5120, 40, 13824, 40, 40, 32000),
    "llama3-70b": Shape("llama3-70b", 8192, 80, 28672, 64, 8, 128256, o_ratio=0.0, d_ratio=0.03),
}
METHODS = ("full", "lora", "s2ft")


def base_weight_bytes(shape: Shape, base: str) -> float:
    """Bytes of the frozen base: the decoder's linear weights in ``base`` storage, the rest in bf16."""
    linear = shape.layers * shape.layer_linear_params()
    rest = shape.params() - linear
    per = {"bf16": 2.0, "fp32": 4.0, "int8": INT8_BYTES, "nf4": NF4_BYTES}[base]
    extra = 0.0
    if base == "int8":  # a bf16 scale and zero point per output row of every linear module
        h, kv, i = shape.hidden, shape.kv_width, shape.intermediate
        extra = shape.layers * 4 * (2 * h + 2 * kv + 2 * i + h)
    dense = 4.0 if base == "fp32" else 2.0
    return linear * per + extra + rest * dense


def activation_bytes_per_token_layer(shape: Shape, method: str, dtype_bytes: int = 2) -> float:
    """Saved-for-backward bytes per token and decoder layer (measured forms; see the module docstring)."""
    h, kv, i = shape.hidden, shape.kv_width, shape.intermediate
    norms = (4 - dtype_bytes) * 2 * h  # two RMSNorms keep their fp32 upcast input
    frozen = dtype_bytes * (4 * h + 2 * kv + 3 * i) + norms  # k and v are kv wide (GQA)
    if method == "full":
        return frozen + dtype_bytes * (4 * h + i)  # every linear's input as well
    if method == "frozen":
        return frozen
    if method == "s2ft":
        k_o, k_d = shape.s2ft_units()
        return frozen + dtype_bytes * (k_o + k_d)
    if method == "lora":
        # PEFT casts each adapter's input to its fp32 weights: q, k and v each keep their own copy in a 16-bit
        # model (one shared tensor in an fp32 model), plus up's and down's inputs and the rank-r intermediates.
        inputs = (2 * h + i) if dtype_bytes == 4 else (4 * h + i)
        return frozen + 4 * (inputs + 5 * shape.lora_rank())
    raise ValueError(f"method {method!r}: use one of {METHODS}")


def predict(
    shape: Shape, method: str, *, base: str = "bf16", devices: int = 1, checkpointing: bool = False,
    tokens: int = 2048, dtype_bytes: int = 2, reserve: float = RESERVE_BYTES,
) -> dict[str, float]:  # fmt: skip
    """Per-device bytes of one training step's peak, by part (``total`` is their sum)."""
    if method == "full" and base != "bf16":
        raise ValueError("full fine-tuning trains every weight: it has no frozen quantized base")
    trainable = {"full": shape.params(), "lora": shape.lora_trainable(), "s2ft": shape.s2ft_trainable()}[method]
    weights = base_weight_bytes(shape, base) / devices
    # fp32 master + fp32 grad + AdamW exp_avg + exp_avg_sq per trained weight (full FT: the bf16 copy too)
    state = trainable * (16 + (dtype_bytes if method == "full" else 0)) / devices
    per_layer = activation_bytes_per_token_layer(shape, method, dtype_bytes)
    if checkpointing:
        activations = tokens * (shape.layers * dtype_bytes * shape.hidden + per_layer)
    else:
        activations = tokens * shape.layers * per_layer
    logits = tokens * shape.vocab * (dtype_bytes + 8)  # logits, their fp32 upcast and log-softmax in the loss
    gathered = 2 * shape.layer_linear_params() * 2 if devices > 1 else 0.0  # FSDP: two layers unsharded, bf16
    parts = {"weights": weights, "training_state": state, "activations": activations, "logits": logits,
             "fsdp_gathered": gathered, "reserve": reserve}  # fmt: skip
    parts["total"] = sum(parts.values())
    return parts


def fsdp_traffic(shape: Shape, method: str, devices: int, tokens: int, *, link_gbps: float = 300.0,
                 tflops: float = 400.0) -> dict[str, float]:  # fmt: skip
    """Per-step communication vs compute per device (seconds), and the tokens per device that hide FSDP's.

    FSDP all-gathers the bf16 weights in forward and again in backward; DDP all-reduces only the trained
    weights' gradients (ring: 2·(D-1)/D of them). Compute: 4·P·T FLOPs for partial methods (forward + input
    gradients), 6·P·T for full FT. ``link_gbps`` and ``tflops`` are achieved (not peak) per-GPU figures.
    """
    frac = (devices - 1) / devices
    trainable = {"full": shape.params(), "lora": shape.lora_trainable(), "s2ft": shape.s2ft_trainable()}[method]
    fsdp_bytes = 2 * base_weight_bytes(shape, "bf16") * frac
    ddp_bytes = 2 * trainable * 4 * frac
    flops_per_token = (6 if method == "full" else 4) * shape.params()
    compute = flops_per_token * tokens / devices / (tflops * 1e12)
    fsdp_s = fsdp_bytes / (link_gbps * 1e9)
    return {
        "fsdp_comm_s": fsdp_s,
        "ddp_comm_s": ddp_bytes / (link_gbps * 1e9),
        "compute_s": compute,
        "hidden_from_tokens_per_device": fsdp_s * tflops * 1e12 / flops_per_token,
    }


def fits_table(card_gib: float = 80.0, tokens: int = 2048) -> list[dict[str, Any]]:
    """Every (model, method, base, devices, checkpointing) at ``tokens`` tokens: predicted GiB, whether it fits."""
    rows = []
    for shape in SHAPES.values():
        for method in METHODS:
            for base in ("bf16", "nf4"):
                if method == "full" and base == "nf4":
                    continue
                for devices in (1, 8):
                    if base == "nf4" and devices > 1:
                        continue  # a quantized base under FSDP is not supported (yet)
                    for ckpt in (False, True):
                        p = predict(shape, method, base=base, devices=devices, checkpointing=ckpt, tokens=tokens)
                        rows.append({"model": shape.name, "method": method, "base": base, "devices": devices,
                                     "checkpointing": ckpt, "gib": p["total"] / GIB,
                                     "fits": p["total"] <= card_gib * GIB,
                                     "parts_gib": {k: v / GIB for k, v in p.items() if k != "total"}})  # fmt: skip
    return rows


def shape_dict(shape: Shape) -> dict[str, Any]:
    return asdict(shape)
