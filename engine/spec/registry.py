"""Builds the drafter the configuration names."""

from __future__ import annotations

import torch

from engine.config import SpeculativeConfig
from engine.loader import ModelSource
from engine.models import LlamaForCausalLM, build_model
from engine.spec.drafter import Drafter
from engine.spec.layer_skip import LayerSubset, parse_layers
from engine.spec.model_drafter import ModelDrafter
from engine.spec.ngram import NgramDrafter
from engine.spec.sparse_mlp import sparse_network
from kernels.backend import AttentionBackend
from kernels.quantized_cache import PagedCache


def build_drafter(
    config: SpeculativeConfig,
    target: LlamaForCausalLM,
    backend: AttentionBackend,
    kv_caches: list[tuple[PagedCache, PagedCache]],
    block_size: int,
    device: torch.device,
    draft_source: ModelSource | None = None,
    draft_kv_caches: list[tuple[PagedCache, PagedCache]] | None = None,
) -> Drafter | None:
    """The configured drafter; None when speculative decoding is off. ``draft_source`` and ``draft_kv_caches``:
    the draft model and its cache, for speculative_method draft_model."""
    method = config.speculative_method
    if method == "ngram":
        return NgramDrafter(config.ngram_min, config.ngram_max)
    if method == "none":
        return None
    dtype = next(target.parameters()).dtype
    min_acceptance = config.draft_min_acceptance if config.adaptive_draft_length else None
    if method == "layer_skip":
        layers = parse_layers(config.draft_layers, len(target.layers))
        network = LayerSubset(target, layers)
        caches, shares = kv_caches, True
    elif method == "sparse_mlp":
        network, caches, shares = sparse_network(target, config.draft_mlp_density), kv_caches, True
    else:
        assert draft_source is not None and draft_kv_caches is not None
        network = build_model(draft_source, dtype, device, progress=False)
        caches, shares = draft_kv_caches, False
    return ModelDrafter(
        method, network, backend, caches, block_size, device, dtype, shares, min_acceptance, config.draft_entropy_scale
    )
