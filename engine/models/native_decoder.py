"""A decode step's decoder layers in one native call, where the step and the model allow it.

The layer-by-layer path makes about ten kernel calls per layer through ctypes and PyTorch, and at a few sequences
their fixed cost is most of a decode step: the default model's 4-bit projections take about 1.3 ms of a
one-sequence step that took 5.7. ``NativeDecoder`` hands every layer of such a step to
kernels/csrc/cpu_decode_layers.cpp, which calls the same kernels in the same order, so the hidden states are the
same bit for bit.

It takes a step when all of this holds, and otherwise the layer-by-layer path runs:
- the model is bf16 or fp32 and every projection has a native 4-bit copy (``NativeInt4Weight``) for the step's row
  count, all packed for the same activations (the model's dtype, or fp32 quantized to int8);
- the step is decode rows only (one per sequence, or a few verifying drafts) on the native CPU attention backend;
- the K/V caches are plain blocks of the model's dtype (no block codec) and nothing observes the layers' queries (KV
  policies);
- there is one tensor-parallel rank, and the native attention kernel is built for the model's head size.

The model itself knows nothing of it: engine/model_setup.py builds one for a model with 4-bit copies, and the runner
(engine/model_runner.py) asks it every step whether it takes the step, else runs the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from engine.models.int4_weights import NativeInt4Weight
from kernels.cpu_attention import CpuAttentionMetadata
from kernels.native import (
    DECODER_LAYER_FIELDS,
    INT8_ACTIVATIONS,
    SUPPORTED_HEAD_DIMS,
    DecodeBatch,
    DecoderShape,
    NativeKernels,
)

if TYPE_CHECKING:
    from engine.models.llama import AttentionContext, LlamaForCausalLM, RotaryEmbedding


@dataclass
class NativeDecoder:
    kernels: NativeKernels
    shape: DecoderShape
    weights: torch.Tensor  # int64 [layers, DECODER_LAYER_FIELDS]: the layer table without the caches' addresses
    final_norm: torch.Tensor
    max_rows: int  # the most rows the 4-bit copies take
    activations: torch.dtype  # what the copies are packed for: the model's dtype, or INT8_ACTIVATIONS in fp32
    embed_tokens: nn.Module  # the model's, for the step's residual stream
    rotary: RotaryEmbedding  # the model's, for the step's cos/sin rows

    @classmethod
    def of(cls, model: LlamaForCausalLM) -> NativeDecoder | None:
        """The decoder for ``model`` as loaded, or None where its weights don't allow one."""
        spec = model.spec
        dtype = model.norm.weight.dtype
        if model.tp.world_size != 1 or dtype not in (torch.bfloat16, torch.float32) or not len(model.layers):
            return None
        if spec.head_dim not in SUPPORTED_HEAD_DIMS or spec.num_heads % spec.num_kv_heads:
            return None  # the attention kernel has no instantiation for it: fail here, not halfway through a step
        rows: list[list[int]] = []
        max_rows = []
        kernels = None
        first = model.layers[0].self_attn.qkv_proj.compact
        activations = first.activations if isinstance(first, NativeInt4Weight) else None
        if activations not in (dtype, INT8_ACTIVATIONS if dtype == torch.float32 else dtype):
            return None
        for layer in model.layers:
            attention, mlp = layer.self_attn, layer.mlp
            projections = (attention.qkv_proj, attention.o_proj, mlp.gate_up_proj, mlp.down_proj)
            compacts = [projection.compact for projection in projections]
            if not all(
                isinstance(compact, NativeInt4Weight) and compact.activations == activations for compact in compacts
            ):
                return None
            kernels = compacts[0].kernels
            max_rows.extend(projection.compact_max_rows for projection in projections)
            qkv, o, gate_up, down = (compact.packed.data_ptr() for compact in compacts)
            norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
            if any(norm.dtype != dtype or not norm.is_contiguous() for norm in norms):
                return None
            rows.append([norms[0].data_ptr(), qkv, o, norms[1].data_ptr(), gate_up, down, 0, 0])
        assert kernels is not None and len(rows[0]) == DECODER_LAYER_FIELDS
        shape = DecoderShape(
            layers=spec.num_layers,
            hidden=spec.hidden_size,
            heads=spec.num_heads,
            kv_heads=spec.num_kv_heads,
            head_dim=spec.head_dim,
            intermediate=spec.intermediate_size,
            block_size=0,  # the caches'
            eps=spec.rms_norm_eps,
            scale=model.layers[0].self_attn.scale,
        )
        weights = torch.tensor(rows, dtype=torch.int64)
        final_norm = model.norm.weight.detach()
        return cls(kernels, shape, weights, final_norm, min(max_rows), activations, model.embed_tokens, model.rotary)

    def accepts(self, rows: int, ctx: AttentionContext) -> bool:
        metadata = ctx.metadata
        return (
            rows <= self.max_rows
            and ctx.query_observer is None
            and isinstance(metadata, CpuAttentionMetadata)
            and isinstance(metadata.decode, DecodeBatch)
            and metadata.num_decodes == rows
            and not metadata.prefills
            and not metadata.fresh_prompts
            and all(self._plain(cache) for pair in ctx.kv_caches for cache in pair)
        )

    def _plain(self, cache: object) -> bool:
        return type(cache) is torch.Tensor and cache.dtype == self.final_norm.dtype and cache.is_contiguous()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """The final norm's output for a step ``accepts`` took, as the model's forward gives it."""
        embeddings = self.embed_tokens(input_ids)
        rotary = self.rotary.angles(positions, embeddings.dtype)
        metadata = ctx.metadata
        assert isinstance(metadata, CpuAttentionMetadata) and isinstance(metadata.decode, DecodeBatch)
        table = self.weights.clone()
        table[:, DECODER_LAYER_FIELDS - 2 :] = torch.tensor(
            [[key.data_ptr(), value.data_ptr()] for key, value in ctx.kv_caches], dtype=torch.int64
        )
        self.shape.block_size = ctx.kv_caches[0][0].shape[1]
        return self.kernels.decode_layers(
            table,
            self.shape,
            metadata.decode,
            self.final_norm,
            embeddings,
            rotary.cos,
            rotary.sin,
            metadata.slot_mapping,
            self.activations,
        )
