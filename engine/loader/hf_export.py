"""Write an opened model as a Hugging Face directory, for servers and libraries that read only that format.

The weights come from Spindle's own loader (for a GGUF file: dequantized, Q/K rows un-permuted), so the directory
holds exactly the model Spindle serves; ``tokenizer.json`` is Spindle's rebuilt tokenizer pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from engine.loader import ModelSource

_ARCHITECTURE_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}


def model_config(source: ModelSource, dtype: torch.dtype) -> dict[str, Any]:
    """``config.json`` as transformers writes it for this architecture."""
    spec, tokenizer = source.spec, source.tokenizer
    config: dict[str, Any] = {
        "architectures": [_ARCHITECTURE_CLASSES[spec.architecture]],
        "model_type": spec.architecture,
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": spec.rms_norm_eps,
        # transformers >= 5 reads rope_parameters, older releases (and other readers) the top-level rope_theta.
        "rope_parameters": {"rope_type": "default", "rope_theta": spec.rope_theta},
        "rope_theta": spec.rope_theta,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": _primary_eos_id(source),
        "pad_token_id": tokenizer.pad_token_id,
        "dtype": str(dtype).removeprefix("torch."),
    }
    if spec.architecture == "mistral":
        config["sliding_window"] = None  # Spindle attends to the whole context; transformers' default would not
    return config


def _primary_eos_id(source: ModelSource) -> int | None:
    eos_token = source.tokenizer.special_tokens.get("eos_token")
    return None if eos_token is None else source.tokenizer.token_to_id(eos_token)


def _tokenizer_config(source: ModelSource) -> dict[str, Any]:
    """Special tokens and chat template; BOS/EOS insertion is left to tokenizer.json's post-processor."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **source.tokenizer.special_tokens,
        "model_max_length": source.spec.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
        "chat_template": source.tokenizer.chat_template,
    }


def _generation_config(source: ModelSource) -> dict[str, Any]:
    """Every id that ends generation, the primary EOS first, as transformers and vLLM read them."""
    primary = _primary_eos_id(source)
    eos_ids = sorted(source.tokenizer.eos_token_ids, key=lambda token_id: (token_id != primary, token_id))
    return {"bos_token_id": source.tokenizer.bos_token_id, "eos_token_id": eos_ids}


def export_hf_directory(source: ModelSource, output: Path, dtype: torch.dtype = torch.bfloat16) -> None:
    """Write config.json, model.safetensors (in ``dtype``), tokenizer.json, tokenizer_config.json and
    generation_config.json into ``output``."""
    output.mkdir(parents=True, exist_ok=True)
    weights = {
        name: tensor.contiguous()
        for name, tensor in source.iter_weights(dtype, progress=False)
        # A tied head is the embedding: transformers ties it on load and refuses a separate copy on save.
        if not (source.spec.tie_word_embeddings and name == "lm_head.weight")
    }
    save_file(weights, str(output / "model.safetensors"), metadata={"format": "pt"})
    files = {
        "config.json": model_config(source, dtype),
        "tokenizer_config.json": _tokenizer_config(source),
        "generation_config.json": _generation_config(source),
    }
    for name, content in files.items():
        (output / name).write_text(json.dumps(content, indent=2) + "\n")
    (output / "tokenizer.json").write_text(source.tokenizer.backend_json())
