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
    arch = config.get("model_type", "")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"{model_dir.name}: unsupported model_type {arch!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    if config.get("rope_scaling"):
        raise ModelLoadError(f"{model_dir.name}: rope_scaling {config['rope_scaling']!r} is not supported")
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
            rope_theta=float(config.get("rope_theta", 10000.0)),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            name=model_dir.name,
        )
    except KeyError as exc:
        raise ModelLoadError(f"{config_path} is missing the required key {exc.args[0]!r}") from exc


def iter_tensors(model_dir: Path, dtype: torch.dtype, progress: bool) -> Iterator[tuple[str, torch.Tensor]]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{model_dir} has no *.safetensors weight files")
    for file in tqdm(files, desc="Loading weights", unit="file", disable=not progress):
        try:
            with safe_open(str(file), framework="pt") as shard:
                for name in shard.keys():  # noqa: SIM118 - safe_open has no __iter__
                    yield name, shard.get_tensor(name).to(dtype)
        except SafetensorError as exc:
            raise ModelLoadError(f"{file} is not a readable safetensors file (corrupt or truncated?): {exc}") from exc
