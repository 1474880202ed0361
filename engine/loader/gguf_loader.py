"""Read a GGUF file: architecture metadata and tensors dequantized to torch, in Hugging Face names.

GGUF stores Llama's Q and K projections with rows permuted for llama.cpp's interleaved RoPE; the permutation is
undone here so that the weights match the Hugging Face layout that ``engine.models`` (rotate-half RoPE) expects.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf.quants import dequantize
from tqdm import tqdm

from engine.errors import ModelLoadError
from engine.model_spec import SUPPORTED_ARCHITECTURES, ModelSpec

Q = gguf.GGMLQuantizationType
SUPPORTED_TENSOR_TYPES = frozenset(
    {Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K}
)

_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_PROJECTIONS = frozenset(kind for kind in _LAYER_TENSORS if not kind.endswith("_norm"))
_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def open_gguf(path: Path) -> gguf.GGUFReader:
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    try:
        return gguf.GGUFReader(path)
    except Exception as exc:  # the reader fails in many ways on a damaged file; all mean the same to the user
        raise ModelLoadError(f"{path} is not a readable GGUF file (corrupt or truncated?): {exc}") from exc


def field(reader: gguf.GGUFReader, key: str, default: Any = None, path: Path | None = None) -> Any:
    entry = reader.fields.get(key)
    if entry is None:
        if default is None:
            where = f"{path.name}: " if path is not None else ""
            raise ModelLoadError(f"{where}GGUF metadata is missing the required key {key!r}")
        return default
    return entry.contents()


def read_spec(reader: gguf.GGUFReader, path: Path) -> ModelSpec:
    def get(key: str, default: Any = None) -> Any:
        return field(reader, key, default, path)

    arch = get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"{path.name}: unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    try:
        hidden = int(get(f"{arch}.embedding_length"))
        heads = int(get(f"{arch}.attention.head_count"))
        tensor_names = {t.name for t in reader.tensors}
        vocab = len(get("tokenizer.ggml.tokens", []) or []) or int(get(f"{arch}.vocab_size"))
        return ModelSpec(
            architecture=arch,
            vocab_size=int(get(f"{arch}.vocab_size", vocab)),
            hidden_size=hidden,
            intermediate_size=int(get(f"{arch}.feed_forward_length")),
            num_layers=int(get(f"{arch}.block_count")),
            num_heads=heads,
            num_kv_heads=int(get(f"{arch}.attention.head_count_kv", heads)),
            head_dim=int(get(f"{arch}.rope.dimension_count", hidden // heads)),
            rope_theta=float(get(f"{arch}.rope.freq_base", 10000.0)),
            rms_norm_eps=float(get(f"{arch}.attention.layer_norm_rms_epsilon")),
            max_position_embeddings=int(get(f"{arch}.context_length")),
            tie_word_embeddings="output.weight" not in tensor_names,
            name=str(get("general.name", path.stem)),
        )
    except (TypeError, ValueError, ZeroDivisionError) as exc:
        raise ModelLoadError(f"{path.name}: invalid {arch} metadata in GGUF file: {exc}") from exc


def check_tensor_types(reader: gguf.GGUFReader, path: Path) -> None:
    """Refuse a file with tensors we cannot decode when it is opened, before any weight is loaded."""
    for tensor in reader.tensors:
        if tensor.tensor_type not in SUPPORTED_TENSOR_TYPES:
            raise ModelLoadError(
                f"{path.name}: tensor {tensor.name!r} has unsupported quantization type {tensor.tensor_type.name} "
                f"(supported: {', '.join(sorted(t.name for t in SUPPORTED_TENSOR_TYPES))})"
            )


def linear_weights_are_q4_1(reader: gguf.GGUFReader) -> bool:
    """Whether every projection of every layer is stored as Q4_1 (32 levels per block with a scale and a minimum)."""
    projections = [
        tensor
        for tensor in reader.tensors
        if tensor.name.startswith("blk.") and tensor.name.split(".")[2] in _PROJECTIONS
    ]
    return bool(projections) and all(tensor.tensor_type == Q.Q4_1 for tensor in projections)


def hf_name(gguf_name: str) -> str:
    base, _, suffix = gguf_name.rpartition(".")
    if base.startswith("blk."):
        _, layer, kind = base.split(".", 2)
        if kind in _LAYER_TENSORS:
            return f"model.layers.{layer}.{_LAYER_TENSORS[kind]}.{suffix}"
    elif base in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[base]}.{suffix}"
    raise ModelLoadError(f"unexpected tensor {gguf_name!r} in GGUF file")


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo the row interleaving that GGUF conversion applies to Llama's Q/K projections."""
    half_dim = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, half_dim, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def iter_tensors(
    reader: gguf.GGUFReader, spec: ModelSpec, dtype: torch.dtype, progress: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    for tensor in tqdm(reader.tensors, desc="Loading weights", unit="tensor", disable=not progress):
        try:
            values = dequantize(tensor.data, tensor.tensor_type)
        except Exception as exc:
            raise ModelLoadError(f"tensor {tensor.name!r} could not be decoded (corrupt file?): {exc}") from exc
        name = hf_name(tensor.name)
        if name.endswith("q_proj.weight"):
            values = unpermute_rope_rows(values, spec.num_heads)
        elif name.endswith("k_proj.weight"):
            values = unpermute_rope_rows(values, spec.num_kv_heads)
        if not values.flags.writeable:  # a view into the memory-mapped file
            values = values.copy()
        yield name, torch.from_numpy(np.ascontiguousarray(values)).to(dtype)
