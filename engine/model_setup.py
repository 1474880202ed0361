"""Build one rank's part of the model: its attention backend, weights (its shard), KV cache and runner. The engine
(rank 0) and every tensor-parallel worker build theirs here, so all ranks agree on shapes and block counts."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.config import EngineConfig
from engine.errors import ConfigError
from engine.kv_cache import KVCacheLayout, allocate_kv_cache
from engine.kv_policy import QueryRecorder
from engine.kv_policy.residuals import ResidualBuffers
from engine.loader import ModelSource
from engine.model_runner import ModelRunner
from engine.model_spec import ModelSpec
from engine.models import build_model
from engine.models.native_decoder import NativeDecoder
from engine.models.quantize import int4_rows_for
from engine.parallel.group import TensorParallelGroup
from engine.parallel.shard import TensorShard
from kernels.cpu_attention import warm_up_prefill_attention
from kernels.kv_codecs import CodecSettings
from kernels.registry import get_attention_backend, with_page_selection


@dataclass(frozen=True)
class KVCachePlan:
    layout: KVCacheLayout  # this rank's: its own KV heads only
    num_blocks: int  # the same on every rank, since the block tables are
    codecs: CodecSettings
    num_residual_slots: int  # under block codecs, each running sequence's filling block sits in a full-precision slot


def plan_kv_cache(
    config: EngineConfig, spec: ModelSpec, shard: TensorShard, extra_bytes_per_block: int = 0
) -> KVCachePlan:
    """``kv_cache_memory`` is each rank's budget; the rank with the most KV heads decides how many blocks fit.
    ``extra_bytes_per_block``: what else each block holds (a draft model's rows)."""
    cache = config.cache
    codecs = cache.codec_settings()
    num_slots = config.scheduler.max_num_seqs if codecs.active else 0
    layouts = [
        KVCacheLayout.for_model(
            TensorShard.of(spec, rank, shard.world_size).local_spec(spec),
            cache.block_size,
            config.model.torch_dtype,
            cache.kv_cache_dtype,
            codecs,
        )
        for rank in range(shard.world_size)
    ]
    largest = max(layouts, key=lambda layout: layout.bytes_per_block)
    num_blocks = largest.num_blocks_for(cache.kv_cache_bytes(), num_slots, extra_bytes_per_block)
    return KVCachePlan(layouts[shard.rank], num_blocks, codecs, num_slots)


def build_runner(
    config: EngineConfig,
    source: ModelSource,
    kv_plan: KVCachePlan,
    tp: TensorParallelGroup,
    device: torch.device,
    progress: bool = True,
    query_recorder: QueryRecorder | None = None,
) -> ModelRunner:
    layout = kv_plan.layout
    page_selection = config.cache.page_selection()
    try:
        backend = get_attention_backend(
            config.runtime.attention_backend,
            device,
            layout.head_dim,
            quantized_cache=layout.bits is not None,
            block_codec=kv_plan.codecs,
            query_decay=1 - 1 / config.cache.kv_observation_window,
            page_selection=page_selection is not None,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    rows = int4_rows_for(config.model, source.linear_weights_are_q4_1, device)
    model = build_model(source, config.model.torch_dtype, device, progress, tp, rows, config.model.int4_activations)
    model.warm_up(config.scheduler.max_num_batched_tokens, config.scheduler.max_num_seqs)
    if device.type == "cpu":
        spec = model.spec
        warm_up_prefill_attention(
            spec.num_heads,
            spec.num_kv_heads,
            spec.head_dim,
            config.model.torch_dtype,
            config.scheduler.max_num_batched_tokens,
        )
    kv_caches = allocate_kv_cache(layout, kv_plan.num_blocks, device, kv_plan.num_residual_slots)
    if page_selection is not None:
        backend = with_page_selection(backend, page_selection, [keys for keys, _ in kv_caches])
    residuals = ResidualBuffers(kv_plan.num_residual_slots, layout.block_size) if kv_plan.codecs.active else None
    decoder = NativeDecoder.of(model) if rows else None
    return ModelRunner(model, backend, kv_caches, layout.block_size, device, query_recorder, residuals, decoder)
