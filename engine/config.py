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
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
import yaml

from engine.errors import ConfigError
from engine.kv_policy import EvictionPolicy, build_eviction_policy
from scheduler.config import SchedulerConfig

ENV_PREFIX = "SPINDLE_"
CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SIZE_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}


@dataclass
class ModelConfig:
    model: str | None = None  # a .gguf file or a Hugging Face directory; None: the embedded default model
    served_model_name: str | None = None
    dtype: str = "bfloat16"
    seed: int = 0

    def __post_init__(self) -> None:
        _ = self.torch_dtype  # validates the name now rather than when the model is loaded

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        return DTYPES[self.dtype]


@dataclass
class CacheConfig:
    block_size: int = 16
    kv_cache_memory: str = "1GiB"  # bytes ("2GiB", "500MB", "1073741824") or a fraction of total RAM ("0.1")
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"  # auto (the model's dtype) | int8 | int4: per-token quantized K/V
    kv_policy: str = "none"  # none | sink_window | key_norm | snapkv | evict_merge (engine/kv_policy)
    kv_budget: int = 512  # KV rows each request keeps per layer and KV head under an eviction policy
    kv_sink_tokens: int = 4  # first rows always kept
    kv_window_tokens: int = 32  # most recent rows always kept
    kv_observation_window: int = 32  # recent queries whose attention scores rows (snapkv, evict_merge)

    def __post_init__(self) -> None:
        parse_memory(self.kv_cache_memory, 1)  # validates the syntax now; a fraction is resolved when used
        if self.kv_cache_dtype not in ("auto", "int8", "int4"):
            raise ValueError(f"kv_cache_dtype must be auto, int8 or int4, got {self.kv_cache_dtype!r}")
        if self.kv_observation_window < 1:
            raise ValueError(f"kv_observation_window must be >= 1, got {self.kv_observation_window}")
        self.eviction_policy()  # validates the name and the budget now

    def eviction_policy(self) -> EvictionPolicy | None:
        return build_eviction_policy(
            self.kv_policy, self.kv_budget, self.kv_sink_tokens, self.kv_window_tokens, self.block_size
        )

    def kv_cache_bytes(self) -> int:
        return parse_memory(self.kv_cache_memory, psutil.virtual_memory().total)


@dataclass
class RuntimeConfig:
    attention_backend: str = "auto"
    device: str = "cpu"
    num_threads: int | None = None  # None: all cores this process may use


SPECULATIVE_METHODS = ("none", "ngram", "layer_skip", "draft_model")


@dataclass
class SpeculativeConfig:
    # none | ngram | layer_skip | draft_model (engine/spec): propose tokens, verify them in one target step
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
    # 9, "0-5,8,11-29" skips layers; spindle-draft-layers searches a set for a model
    draft_layers: str = "0-14"
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
    shutdown_timeout: float = 30.0
    log_level: str = "info"

    def __post_init__(self) -> None:
        minimums = {
            "max_request_body_bytes": (self.max_request_body_bytes, 1),
            "max_prompt_tokens": (self.max_prompt_tokens, 1),
            "max_n": (self.max_n, 1),
            "max_stop_strings": (self.max_stop_strings, 0),
            "max_concurrent_requests_per_key": (self.max_concurrent_requests_per_key, 1),
            "priority_aging_seconds": (self.priority_aging_seconds, 0),
            "shutdown_timeout": (self.shutdown_timeout, 0),
        }
        for name, (value, least) in minimums.items():
            if value is not None and not value >= least:  # "not >=" also refuses NaN
                raise ValueError(f"{name} must be at least {least}, got {value}")
        if self.api_key is not None and not self.api_keys:
            raise ValueError("api_key must name at least one key")

    @property
    def api_keys(self) -> list[str]:
        return [key.strip() for key in (self.api_key or "").split(",") if key.strip()]


@dataclass
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    server: ServerConfig = field(default_factory=ServerConfig)


SECTIONS = {f.name: f.type for f in dataclasses.fields(EngineConfig)}


def parse_memory(text: str | int | float, total_bytes: int) -> int:
    """'2GiB' / '500MB' / 1073741824 -> bytes; a number below 1 ('0.1') is a fraction of ``total_bytes``."""
    value = str(text).strip().upper().replace(" ", "")
    number = value.rstrip("KMGIB")
    unit = value[len(number) :]
    try:
        amount = float(number)
    except ValueError:
        raise ConfigError(f"kv_cache_memory: cannot read {text!r} as a size (e.g. '2GiB', '0.1')") from None
    if unit not in _SIZE_UNITS or not math.isfinite(amount) or amount <= 0:
        raise ConfigError(f"kv_cache_memory: cannot read {text!r} as a size (e.g. '2GiB', '0.1')")
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


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--field-name`` flag per config field, defaulting to "not given" so presets are not overridden."""
    for section, cls in _section_classes().items():
        group = parser.add_argument_group(section)
        for name, annotation in _field_types(cls).items():
            flag = "--" + name.replace("_", "-")
            group.add_argument(flag, dest=name, default=argparse.SUPPRESS, metavar=_metavar(annotation))
    parser.add_argument("--config", default=None, help="a preset name in configs/ or a YAML file ($SPINDLE_CONFIG)")


def _metavar(annotation: Any) -> str:
    options = [o for o in typing.get_args(annotation) if o is not type(None)] or [annotation]
    return getattr(options[0], "__name__", str(options[0])).upper()


def config_from_args(args: argparse.Namespace) -> EngineConfig:
    values = vars(args)
    fields_ = {f for cls in _section_classes().values() for f in _field_types(cls)}
    overrides = {k: v for k, v in values.items() if k in fields_}
    return build_config(values.get("config") or os.environ.get(env_var("config")) or None, overrides)
