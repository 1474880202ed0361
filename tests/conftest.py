"""Shared fixtures: the default model, the independent HF transformers reference, and reference prompts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from engine.loader.default_model import default_model_path

GPL3 = Path("/usr/share/common-licenses/GPL-3")

# Without a GPU the Triton kernels are checked in Triton's interpreter; Triton reads this when a kernel is defined,
# so it must be set before any test imports kernels.triton_ops.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def model_path() -> Path:
    return default_model_path()


@pytest.fixture(scope="session")
def hf_model(model_path: Path):
    """The reference implementation: HF transformers reading the same GGUF file, in fp32."""
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def hf_tokenizer(model_path: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(model_path.parent), gguf_file=model_path.name)


def long_text(num_chars: int) -> str:
    """Real English text the project did not write (Debian ships the GPL-3 in base-files)."""
    return GPL3.read_text()[:num_chars]


def hf_greedy(hf_model, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Greedy continuation by the reference with its own KV cache, never stopping early (EOS is just a token).

    Returns the new token ids and the logits that chose the first one (at the prompt's last position).
    """
    input_ids = torch.tensor([prompt_ids])
    mask = torch.ones_like(input_ids)
    generated: list[int] = []
    first_logits = None
    past = None
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            out = hf_model(input_ids=input_ids, attention_mask=mask, past_key_values=past, use_cache=True)
            logits = out.logits[0, -1].float()
            if first_logits is None:
                first_logits = logits
            past = out.past_key_values
            token = int(logits.argmax())
            generated.append(token)
            input_ids = torch.tensor([[token]])
            mask = torch.cat([mask, torch.ones((1, 1), dtype=mask.dtype)], dim=1)
    return generated, first_logits
