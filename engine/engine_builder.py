"""Builds an engine's parts from its configuration: the KV cache plan, the model runner (the model load), the
scheduler, and the step hooks of the features configured (engine/step_hooks/)."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import torch

from engine.config import EngineConfig
from engine.errors import ConfigError
from engine.kv_cache import KVCacheLayout, allocate_kv_cache
from engine.kv_offload import KVOffloader, build_offload, check_swap_space
from engine.kv_policy import EvictionPolicy, KVCompactor, PageSelectionPolicy, QueryRecorder
from engine.loader import ModelSource
from engine.model_runner import ModelRunner
from engine.model_setup import build_runner, plan_kv_cache
from engine.model_spec import ModelSpec
from engine.models.quantize import int4_rows_for
from engine.output_builder import RequestState
from engine.outputs import EngineCounters
from engine.parallel.launch import LocalRank
from engine.spec.draft_length import DraftLengthController
from engine.spec.draft_model import open_draft_model
from engine.spec.registry import build_drafter
from engine.step_hooks import StepHook, StepHooks
from engine.step_hooks.compaction import CompactionHook
from engine.step_hooks.offload import OffloadHook
from engine.step_hooks.page_selection import PageSelectionCounters
from engine.step_hooks.speculation import SpeculationHook
from kernels.native import INT8_ACTIVATIONS
from kernels.page_selecting_backend import PageSelectingBackend
from scheduler.config import SchedulerConfig
from scheduler.kv_cache_manager import KVCacheManager
from scheduler.preemption import PreemptionPolicy
from scheduler.scheduler import Scheduler

logger = logging.getLogger("spindle.engine")


@dataclass
class EngineParts:
    scheduler_config: SchedulerConfig  # the configured one, with max_model_len resolved
    max_model_len: int
    kv_layout: KVCacheLayout
    num_kv_blocks: int
    load_seconds: float
    runner: ModelRunner
    preemption: PreemptionPolicy
    offloader: KVOffloader | None
    kv_manager: KVCacheManager
    scheduler: Scheduler
    hooks: StepHooks


def check_combinations(config: EngineConfig) -> None:
    """Refuse the features that cannot be combined, before any rank starts."""
    runtime = config.runtime
    policy = config.cache.eviction_policy()
    if policy is not None and runtime.tensor_parallel_size > 1:
        # The compactor rewrites every KV head's rows on one rank, from that rank's queries.
        raise ConfigError("a kv_policy cannot be combined with tensor_parallel_size > 1")
    offload = config.cache.preemption_mode != "recompute" or config.cache.kv_disk_dir is not None
    if offload and (runtime.tensor_parallel_size > 1 or config.cache.codec_settings().active):
        # The offloader copies rank 0's blocks as stored; codec blocks keep state outside them (residuals).
        raise ConfigError("preemption_mode swap/auto and kv_disk_dir need tensor_parallel_size 1 and no block codec")
    method = config.speculative.speculative_method
    if method in ("layer_skip", "sparse_mlp", "draft_model") and runtime.tensor_parallel_size > 1:
        # The drafter runs on rank 0 alone, over the target's layers or a model of its own.
        raise ConfigError(f"speculative_method {method} needs tensor_parallel_size 1")
    if offload and method == "draft_model":
        raise ConfigError("preemption_mode swap/auto and kv_disk_dir cannot be combined with a draft model")
    if offload and config.cache.page_selection() is not None:
        raise ConfigError("preemption_mode swap/auto and kv_disk_dir cannot be combined with kv_policy quest")
    if config.cache.codec_settings().active and runtime.tensor_parallel_size > 1:
        raise ConfigError(
            "block codecs (kv_codec, kv_key_channel_keep) cannot be combined with tensor_parallel_size > 1"
        )


def build_engine(
    config: EngineConfig,
    source: ModelSource,
    ranks: LocalRank,
    model_name: str,
    states: dict[str, RequestState],
    counters: EngineCounters,
    progress: bool,
) -> EngineParts:
    """Rank 0's parts. ``states`` (the engine's live requests) and ``counters`` are the engine's, for the hooks."""
    torch.set_num_threads(ranks.num_threads)
    spec, device = source.spec, ranks.device
    policy = config.cache.eviction_policy()
    dtype = config.model.torch_dtype
    speculative = config.speculative
    draft_source = draft_layout = None
    if speculative.draft_model is not None:
        if config.cache.kv_cache_dtype != "auto":
            raise ConfigError("speculative_method draft_model needs kv_cache_dtype auto")
        draft_source = open_draft_model(speculative.draft_model, source)
        draft_layout = KVCacheLayout.for_model(draft_source.spec, config.cache.block_size, dtype)
    # A draft model's KV rows live in the same blocks as the target's: each block pays for both.
    draft_bytes = 0 if draft_layout is None else draft_layout.bytes_per_block
    kv_plan = plan_kv_cache(config, spec, ranks.tp.shard, draft_bytes)
    layout, num_blocks = kv_plan.layout, kv_plan.num_blocks
    codecs, num_slots = kv_plan.codecs, kv_plan.num_residual_slots
    check_swap_space(config.cache, layout)  # a configuration error before the slow model load
    page_selection = config.cache.page_selection()
    max_model_len = resolve_max_model_len(
        spec, config.scheduler.max_model_len, num_blocks * layout.block_size if policy is None else None
    )
    scheduler_config = dataclasses.replace(config.scheduler, max_model_len=max_model_len)
    recorder = None
    if policy is not None and policy.uses_queries:
        recorder = QueryRecorder(config.cache.kv_observation_window)
    started = time.monotonic()
    runner = build_runner(config, source, kv_plan, ranks.tp, device, progress, recorder)
    ranks.tp.barrier()  # the workers have loaded their shards too
    load_seconds = time.monotonic() - started
    kv_caches = runner.kv_caches
    backend = runner.backend
    prefix_caching = config.cache.enable_prefix_caching
    if codecs.prunes_keys and prefix_caching:
        logger.info("prefix caching off: ThinK picks each block's key channels by the request's own queries")
        prefix_caching = False
    compactor: KVCompactor | None = None
    if policy is not None:
        compactor = KVCompactor(policy, kv_caches, layout.block_size, dtype, spec.head_dim**-0.5, recorder)
        if prefix_caching:
            logger.info("prefix caching off: kv_policy %s rewrites each request's blocks in place", policy.name)
            prefix_caching = False
    if draft_source is not None and draft_source.spec.max_position_embeddings < max_model_len:
        raise ConfigError(
            f"draft_model {speculative.draft_model}: context of "
            f"{draft_source.spec.max_position_embeddings} tokens, "
            f"shorter than max_model_len {max_model_len}: lower max_model_len"
        )
    drafter = build_drafter(
        speculative,
        runner.model,
        backend,
        kv_caches,
        layout.block_size,
        device,
        draft_source,
        None if draft_layout is None else allocate_kv_cache(draft_layout, num_blocks, device),
    )
    if drafter is not None and policy is not None:
        # A compaction moves KV rows that rejected drafts would then have to give back.
        raise ConfigError("speculative decoding cannot be combined with a kv_policy")
    if drafter is not None and codecs.active:
        # Drafts that fill a block seal it; rejecting them would need the block's rows back in full precision.
        raise ConfigError(f"speculative decoding cannot be combined with block codecs ({codecs.describe()})")
    if config.cache.kv_disk_dir is not None and not prefix_caching:
        logger.info("prefix-cache disk tier off: it needs prefix caching")
    int4_rows = int4_rows_for(config.model, source.linear_weights_are_q4_1, device)
    preemption, offloader = build_offload(
        config.cache, layout, kv_caches, source, prefix_caching, int4_rows, config.model.int4_activations
    )
    disk_store = offloader.disk_store if offloader is not None else None
    kv_manager = KVCacheManager(num_blocks, layout.block_size, prefix_caching, disk_store)
    scheduler = Scheduler(scheduler_config, kv_manager, None if policy is None else policy.budget, preemption)
    if scheduler.max_kv_tokens(max_model_len) > num_blocks * layout.block_size:  # only under a policy
        if offloader is not None:
            offloader.close()
        raise ConfigError(
            f"kv_budget {config.cache.kv_budget} plus one step's tokens does not fit the KV cache "
            f"({num_blocks * layout.block_size} tokens): raise kv_cache_memory, or lower kv_budget or "
            "max_num_batched_tokens"
        )
    hooks: list[StepHook] = []  # in the order they run
    if drafter is not None:
        lengths = DraftLengthController(
            speculative.num_speculative_tokens,
            speculative.max_speculative_tokens,
            speculative.adaptive_draft_length,
            speculative.draft_min_acceptance,
            pause_on_low_acceptance=not drafter.stops_on_entropy,
        )
        cutoff = speculative.speculative_max_batch_size
        hooks.append(SpeculationHook(drafter, lengths, cutoff, scheduler, states, counters))
    if offloader is not None:
        hooks.append(OffloadHook(offloader, kv_manager, counters))
    if compactor is not None:
        hooks.append(CompactionHook(compactor, scheduler, counters))
    if isinstance(backend, PageSelectingBackend):
        hooks.append(PageSelectionCounters(backend, counters))
    logger.info(
        "model %s loaded in %.1fs (%s, %s, %d tensor-parallel rank(s); 4-bit weight copies: %s); KV cache (%s, "
        "codec %s): %d blocks of %d tokens = %d tokens, %.1f MiB per rank (%.1f bytes per token) + %.1f MiB of "
        "full-precision residual; attention backend: %s; kv policy: %s; speculative decoding: %s; "
        "preemption: %s; disk tier: %s",
        model_name,
        load_seconds,
        str(dtype).removeprefix("torch."),
        device,
        ranks.tp.world_size,
        _describe_int4(int4_rows, config.model.int4_activations),
        layout.kv_cache_dtype,
        codecs.describe(),
        num_blocks,
        layout.block_size,
        num_blocks * layout.block_size,
        num_blocks * layout.bytes_per_block / 2**20,
        layout.bytes_per_token,
        layout.residual_bytes(num_slots) / 2**20,
        backend.name,
        _policy_description(policy, page_selection),
        "off" if drafter is None else f"{drafter.name}, k={speculative.num_speculative_tokens}",
        config.cache.preemption_mode,
        "off" if disk_store is None else f"{disk_store.directory} ({disk_store.num_blocks} blocks stored)",
    )
    return EngineParts(
        scheduler_config,
        max_model_len,
        layout,
        num_blocks,
        load_seconds,
        runner,
        preemption,
        offloader,
        kv_manager,
        scheduler,
        StepHooks(hooks),
    )


