"""Engine configuration: dataclass sections, YAML presets in ``configs/``, environment and command-line overrides.

Every field of every section is settable from a preset file, from a ``SPINDLE_<FIELD>`` environment variable and
from a ``--flag`` of the same name (underscores become dashes), so the dataclass defaults below are the single
source of truth for defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
import yaml

from engine.errors import ConfigError
from engine.kv_cache import KV_CACHE_BITS
from engine.kv_policy import EvictionPolicy, PageSelectionPolicy, build_eviction_policy, build_page_selection
from kernels.cpu_profile import CpuProfileError, cpu_profile
from kernels.kv_codecs import CodecSettings
from kernels.native import INT8_ACTIVATIONS
from scheduler.config import SchedulerConfig
from scheduler.preemption import PREEMPTION_MODES

ENV_PREFIX = "SPINDLE_"
CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTO_DTYPE = "auto"  # bfloat16 where the CPU multiplies it in hardware, else float32 (ModelConfig.torch_dtype)
WEIGHT_QUANTIZATIONS = ("auto", "none", "int4")
ACTIVATION_QUANTIZATIONS = ("none", "int8")
_SIZE_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}


@dataclass
class ModelConfig:
    model: str | None = None  # a .gguf file or a Hugging Face directory; None: the embedded default model
    served_model_name: str | None = None
    # auto | bfloat16 | float16 | float32. auto: bfloat16 on a CPU with bf16 dot products (AVX512-BF16, AMX), float32
    # elsewhere, where bf16 matmuls are emulated (measured on AVX2: 28.5 ms per token against fp32's 4-bit kernels'
    # far less, and a collapse at batch size). On a GPU, name the dtype.
    dtype: str = AUTO_DTYPE
    seed: int = 0
    # auto | none | int4: 4-bit weight-only copies of the decoder's linear layers for small steps on the CPU (auto:
    # int4 in bfloat16 or float32 when the model's own weights are GGUF Q4_1, which the copies reproduce exactly and
    # the native kernels take; none otherwise)
    weight_quantization: str = "auto"
    # Steps of at most this many tokens use the 4-bit copies, larger ones the dense weights. None: where the copies'
    # kernel stops beating the dense weights (measured: 16 rows for the native kernel on AMX tiles, 48 on AVX512-BF16
    # vectors, 4 for PyTorch's; engine/models/quantize.py).
    int4_max_rows: int | None = None
    # none | int8. int8: with float32 activations, the 4-bit copies' native kernel quantizes each row's activations
    # to int8 per group of 32 channels (scale max|x| / 127, as llama.cpp does) and multiplies in integers: lossy
    # (greedy tokens may differ from the fp32 model's), faster on CPUs without bf16 dot products. No effect in bf16.
    activation_quantization: str = "none"

    def __post_init__(self) -> None:
        _ = self.torch_dtype  # validates the name now rather than when the model is loaded
        if self.weight_quantization not in WEIGHT_QUANTIZATIONS:
            raise ValueError(
                f"weight_quantization must be one of {', '.join(WEIGHT_QUANTIZATIONS)}, "
                f"got {self.weight_quantization!r}"
            )
        if self.activation_quantization not in ACTIVATION_QUANTIZATIONS:
            raise ValueError(
                f"activation_quantization must be one of {', '.join(ACTIVATION_QUANTIZATIONS)}, "
                f"got {self.activation_quantization!r}"
            )
        if self.int4_max_rows is not None and self.int4_max_rows < 1:
            raise ValueError(f"int4_max_rows must be >= 1, got {self.int4_max_rows}")

    @property
    def int4_activations(self) -> torch.dtype:
        """The activation type the 4-bit copies are packed for: the model's dtype, or INT8_ACTIVATIONS (fp32
        activations quantized inside the kernel)."""
        dtype = self.torch_dtype
        return INT8_ACTIVATIONS if self.activation_quantization == "int8" and dtype == torch.float32 else dtype

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == AUTO_DTYPE:
            try:
                return torch.bfloat16 if cpu_profile().has_native_bf16 else torch.float32
            except CpuProfileError as exc:
                raise ConfigError(str(exc)) from None
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {AUTO_DTYPE}, {', '.join(DTYPES)}, got {self.dtype!r}")
        return DTYPES[self.dtype]


@dataclass
class CacheConfig:
    block_size: int = 16
    kv_cache_memory: str = "1GiB"  # bytes ("2GiB", "500MB", "1073741824") or a fraction of total RAM ("0.1")
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"  # auto (the model's dtype) | int8 | int4: per-token quantized K/V
    kv_policy: str = "none"  # none | sink_window | key_norm | snapkv | evict_merge | quest (engine/kv_policy)
    # KV rows each request keeps per layer and KV head under an eviction policy; under quest, the rows (in whole
    # blocks) each decode token reads
    kv_budget: int = 512
    kv_sink_tokens: int = 4  # first rows always kept
    kv_window_tokens: int = 32  # most recent rows always kept
    kv_observation_window: int = 32  # recent queries whose attention scores rows (snapkv, evict_merge, ThinK)
    kv_codec: str = "none"  # none | kivi | gear: full blocks compressed, each sequence's filling block exact
    kv_codec_bits: int = 4  # 2 | 4 | 8: kivi's and gear's quantization bits
    kv_gear_rank: int = 2  # gear: rank of the quantization error's approximation, per block and KV head
    kv_gear_outlier_fraction: float = 0.02  # gear: share of each block's entries kept exactly
    kv_key_channel_keep: float = 1.0  # ThinK: fraction of key channels kept per block and KV head (1: all)
    preemption_mode: str = "recompute"  # recompute | swap | auto: what a preempted request's KV blocks become
    swap_space: str = "1GiB"  # the swap file's size (swap, auto), as kv_cache_memory
    swap_dir: str | None = None  # directory of the swap file; None: the system's temporary directory
    kv_disk_dir: str | None = None  # persistent prefix-cache tier (engine/kv_offload); None: off
    kv_disk_space: str = "8GiB"  # bound of the blocks stored there; least recently used go first

    def __post_init__(self) -> None:
        parse_memory(self.kv_cache_memory, 1)  # validates the syntax now; a fraction is resolved when used
        parse_memory(self.swap_space, 1, "swap_space")
        parse_memory(self.kv_disk_space, 1, "kv_disk_space")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(
                f"preemption_mode must be one of {', '.join(PREEMPTION_MODES)}, got {self.preemption_mode!r}"
            )
        if self.kv_cache_dtype not in ("auto", "int8", "int4"):
            raise ValueError(f"kv_cache_dtype must be auto, int8 or int4, got {self.kv_cache_dtype!r}")
        if self.kv_observation_window < 1:
            raise ValueError(f"kv_observation_window must be >= 1, got {self.kv_observation_window}")
        policy = self.eviction_policy()  # validates the name and the budget now
        codecs = self.codec_settings()  # and the codec's
        if self.page_selection() is not None and codecs.active:
            raise ValueError(f"kv_policy quest cannot be combined with block codecs ({codecs.describe()})")
        if policy is not None and codecs.active:
            # Compaction would decode sealed blocks and encode its selection again, compounding the codec's error,
            # and move rows across the sealed / filling boundary.
            raise ValueError(
                f"kv_policy {policy.name} cannot be combined with block codecs ({codecs.describe()}); "
                "evict over kv_cache_dtype int8/int4 instead"
            )

    def codec_settings(self) -> CodecSettings:
        return CodecSettings(
            self.kv_codec,
            self.kv_codec_bits,
            self.kv_gear_rank,
            self.kv_gear_outlier_fraction,
            self.kv_key_channel_keep,
            KV_CACHE_BITS.get(self.kv_cache_dtype),
        )

    def eviction_policy(self) -> EvictionPolicy | None:
        return build_eviction_policy(
            self.kv_policy, self.kv_budget, self.kv_sink_tokens, self.kv_window_tokens, self.block_size
        )

    def page_selection(self) -> PageSelectionPolicy | None:
        return build_page_selection(
            self.kv_policy, self.kv_budget, self.kv_sink_tokens, self.kv_window_tokens, self.block_size
        )

    def kv_cache_bytes(self) -> int:
        return parse_memory(self.kv_cache_memory, psutil.virtual_memory().total)

    def swap_space_bytes(self) -> int:
        return parse_memory(self.swap_space, psutil.virtual_memory().total, "swap_space")

    def kv_disk_space_bytes(self) -> int:
        return parse_memory(self.kv_disk_space, shutil.disk_usage(self.kv_disk_dir or ".").total, "kv_disk_space")


@dataclass
class RuntimeConfig:
    attention_backend: str = "auto"
    device: str = "cpu"
    num_threads: int | None = None  # per rank; None: this process's cores, shared evenly by the ranks on them
    tensor_parallel_size: int = 1  # ranks (processes) the model is split over (docs/tensor-parallelism.md)
    tensor_parallel_timeout: float = 60.0  # seconds a rank waits in a step's collective before the engine fails

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if not self.tensor_parallel_timeout > 0:
            raise ValueError(f"tensor_parallel_timeout must be > 0, got {self.tensor_parallel_timeout}")


SPECULATIVE_METHODS = ("none", "ngram", "layer_skip", "sparse_mlp", "draft_model")


@dataclass
class SpeculativeConfig:
    # none | ngram | layer_skip | sparse_mlp | draft_model (engine/spec): propose tokens, verify them in one target step
    speculative_method: str = "none"
    num_speculative_tokens: int = 4  # draft tokens a request starts with per step (k)
    max_speculative_tokens: int = 8  # adaptive length: full acceptances lengthen a request's drafts up to this
    adaptive_draft_length: bool = True  # false: always k drafts (when the drafter has them)
    # Stop a request's draft where the estimated acceptance of the next token, 1 - sqrt(draft_entropy_scale *
    # entropy of the drafter's distribution), falls below this; the n-gram drafter has no distribution, so a request
    # whose recent acceptance rate is below it pauses drafting instead.
    draft_min_acceptance: float = 0.3
    draft_entropy_scale: float = 0.5
    speculative_max_batch_size: int | None = 4  # speculation is off while more requests run; null: at any batch size
    ngram_min: int = 2  # the shortest suffix n-gram the n-gram drafter looks up
    ngram_max: int = 4  # the longest; longer matches are tried first
    # layer_skip: the target's layers the draft runs, then the final norm and LM head: "0-9" exits early after layer
    # 9, "0-5,8,11-29" skips layers; `python -m engine.spec.layer_skip --keep N` searches a set for a model
    draft_layers: str = "0-14"
    # sparse_mlp: the share of each MLP's input channels the draft computes (WINA's highest activation x weight norm);
    # `python -m engine.spec.sparse_mlp` prints the agreement with the full model at several densities
    draft_mlp_density: float = 0.5
    draft_model: str | None = None  # draft_model: a smaller model with the same tokenizer (GGUF file or HF directory)

    def __post_init__(self) -> None:
        if self.speculative_method not in SPECULATIVE_METHODS:
            raise ValueError(
                f"speculative_method must be one of {', '.join(SPECULATIVE_METHODS)}, got {self.speculative_method!r}"
            )
        if not 1 <= self.num_speculative_tokens <= self.max_speculative_tokens:
            raise ValueError(
                f"need 1 <= num_speculative_tokens <= max_speculative_tokens, got {self.num_speculative_tokens} and "
                f"{self.max_speculative_tokens}"
            )
        if not 0.0 <= self.draft_min_acceptance < 1.0 or self.draft_entropy_scale <= 0.0:
            raise ValueError("need 0 <= draft_min_acceptance < 1 and draft_entropy_scale > 0")
        if self.speculative_max_batch_size is not None and self.speculative_max_batch_size < 1:
            raise ValueError(f"speculative_max_batch_size must be >= 1 or null, got {self.speculative_max_batch_size}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {self.ngram_min} and {self.ngram_max}")
        if not 0.0 < self.draft_mlp_density < 1.0:
            raise ValueError(f"draft_mlp_density must be in (0, 1), got {self.draft_mlp_density}")
        if (self.speculative_method == "draft_model") != (self.draft_model is not None):
            raise ValueError("draft_model (a model path) is needed by, and only by, speculative_method draft_model")


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # one key, or several separated by commas; also read from SPINDLE_API_KEY
    auth_health_and_metrics: bool = False  # require the key on /health and /metrics too
    max_request_body_bytes: int = 4 * 1024 * 1024
    max_prompt_tokens: int | None = None  # None: the context window less one (the completion needs a token)
    max_n: int = 128  # choices per request: n, times the prompts of a batched completion
    max_stop_strings: int = 16
    max_concurrent_requests_per_key: int | None = None  # API requests in flight per key (429 past it); None: no cap
    priority_aging_seconds: float = 10.0  # waiting this long counts as one step of priority; 0: strict priority
    log_prompts: bool = False  # log each request's prompt text (at INFO)
    max_stored_responses: int = 1000  # Responses API objects kept for retrieval and follow-ups (LRU); 0: none
    shutdown_timeout: float = 30.0
    # Slow or idle clients cannot hold connections: seconds to send a request's headers (from connecting, or from
    # the request's first byte on a kept-alive connection), to send its whole body once the headers are in, and
    # between requests on an idle keep-alive connection. Past them the connection is closed.
    header_read_timeout: float = 10.0
    body_read_timeout: float = 60.0
    keep_alive_timeout: float = 5.0
    max_connections: int = 1024  # open HTTP connections; a request on one past them gets 503 and its connection closes
    log_level: str = "info"

    def __post_init__(self) -> None:
        minimums = {
            "max_request_body_bytes": (self.max_request_body_bytes, 1),
            "max_prompt_tokens": (self.max_prompt_tokens, 1),
            "max_n": (self.max_n, 1),
            "max_stop_strings": (self.max_stop_strings, 0),
            "max_concurrent_requests_per_key": (self.max_concurrent_requests_per_key, 1),
            "max_stored_responses": (self.max_stored_responses, 0),
            "priority_aging_seconds": (self.priority_aging_seconds, 0),
            "shutdown_timeout": (self.shutdown_timeout, 0),
            "max_connections": (self.max_connections, 1),
        }
        for name, (value, least) in minimums.items():
            if value is not None and not value >= least:  # "not >=" also refuses NaN
                raise ValueError(f"{name} must be at least {least}, got {value}")
        for name in ("header_read_timeout", "body_read_timeout", "keep_alive_timeout"):
            if not getattr(self, name) > 0:  # "not >" also refuses NaN
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.api_key is not None and not self.api_keys:
            raise ValueError("api_key must name at least one key")

    @property
    def api_keys(self) -> list[str]:
        return [key.strip() for key in (self.api_key or "").split(",") if key.strip()]


ROUTING_POLICIES = ("prefix", "round_robin", "least_loaded")


@dataclass
class RouterConfig:
    """``spindle router``: the front that spreads requests over replicas (server/router/)."""

    # Base URLs of the replicas, separated by commas; the flag may be repeated. Metadata "repeatable": one URL per flag.
    replica: str | None = field(default=None, metadata={"repeatable": True})
    routing_policy: str = "prefix"  # prefix (prefix-cache affinity within a load bound) | round_robin | least_loaded
    prefix_chars: int = 256  # leading characters of the rendered prompt that pick a replica under the prefix policy
    load_factor: float = 1.25  # prefix policy: a replica takes at most this times the mean load (bounded loads)
    health_check_interval: float = 2.0  # seconds between polls of each replica's /health and /metrics
    replica_api_key: str | None = None  # sent on those polls, for replicas with --auth-health-and-metrics true

    def __post_init__(self) -> None:
        if self.routing_policy not in ROUTING_POLICIES:
            raise ValueError(
                f"routing_policy must be one of {', '.join(ROUTING_POLICIES)}, got {self.routing_policy!r}"
            )
        if self.prefix_chars < 1:
            raise ValueError(f"prefix_chars must be >= 1, got {self.prefix_chars}")
        if not self.load_factor >= 1:  # "not >=" also refuses NaN
            raise ValueError(f"load_factor must be at least 1, got {self.load_factor}")
        if not self.health_check_interval > 0:
            raise ValueError(f"health_check_interval must be positive, got {self.health_check_interval}")
        for url in self.replica_urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"replica: {url!r} is not an http:// or https:// URL")
        if len(set(self.replica_urls)) != len(self.replica_urls):
            raise ValueError(f"replica: a URL is given twice in {self.replica}")

    @property
    def replica_urls(self) -> list[str]:
        return [url.strip().rstrip("/") for url in (self.replica or "").split(",") if url.strip()]


@dataclass
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    router: RouterConfig = field(default_factory=RouterConfig)


SECTIONS = {f.name: f.type for f in dataclasses.fields(EngineConfig)}
SERVING_SECTIONS = tuple(name for name in SECTIONS if name != "router")  # what `spindle serve` and the engine read


def parse_memory(text: str | int | float, total_bytes: int, name: str = "kv_cache_memory") -> int:
    """'2GiB' / '500MB' / 1073741824 -> bytes; a number below 1 ('0.1') is a fraction of ``total_bytes``.
    ``name`` is the setting's, for the error message."""
    value = str(text).strip().upper().replace(" ", "")
    number = value.rstrip("KMGIB")
    unit = value[len(number) :]
    try:
        amount = float(number)
    except ValueError:
        raise ConfigError(f"{name}: cannot read {text!r} as a size (e.g. '2GiB', '0.1')") from None
    if unit not in _SIZE_UNITS or not math.isfinite(amount) or amount <= 0:
        raise ConfigError(f"{name}: cannot read {text!r} as a size (e.g. '2GiB', '0.1')")
    if not unit and amount < 1:
        return int(amount * total_bytes)
    return int(amount * _SIZE_UNITS[unit])


