"""Read a Hugging Face model directory: ``config.json`` plus ``*.safetensors`` weights."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from engine.errors import ModelLoadError
from engine.model_spec import SUPPORTED_ARCHITECTURES, ModelSpec


def read_spec(model_dir: Path) -> ModelSpec:
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{model_dir} has no config.json: not a Hugging Face model directory")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ModelLoadError(f"{config_path} must hold a JSON object")
    arch = config.get("model_type", "")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"{model_dir.name}: unsupported model_type {arch!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    if config.get("rope_scaling"):
        raise ModelLoadError(f"{model_dir.name}: rope_scaling {config['rope_scaling']!r} is not supported")
    # transformers >= 5 writes RoPE settings as "rope_parameters" (rope_theta moves there) instead of top-level keys.
    rope = config.get("rope_parameters") or {}
    if not isinstance(rope, dict) or rope.get("rope_type", "default") != "default":
        raise ModelLoadError(f"{model_dir.name}: rope_parameters {rope!r} are not supported")
    try:
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        return ModelSpec(
            architecture=arch,
            vocab_size=int(config["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            name=model_dir.name,
        )
    except KeyError as exc:
        raise ModelLoadError(f"{config_path} is missing the required key {exc.args[0]!r}") from exc
    except (TypeError, ValueError, ZeroDivisionError) as exc:
        raise ModelLoadError(f"{config_path} has an invalid value: {exc}") from exc


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors shards of the model: those its index names, else every ``*.safetensors`` file.

    Some repositories ship the same weights twice (``consolidated.safetensors`` in another naming scheme beside the
    Hugging Face shards); the index says which files belong to the Hugging Face model.
    """
    index_path = model_dir / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            files = [model_dir / name for name in sorted(set(weight_map.values()))]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelLoadError(f"{index_path} is not a valid safetensors index: {exc}") from exc
        missing = [file.name for file in files if not file.is_file()]
        if missing:
            raise ModelLoadError(f"{model_dir}: weight files listed in {index_path.name} are missing: {missing}")
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{model_dir} has no *.safetensors weight files")
    return files


def check_weight_files(model_dir: Path) -> None:
    """Read every shard's header, so that a corrupt or truncated file is reported when the model is opened."""
    for file in weight_files(model_dir):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except SafetensorError as exc:
            raise ModelLoadError(f"{file} is not a readable safetensors file (corrupt or truncated?): {exc}") from exc


def iter_tensors(model_dir: Path, dtype: torch.dtype, progress: bool) -> Iterator[tuple[str, torch.Tensor]]:
    files = weight_files(model_dir)
    for file in tqdm(files, desc="Loading weights", unit="file", disable=not progress):
        try:
            with safe_open(str(file), framework="pt") as shard:
                for name in shard.keys():  # noqa: SIM118 - safe_open has no __iter__
                    yield name, shard.get_tensor(name).to(dtype)
        except SafetensorError as exc:
            raise ModelLoadError(f"{file} is not a readable safetensors file (corrupt or truncated?): {exc}") from exc
