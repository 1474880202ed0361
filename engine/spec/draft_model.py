"""A separate, smaller draft model: opened and checked against the target at start-up.

``python -m engine.spec.draft_model OUT_DIR --layers 8`` writes a layer-truncated copy of a model (default: the
embedded one) as a Hugging Face directory that ``draft_model`` accepts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.errors import ConfigError, ModelLoadError
from engine.loader import ModelSource, open_model


def open_draft_model(path: str, target: ModelSource) -> ModelSource:
    """The draft model at ``path``, refused with a clear error unless it tokenizes exactly as the target does (its
    tokens are the target's)."""
    try:
        draft = open_model(path)
    except ModelLoadError as exc:
        raise ConfigError(f"draft_model: {exc}") from exc
    if draft.tokenizer.vocabulary() != target.tokenizer.vocabulary():
        raise ConfigError(
            f"draft_model {path}: its tokenizer differs from the target model's ({draft.tokenizer.vocab_size} "
            f"against {target.tokenizer.vocab_size} tokens, or other token ids): a draft must share the tokenizer"
        )
    if draft.spec.vocab_size != target.spec.vocab_size:
        raise ConfigError(
            f"draft_model {path}: {draft.spec.vocab_size} output logits, the target has {target.spec.vocab_size}"
        )
    return draft


def write_truncated(source: ModelSource, out: Path, num_layers: int, dtype: torch.dtype = torch.float32) -> None:
    """The first ``num_layers`` decoder layers of ``source`` (plus its embedding, final norm and head) as a Hugging
    Face directory with the same tokenizer: a training-free draft model, for tests and trials."""
    spec = source.spec
    if not 1 <= num_layers < spec.num_layers:
        raise ValueError(f"--layers must be in [1, {spec.num_layers - 1}], got {num_layers}")
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, tensor in source.iter_weights(dtype, progress=False):
        parts = name.split(".")
        if "layers" in parts and int(parts[parts.index("layers") + 1]) >= num_layers:
            continue
        tensors[name] = tensor.contiguous()
    save_file(tensors, str(out / "model.safetensors"))
    tokenizer = source.tokenizer
    config = {
        "model_type": spec.architecture,
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "rope_theta": spec.rope_theta,
        "rms_norm_eps": spec.rms_norm_eps,
        "max_position_embeddings": spec.max_position_embeddings,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "tokenizer.json").write_text(tokenizer.backend_json())
    names = tokenizer.convert_ids_to_tokens(sorted(tokenizer.eos_token_ids))
    tokenizer_config = {"eos_token": names[0] if names else None, "chat_template": tokenizer.chat_template}
    if tokenizer.bos_token_id is not None:
        tokenizer_config["bos_token"] = tokenizer.convert_ids_to_tokens([tokenizer.bos_token_id])[0]
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a layer-truncated copy of a model as a draft model.")
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, required=True)
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    write_truncated(open_model(args.model), args.out, args.layers, getattr(torch, args.dtype))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
