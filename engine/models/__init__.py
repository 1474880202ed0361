"""Model definitions and construction from a ``ModelSource``."""

from __future__ import annotations

import torch

from engine.loader import ModelSource
from engine.models.bucketed_linear import BucketedLinear
from engine.models.llama import AttentionContext, LlamaForCausalLM, RotaryEmbedding
from engine.models.quantize import WeightCopies
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
    model files, each weight cut to that shard here.

    ``int4_max_rows`` > 0 adds the compact copies (engine/models/quantize.py): 4-bit ones of the decoder's
    projections for steps of up to that many rows, and a Q8_0 LM head's; the weights are then read in fp32 so that
    the copies start from the exact values; the 4-bit ones are packed for
    ``int4_activations`` (default: ``dtype``; kernels.native.INT8_ACTIVATIONS to quantize fp32 activations)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(source.spec, tp)
    model = model.to_empty(device=device).to(dtype)
    if source.spec.tie_word_embeddings:  # to_empty unties shared parameters
        model.lm_head.weight = model.embed_tokens.weight
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.reset_tables()
    copies = WeightCopies(model, int4_max_rows, int4_activations) if int4_max_rows else None
    shard, head_dim = model.tp.shard, model.spec.head_dim
    weights = source.iter_weights(dtype if copies is None else torch.float32, progress)
    model.load_weights(
        ((name, shard.cut(name, tensor, head_dim)) for name, tensor in weights),
        None if copies is None else copies.copied,
    )
    for module in model.modules():
        if isinstance(module, BucketedLinear):
            module.pack()
    return model.eval().requires_grad_(False)
