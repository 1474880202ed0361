"""Engine configuration: defaults, presets, overrides, type coercion, errors, memory sizes and command-line flags."""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given
from hypothesis import strategies as st

from engine.config import (
    CONFIGS_DIR,
    CacheConfig,
    EngineConfig,
    ModelConfig,
    RouterConfig,
    RuntimeConfig,
    ServerConfig,
    SpeculativeConfig,
    add_config_arguments,
    build_config,
    config_from_args,
    parse_memory,
)
from engine.errors import ConfigError
from scheduler.config import SchedulerConfig

SECTION_CLASSES = {
    "model": ModelConfig,
    "cache": CacheConfig,
    "scheduler": SchedulerConfig,
    "runtime": RuntimeConfig,
    "speculative": SpeculativeConfig,
    "server": ServerConfig,
    "router": RouterConfig,
}
GIB = 1024**3


@pytest.fixture(autouse=True)
def _no_spindle_variables_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("SPINDLE_"):
            monkeypatch.delenv(name)


def field_defaults(cls: type) -> dict[str, typing.Any]:
    out = {}
    for f in dataclasses.fields(cls):
        out[f.name] = f.default_factory() if f.default is dataclasses.MISSING else f.default
    return out


def test_sections_are_the_engine_config_fields() -> None:
    assert [f.name for f in dataclasses.fields(EngineConfig)] == list(SECTION_CLASSES)


def test_defaults() -> None:
    config = build_config()
    for section, cls in SECTION_CLASSES.items():
        assert dataclasses.asdict(getattr(config, section)) == field_defaults(cls), section
    assert config.model.model is None
    assert config.model.dtype == "auto"
    assert config.cache.block_size == 16
    assert config.cache.kv_cache_memory == "1GiB"
    assert config.cache.kv_cache_bytes() == GIB
    assert config.server.api_key is None


def test_preset_by_name_and_by_path(tmp_path: Path) -> None:
    assert build_config("fp32").model.dtype == "float32"
    preset = tmp_path / "mine.yaml"
    preset.write_text("cache:\n  block_size: 32\nserver:\n  port: 9000\n")
    config = build_config(preset)
    assert (config.cache.block_size, config.server.port) == (32, 9000)
    assert config.model.dtype == "auto"  # untouched sections keep their defaults
    assert build_config(str(preset)).cache.block_size == 32


def test_overrides_win_over_the_preset() -> None:
    config = build_config("fp32", {"dtype": "bfloat16", "block_size": 8, "max_num_seqs": 3, "port": 1234})
    assert config.model.dtype == "bfloat16"
    assert config.cache.block_size == 8
    assert config.scheduler.max_num_seqs == 3
    assert config.server.port == 1234


@pytest.mark.parametrize(
    ("field", "text", "section", "expected"),
    [
        ("enable_prefix_caching", "false", "cache", False),
        ("enable_prefix_caching", "True", "cache", True),
        ("enable_prefix_caching", "off", "cache", False),
        ("auth_health_and_metrics", "yes", "server", True),
        ("block_size", "32", "cache", 32),
        ("max_num_batched_tokens", 4096.0, "scheduler", 4096),
        ("max_model_len", "none", "scheduler", None),
        ("max_model_len", "512", "scheduler", 512),
        ("num_threads", "null", "runtime", None),
        ("num_threads", "2", "runtime", 2),
        ("shutdown_timeout", "2.5", "server", 2.5),
        ("shutdown_timeout", "3", "server", 3.0),
        ("api_key", "None", "server", None),
        ("kv_cache_memory", 1073741824, "cache", "1073741824"),
        ("kv_cache_memory", 0.25, "cache", "0.25"),
        ("served_model_name", "my-model", "model", "my-model"),
    ],
)
def test_coercion_from_strings(field: str, text: object, section: str, expected: object) -> None:
    value = getattr(getattr(build_config(None, {field: text}), section), field)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"block_sise": 16}, "block_sise"),
        ({"block_size": "sixteen"}, "block_size"),
        ({"block_size": "2.5"}, "block_size"),
        ({"block_size": 2.5}, "block_size"),
        ({"block_size": True}, "block_size"),
        ({"enable_prefix_caching": "maybe"}, "enable_prefix_caching"),
        ({"dtype": "float64"}, "dtype"),
        ({"dtype": None}, "dtype"),
        ({"kv_cache_memory": "lots"}, "kv_cache_memory"),
        ({"kv_cache_memory": "-1GiB"}, "kv_cache_memory"),
        ({"kv_cache_memory": "2PB"}, "kv_cache_memory"),
        ({"kv_cache_memory": "inf"}, "kv_cache_memory"),
        ({"kv_cache_memory": "nan"}, "kv_cache_memory"),
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"port": "http"}, "port"),
        ({"activation_quantization": "int4"}, "activation_quantization"),
    ],
)
def test_bad_values_name_the_field(overrides: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        build_config(None, overrides)


@pytest.mark.parametrize(
    ("dtype", "activation_quantization", "packed_for"),
    [
        ("float32", "int8", torch.int8),
        ("float32", "none", torch.float32),
        ("bfloat16", "int8", torch.bfloat16),  # quantizing activations is an fp32 kernel: no effect in bf16
    ],
)
def test_the_4_bit_copies_are_packed_for_int8_activations_only_in_fp32(
    dtype: str, activation_quantization: str, packed_for: torch.dtype
) -> None:
    config = build_config(None, {"dtype": dtype, "activation_quantization": activation_quantization})
    assert config.model.int4_activations == packed_for


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("modle:\n  dtype: float32\n", "modle"),
        ("cache:\n  block_sise: 8\n", "block_sise"),
        ("cache: 16\n", "cache"),
        ("model:\n  dtype: [float32\n", "not valid YAML"),
        ("- model\n- cache\n", "mapping"),
        ("model:\n  dtype: float128\n", "dtype"),
        ("cache:\n  kv_cache_memory: a lot\n", "kv_cache_memory"),
    ],
)
def test_bad_preset_files(tmp_path: Path, text: str, named: str) -> None:
    preset = tmp_path / "bad.yaml"
    preset.write_text(text)
    with pytest.raises(ConfigError, match=named):
        build_config(preset)