def resolve_max_model_len(spec: ModelSpec, asked: int | None, kv_tokens: int | None) -> int:
    """The context window: as asked, else the model's own, capped so that one sequence fits the KV cache
    (``kv_tokens``; None when an eviction policy bounds each sequence's KV instead)."""
    model_len = spec.max_position_embeddings
    if kv_tokens is None:
        kv_tokens = model_len
    if asked is not None:
        if asked > model_len:
            raise ConfigError(f"max_model_len {asked} exceeds the model's context length {model_len}")
        if asked > kv_tokens:
            raise ConfigError(
                f"max_model_len {asked} does not fit the KV cache ({kv_tokens} tokens): "
                "raise kv_cache_memory or lower max_model_len"
            )
        return asked
    if kv_tokens < model_len:
        logger.warning("max_model_len capped at %d tokens, what the KV cache holds", kv_tokens)
    return min(model_len, kv_tokens)


def _policy_description(policy: EvictionPolicy | None, page_selection: PageSelectionPolicy | None) -> str:
    if policy is not None:
        return f"{policy.name} (budget {policy.budget} rows per sequence)"
    if page_selection is not None:
        return f"{page_selection.name} (decode reads {page_selection.budget_blocks} blocks per sequence)"
    return "none"


def _describe_int4(rows: int, activations: torch.dtype) -> str:
    if not rows:
        return "none"
    quantized = " with int8-quantized activations" if activations == INT8_ACTIVATIONS else ""
    return f"steps of up to {rows} tokens{quantized}"