def _section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(EngineConfig)
    return {name: hints[name] for name in SECTIONS}


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    """Convert a YAML or command-line value to the field's annotated type."""
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and type(None) in options):
        if type(None) in options:
            return None
        raise ConfigError(f"{name} may not be empty")
    for option in options:
        if option is type(None):
            continue
        if isinstance(value, bool) and option is not bool:
            continue  # YAML's yes/no/true/false are not numbers or names
        if option is int and isinstance(value, float) and not value.is_integer():
            continue  # int(2.5) would silently drop the fraction
        if option is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes", "on"):
                return True
            if str(value).lower() in ("false", "0", "no", "off"):
                return False
            continue
        try:
            return option(value)
        except (TypeError, ValueError):
            continue
    raise ConfigError(f"{name}: cannot use {value!r} (expected {annotation})")


def build_config(
    preset: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> EngineConfig:
    """Defaults, then a preset file (a name in configs/ or a path), then ``SPINDLE_<FIELD>`` environment variables,
    then flat ``field=value`` overrides (the command line). ``environ`` defaults to the process environment."""
    environ = os.environ if environ is None else environ
    sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    if preset is not None:
        for section, values in _read_preset(preset).items():
            if section not in sections:
                raise ConfigError(f"unknown config section {section!r} (known: {', '.join(SECTIONS)})")
            if values is None:  # a section whose lines are all commented out
                continue
            if not isinstance(values, dict):
                raise ConfigError(f"config section {section!r} must be a mapping of field: value, got {values!r}")
            sections[section].update(values)
    owners = {f: s for s, cls in _section_classes().items() for f in _field_types(cls)}
    for name, section in owners.items():
        value = environ.get(env_var(name))
        if value:  # set and not empty: compose files pass empty strings for unset variables
            sections[section][name] = value
    for name, value in (overrides or {}).items():
        if name not in owners:
            raise ConfigError(f"unknown config field {name!r}")
        sections[owners[name]][name] = value
    built = {}
    for section, cls in _section_classes().items():
        types_ = _field_types(cls)
        unknown = set(sections[section]) - set(types_)
        if unknown:
            raise ConfigError(f"unknown field(s) in section {section!r}: {', '.join(sorted(unknown))}")
        values = {k: _coerce(v, types_[k], k) for k, v in sections[section].items()}
        try:
            built[section] = cls(**values)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
    return EngineConfig(**built)


def env_var(field_name: str) -> str:
    """The environment variable that sets a config field: ``max_num_seqs`` -> ``SPINDLE_MAX_NUM_SEQS``."""
    return ENV_PREFIX + field_name.upper()


def _read_preset(preset: str | Path) -> dict[str, Any]:
    path = Path(preset)
    if not path.exists():
        path = CONFIGS_DIR / f"{preset}.yaml"
    if not path.is_file():
        raise ConfigError(f"config preset not found: {preset} (looked in {CONFIGS_DIR})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections")
    return data


def add_config_arguments(
    parser: argparse.ArgumentParser, sections: Sequence[str] = SERVING_SECTIONS, also: Sequence[str] = ()
) -> None:
    """One ``--field-name`` flag per field of ``sections`` and per field named in ``also``, defaulting to "not
    given" so presets are not overridden. A field marked ``repeatable`` takes its flag several times (joined by
    commas)."""
    for section, cls in _section_classes().items():
        group = parser.add_argument_group(section)
        for spec in dataclasses.fields(cls):
            if section not in sections and spec.name not in also:
                continue
            flag = "--" + spec.name.replace("_", "-")
            action = "append" if spec.metadata.get("repeatable") else "store"
            annotation = _field_types(cls)[spec.name]
            group.add_argument(
                flag, dest=spec.name, default=argparse.SUPPRESS, action=action, metavar=_metavar(annotation)
            )
    parser.add_argument("--config", default=None, help="a preset name in configs/ or a YAML file ($SPINDLE_CONFIG)")


def _metavar(annotation: Any) -> str:
    options = [o for o in typing.get_args(annotation) if o is not type(None)] or [annotation]
    return getattr(options[0], "__name__", str(options[0])).upper()


def config_from_args(args: argparse.Namespace) -> EngineConfig:
    values = vars(args)
    fields_ = {f for cls in _section_classes().values() for f in _field_types(cls)}
    overrides = {k: ",".join(v) if isinstance(v, list) else v for k, v in values.items() if k in fields_}
    return build_config(values.get("config") or os.environ.get(env_var("config")) or None, overrides)