def test_missing_preset() -> None:
    with pytest.raises(ConfigError, match="no-such-preset"):
        build_config("no-such-preset")


def test_empty_preset_and_empty_section(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing set\n")
    assert build_config(empty) == build_config()
    commented = tmp_path / "commented.yaml"
    commented.write_text("server:\n  # port: 9000\ncache:\n  block_size: 8\n")
    config = build_config(commented)
    assert config.server == ServerConfig() and config.cache.block_size == 8


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2GiB", 2 * GIB),
        ("2gib", 2 * GIB),
        ("1.5 GiB", 3 * GIB // 2),
        ("500MB", 500_000_000),
        ("500MiB", 500 * 1024**2),
        ("64KiB", 65536),
        ("3KB", 3000),
        ("7GB", 7_000_000_000),
        ("1073741824", GIB),
        ("4096B", 4096),
        (1073741824, GIB),
        ("0.25", 250),
        (0.5, 500),
    ],
)
def test_parse_memory(text: str | int | float, expected: int) -> None:
    assert parse_memory(text, total_bytes=1000) == expected


@pytest.mark.parametrize("text", ["", "GiB", "0", "-5MB", "2TB", "2 G", "1e400", "nan", "inf", "12XB", "1..5GiB"])
def test_parse_memory_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="kv_cache_memory"):
        parse_memory(text, total_bytes=1000)


UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


@given(st.integers(min_value=1, max_value=10**6), st.sampled_from(sorted(UNITS)))
def test_parse_memory_whole_units(amount: int, unit: str) -> None:
    assert parse_memory(f"{amount}{unit}", total_bytes=1) == amount * UNITS[unit]


@given(st.integers(min_value=1, max_value=999), st.integers(min_value=1, max_value=2**40))
def test_parse_memory_fraction_of_total(thousandths: int, total: int) -> None:
    fraction = thousandths / 1000
    assert parse_memory(f"{fraction}", total_bytes=total) == int(fraction * total)


def test_kv_cache_fraction_uses_total_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.config as config_module

    class FakeMemory:
        total = 8 * GIB

    monkeypatch.setattr(config_module.psutil, "virtual_memory", lambda: FakeMemory())
    assert build_config(None, {"kv_cache_memory": "0.25"}).cache.kv_cache_bytes() == 2 * GIB


def parser_with_config_flags() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, sections=list(SECTION_CLASSES))
    return parser


def test_command_line_flags() -> None:
    parser = parser_with_config_flags()
    args = parser.parse_args(["--block-size", "32", "--dtype", "float32", "--enable-prefix-caching", "false"])
    config = config_from_args(args)
    assert config.cache.block_size == 32
    assert config.model.dtype == "float32"
    assert config.cache.enable_prefix_caching is False
    assert config.scheduler == SchedulerConfig()  # flags not given do not reset anything


