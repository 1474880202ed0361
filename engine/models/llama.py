"""A Llama-family decoder (Llama, Mistral, SmolLM): RMSNorm, RoPE, grouped-query attention, SwiGLU MLP.

The model takes one flat batch of tokens from many sequences ([T] ids and positions). Attention goes through an
``AttentionBackend`` that owns how K/V are stored (paged blocks) and read. Q/K/V and gate/up projections are fused
into single matmuls, which matters on the CPU where each matmul call has a fixed cost; for the same reason each
norm adds the residual in its own pass, and the elementwise chains run as one kernel each there
(engine/models/layer_ops.py).

Under tensor parallelism each rank builds this model from its ``TensorShard``'s local spec (its own heads,
intermediate units and vocabulary rows): QKV and gate/up are column-parallel, O and down row-parallel with their
outputs summed across ranks, the embedding and LM head vocab-parallel (engine/parallel/). Its weights arrive already
cut to that shard (``build_model``); quantized copies (quantize.py) and the native decoder (native_decoder.py) are
applied from outside, so this file describes only the model.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from engine.errors import ModelLoadError
from engine.model_spec import ModelSpec
from engine.models.bucketed_linear import BucketedLinear
from engine.models.layer_ops import RotaryAngles, layer_ops_for
from engine.parallel.group import TensorParallelGroup
from engine.parallel.shard import TensorShard
from kernels.backend import AttentionBackend
from kernels.quantized_cache import PagedCache


@dataclass
class AttentionContext:
    """What every attention layer of one step needs: the backend, its per-step metadata and the KV caches."""

    backend: AttentionBackend
    metadata: Any
    kv_caches: list[tuple[PagedCache, PagedCache]]
    # Called with (layer index, rotated queries [T, heads, head_dim]) by every layer, for KV policies that need them.
    query_observer: Callable[[int, torch.Tensor], None] | None = None


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """RMSNorm of ``x``, or with ``residual`` (the residual stream) of ``residual + x``, which ``residual``
        then holds."""
        return layer_ops_for(x.device.type).rms_norm(x, self.weight, self.eps, residual)


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE with a precomputed cos/sin table indexed by absolute position."""

    def __init__(self, head_dim: int, max_positions: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.max_positions, self.theta = head_dim, max_positions, theta
        self.register_buffer("cos", torch.empty(max_positions, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_positions, head_dim), persistent=False)
        self.reset_tables()

    def reset_tables(self) -> None:
        """(Re)compute the tables in fp32 on the buffers' device, e.g. after the model was built on "meta"."""
        if self.cos.is_meta:
            return
        device = self.cos.device
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        inv_freq = 1.0 / (self.theta**exponents)
        freqs = torch.outer(torch.arange(self.max_positions, dtype=torch.float32, device=device), inv_freq)
        angles = torch.cat((freqs, freqs), dim=-1)
        self.cos = angles.cos()
        self.sin = angles.sin()

    def angles(self, positions: torch.Tensor, dtype: torch.dtype) -> RotaryAngles:
        """The step's cos/sin rows, looked up once for every layer (a per-layer lookup was ~10% of a decode step)."""
        return RotaryAngles(self.cos[positions].to(dtype), self.sin[positions].to(dtype))


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, layer_index: int, tp: TensorParallelGroup) -> None:
        super().__init__()
        self.spec = spec
        self.tp = tp
        self.layer_index = layer_index
        self.qkv_proj = BucketedLinear(spec.hidden_size, spec.q_size + 2 * spec.kv_size, bias=False)
        self.o_proj = BucketedLinear(spec.q_size, spec.hidden_size, bias=False)
        self.scale = spec.head_dim**-0.5

    def forward(self, rotary: RotaryAngles, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        spec = self.spec
        qkv = self.qkv_proj(x)
        q, k = layer_ops_for(x.device.type).rotary_qk(qkv, spec.num_heads, spec.num_kv_heads, rotary)
        v = qkv[:, spec.q_size + spec.kv_size :].view(-1, spec.num_kv_heads, spec.head_dim)
        if ctx.query_observer is not None:
            ctx.query_observer(self.layer_index, q)
        key_cache, value_cache = ctx.kv_caches[self.layer_index]
        out = ctx.backend.forward(q, k, v, key_cache, value_cache, ctx.metadata, self.scale)
        return self.tp.all_reduce(self.o_proj(out.reshape(-1, spec.q_size)))


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec, tp: TensorParallelGroup) -> None:
        super().__init__()
        self.tp = tp
        self.gate_up_proj = BucketedLinear(spec.hidden_size, 2 * spec.intermediate_size, bias=False)
        self.down_proj = BucketedLinear(spec.intermediate_size, spec.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = layer_ops_for(x.device.type).silu_and_mul(self.gate_up_proj(x))
        return self.tp.all_reduce(self.down_proj(activated))


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, layer_index: int, tp: TensorParallelGroup) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec, layer_index, tp)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = MLP(spec, tp)

    def forward(
        self,
        rotary: RotaryAngles,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        ctx: AttentionContext,
        mlp: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` is the previous layer's MLP output, not yet added to ``residual`` (the embeddings, with None, for
        the first layer): each norm adds its sublayer's input in the same pass. Returns this layer's MLP output
        and the residual stream before it. ``mlp`` stands in for the layer's own (a sparse draft's,
        engine/spec/sparse_mlp.py)."""
        if residual is None:
            residual, hidden = x, self.input_layernorm(x)
        else:
            hidden = self.input_layernorm(x, residual)
        hidden = self.self_attn(rotary, hidden, ctx)
        hidden = self.post_attention_layernorm(hidden, residual)
        return (mlp or self.mlp)(hidden), residual


class VocabParallelEmbedding(nn.Embedding):
    """The embedding rows of this rank's vocabulary shard; ids outside it contribute zeros to the all-reduce."""

    def __init__(self, spec: ModelSpec, tp: TensorParallelGroup) -> None:
        super().__init__(spec.vocab_size, spec.hidden_size)
        self.tp = tp
        self.vocab_start = tp.shard.vocab[0]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return super().forward(input_ids)
        local = input_ids - self.vocab_start
        inside = (local >= 0) & (local < self.num_embeddings)
        rows = nn.functional.embedding(local.where(inside, 0), self.weight)
        return self.tp.all_reduce(rows * inside.unsqueeze(-1).to(rows.dtype))


class LlamaForCausalLM(nn.Module):
    def __init__(self, spec: ModelSpec, tp: TensorParallelGroup | None = None) -> None:
        """``spec`` is the whole model's; ``tp`` says which shard of it this rank holds (default: all of it)."""
        super().__init__()
        self.tp = tp or TensorParallelGroup(TensorShard.whole(spec))
        self.full_spec = spec
        spec = self.tp.shard.local_spec(spec)
        self.spec = spec
        self.rotary = RotaryEmbedding(spec.head_dim, spec.max_position_embeddings, spec.rope_theta)
        self.embed_tokens = VocabParallelEmbedding(spec, self.tp)
        self.layers = nn.ModuleList(DecoderLayer(spec, i, self.tp) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = BucketedLinear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """Flat batch [T] -> final hidden states [T, hidden] (normalised)."""
        return self.run_layers(input_ids, positions, ctx, range(len(self.layers)))

    def run_layers(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        ctx: AttentionContext,
        layers: Iterable[int],
        mlps: Iterable[Callable[[torch.Tensor], torch.Tensor] | None] | None = None,
    ) -> torch.Tensor:
        """The forward pass through only ``layers`` (in order), each with the matching ``mlps`` entry in place of
        its own MLP where that is not None: the embedding, those layers, the final norm."""
        x = self.embed_tokens(input_ids)
        rotary = self.rotary.angles(positions, x.dtype)
        residual = None
        for index, mlp in zip(layers, mlps if mlps is not None else itertools.repeat(None)):
            x, residual = self.layers[index](rotary, x, residual, ctx, mlp)
        return self.norm(x, residual)

    def warm_up(self, max_tokens: int, max_sequences: int) -> None:
        """Compile now the matmul kernels of every row bucket a step can use (see BucketedLinear): the kernel cache
        then stops growing after start-up, and no request waits for a compilation. Every layer shares the shapes."""
        attention, mlp = self.layers[0].self_attn, self.layers[0].mlp
        for linear in (attention.qkv_proj, attention.o_proj, mlp.gate_up_proj, mlp.down_proj):
            linear.warm_up(max_tokens)
        self.lm_head.warm_up(max_sequences)  # logits are computed for the sampled rows only

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits over the whole vocabulary; under tensor parallelism on rank 0 only (None on the others)."""
        return self.tp.gather_vocab(self.lm_head(hidden).float())

    def load_weights(
        self,
        weights: Iterable[tuple[str, torch.Tensor]],
        on_copy: Callable[[str, int, torch.Tensor], None] | None = None,
    ) -> None:
        """Copy Hugging Face-named tensors in (already cut to this rank's shard), fusing q/k/v and gate/up into their
        combined projections. ``on_copy`` is told (parameter name, first row, tensor as given) after each copy, e.g.
        to build quantized copies from the unrounded values (engine/models/quantize.py)."""
        spec = self.spec
        fused_slices = {
            "q_proj": ("qkv_proj", 0, spec.q_size),
            "k_proj": ("qkv_proj", spec.q_size, spec.kv_size),
            "v_proj": ("qkv_proj", spec.q_size + spec.kv_size, spec.kv_size),
            "gate_proj": ("gate_up_proj", 0, spec.intermediate_size),
            "up_proj": ("gate_up_proj", spec.intermediate_size, spec.intermediate_size),
        }
        params = dict(self.named_parameters())
        # A fused parameter is complete once each of its parts arrived.
        parts_needed = {name: 3 if "qkv_proj" in name else 2 if "gate_up_proj" in name else 1 for name in params}
        parts_loaded: Counter[str] = Counter()
        for hf_name, tensor in weights:
            name = hf_name.removeprefix("model.")
            if name == "lm_head.weight" and spec.tie_word_embeddings:
                continue
            parts = name.split(".")
            target, offset, length = name, 0, None
            if len(parts) >= 2 and parts[-2] in fused_slices:
                fused, offset, length = fused_slices[parts[-2]]
                target = ".".join([*parts[:-2], fused, parts[-1]])
            if target not in params:
                raise ModelLoadError(f"unexpected weight {hf_name!r} for a {spec.architecture} model")
            param = params[target]
            destination = param.data if length is None else param.data[offset : offset + length]
            if destination.shape != tensor.shape:
                raise ModelLoadError(
                    f"weight {hf_name!r} has shape {tuple(tensor.shape)}, expected {tuple(destination.shape)}"
                )
            destination.copy_(tensor)
            parts_loaded[target] += 1
            if on_copy is not None:
                on_copy(target, offset, tensor)
        missing = [name for name, needed in parts_needed.items() if parts_loaded[name] < needed]
        if missing:
            raise ModelLoadError(f"weights missing from the model files: {', '.join(missing[:5])}")
