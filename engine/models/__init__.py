"""Model definitions and construction from a ``ModelSource``."""

from __future__ import annotations

import torch

from engine.loader import ModelSource
from engine.models.bucketed_linear import BucketedLinear
from engine.models.llama import AttentionContext, LlamaForCausalLM, RotaryEmbedding
from engine.parallel.group import TensorParallelGroup

__all__ = ["AttentionContext", "LlamaForCausalLM", "build_model"]


def build_model(
    source: ModelSource,
    dtype: torch.dtype,
    device: torch.device,
    progress: bool = True,
    tp: TensorParallelGroup | None = None,
    int4_max_rows: int = 0,
    int4_activations: torch.dtype | None = None,
) -> LlamaForCausalLM:
    """Build the architecture (``tp``'s shard of it) without initialising weights (on "meta"), then fill it from the
    model files.

    ``int4_max_rows`` > 0 adds 4-bit copies of the decoder's projections for steps of up to that many rows; the
    weights are then read in fp32 so that the copies start from the exact values; they are packed for
    ``int4_activations`` (default: ``dtype``; kernels.native.INT8_ACTIVATIONS to quantize fp32 activations)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(source.spec, tp)
    model = model.to_empty(device=device).to(dtype)
    if source.spec.tie_word_embeddings:  # to_empty unties shared parameters
        model.lm_head.weight = model.embed_tokens.weight
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.reset_tables()
    load_dtype = torch.float32 if int4_max_rows else dtype
    model.load_weights(source.iter_weights(load_dtype, progress), int4_max_rows, int4_activations)
    for module in model.modules():
        if isinstance(module, BucketedLinear):
            module.pack()
    return model.eval().requires_grad_(False)