def test_command_line_flags_over_a_preset() -> None:
    parser = parser_with_config_flags()
    assert config_from_args(parser.parse_args(["--config", "fp32"])).model.dtype == "float32"
    config = config_from_args(parser.parse_args(["--config", "fp32", "--dtype", "bfloat16", "--port", "81"]))
    assert (config.model.dtype, config.server.port) == ("bfloat16", 81)


def test_every_field_has_a_flag_that_round_trips() -> None:
    """Passing each field's default as text, through its --flag, gives back the default config."""
    argv = []
    for cls in SECTION_CLASSES.values():
        for name, default in field_defaults(cls).items():
            argv += ["--" + name.replace("_", "-"), "none" if default is None else str(default)]
    config = config_from_args(parser_with_config_flags().parse_args(argv))
    assert config == build_config()
    assert len(vars(parser_with_config_flags().parse_args(argv))) == len(argv) // 2 + 1  # + --config


def test_flag_errors_are_config_errors() -> None:
    args = parser_with_config_flags().parse_args(["--max-num-seqs", "many"])
    with pytest.raises(ConfigError, match="max_num_seqs"):
        config_from_args(args)


def test_default_yaml_documents_every_field_with_its_default() -> None:
    data = yaml.safe_load((CONFIGS_DIR / "default.yaml").read_text())
    assert list(data) == list(SECTION_CLASSES)
    for section, cls in SECTION_CLASSES.items():
        defaults = field_defaults(cls)
        assert set(data[section]) == set(defaults), f"configs/default.yaml [{section}]"
        built = getattr(build_config(None, dict(data[section])), section)
        assert dataclasses.asdict(built) == defaults, section
    assert build_config("default") == build_config()


def test_api_key_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPINDLE_API_KEY", "sk-from-env")
    assert build_config().server.api_key == "sk-from-env"
    assert build_config("default").server.api_key == "sk-from-env"
    assert build_config(None, {"api_key": "sk-flag"}).server.api_key == "sk-flag"  # an explicit key wins
    monkeypatch.setenv("SPINDLE_API_KEY", "")
    assert build_config().server.api_key is None


def test_every_field_has_an_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """SPINDLE_<FIELD> set to a value other than the default changes exactly that field."""
    for section, cls in SECTION_CLASSES.items():
        for name in field_defaults(cls):
            monkeypatch.setenv("SPINDLE_" + name.upper(), "7" if name != "dtype" else "float16")
            try:
                config = build_config()
            except ConfigError as exc:  # "7" is not a valid value for this field: the error names it
                assert name in str(exc)
                continue
            finally:
                monkeypatch.delenv("SPINDLE_" + name.upper())
            assert getattr(getattr(config, section), name) != field_defaults(cls)[name], name


def test_environment_sits_between_the_preset_and_the_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPINDLE_DTYPE", "float16")
    monkeypatch.setenv("SPINDLE_MAX_NUM_SEQS", "12")
    monkeypatch.setenv("SPINDLE_ENABLE_PREFIX_CACHING", "off")
    monkeypatch.setenv("SPINDLE_PORT", "")  # empty means unset
    monkeypatch.setenv("SPINDLE_KERNEL_CACHE", "/tmp/k")  # not a config field: ignored
    config = build_config("fp32")
    assert (config.model.dtype, config.scheduler.max_num_seqs) == ("float16", 12)
    assert config.cache.enable_prefix_caching is False
    assert config.server.port == ServerConfig().port
    parser = parser_with_config_flags()
    assert config_from_args(parser.parse_args(["--dtype", "bfloat16"])).model.dtype == "bfloat16"
    assert build_config(environ={}).model.dtype == ModelConfig().dtype  # an explicit environment replaces os.environ


def test_preset_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    parser = parser_with_config_flags()
    monkeypatch.setenv("SPINDLE_CONFIG", "fp32")
    assert config_from_args(parser.parse_args([])).model.dtype == "float32"
    preset = tmp_path / "mine.yaml"
    preset.write_text("scheduler:\n  max_num_seqs: 5\n")
    config = config_from_args(parser.parse_args(["--config", str(preset)]))
    assert (config.model.dtype, config.scheduler.max_num_seqs) == (ModelConfig().dtype, 5)  # the flag wins
    monkeypatch.setenv("SPINDLE_CONFIG", "no-such-preset")
    with pytest.raises(ConfigError, match="no-such-preset"):
        config_from_args(parser.parse_args([]))


def test_bad_environment_value_names_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPINDLE_MAX_NUM_SEQS", "many")
    with pytest.raises(ConfigError, match="max_num_seqs"):
        build_config()
