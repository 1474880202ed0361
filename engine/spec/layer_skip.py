"""Self-speculative drafting: the target model with some of its decoder layers left out (training-free, sharing the
target's weights and KV rows), ending in the target's final norm and LM head. Keeping a leading run of layers is an
early exit; leaving out layers in the middle is layer skipping.

``python -m engine.spec.layer_skip --keep 15`` searches a set of layers for the configured model on sample prompts.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Sequence

import torch

from engine.errors import ConfigError
from engine.model_runner import flatten
from engine.models import AttentionContext, LlamaForCausalLM
from engine.spec.model_drafter import DraftNetwork
from engine.tokenizer import Tokenizer
from kernels.cpu_attention import CpuAttentionBackend
from scheduler.output import ScheduledRequest


def parse_layers(text: str, num_layers: int) -> list[int]:
    """``"0-5,8,11-29"`` -> the sorted layer indices; a clear error for bad syntax, out-of-range or all layers."""
    layers: set[int] = set()
    for part in text.replace(" ", "").split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if match is None:
            raise ConfigError(f"draft_layers {text!r}: expected layer indices and ranges such as '0-5,8,11-29'")
        first, last = int(match[1]), int(match[2] or match[1])
        if not first <= last < num_layers:
            raise ConfigError(f"draft_layers {text!r}: {part!r} is not a range of layers 0-{num_layers - 1}")
        layers.update(range(first, last + 1))
    if len(layers) == num_layers:
        raise ConfigError(f"draft_layers {text!r} keeps every layer: the draft would cost as much as the target")
    return sorted(layers)


def format_layers(layers: Sequence[int]) -> str:
    """The inverse of parse_layers, with runs written as ranges."""
    runs: list[list[int]] = []
    for layer in sorted(layers):
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return ",".join(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}" for run in runs)


class LayerSubset:
    """The target's embedding, the given layers in order, its final norm and LM head (a DraftNetwork); ``mlps``, one
    per given layer, replace those layers' MLPs (engine/spec/sparse_mlp.py)."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        layers: Sequence[int],
        mlps: Sequence[Callable[[torch.Tensor], torch.Tensor]] | None = None,
    ) -> None:
        self.model = model
        self.layers = list(layers)
        self.mlps = list(mlps) if mlps is not None else [None] * len(self.layers)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        return self.model.run_layers(input_ids, positions, ctx, self.layers, self.mlps)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(hidden)


# ---------------------------------------------------------------- choosing the layers


class AgreementProbe:
    """Teacher-forced top-1 agreement of a layer subset with the full model on sample prompts.

    Each prompt runs as one prefill through a scratch paged cache, so the subset here computes its own K/V for the
    context, where serving reads the target's: a proxy that ranks layers well enough to pick a set, cheaply.
    """

    def __init__(self, model: LlamaForCausalLM, prompts: Sequence[Sequence[int]], block_size: int = 16) -> None:
        self.model = model
        self.backend = CpuAttentionBackend()
        spec = model.spec
        dtype = next(model.parameters()).dtype
        self.dtype = dtype
        longest = max(len(p) for p in prompts)
        num_blocks = -(-longest // block_size)
        shape = (num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
        self.kv = [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in model.layers]
        table = list(range(num_blocks))
        self.batches = [
            flatten([ScheduledRequest("p", list(p), 0, 0, table, True)], block_size, torch.device("cpu"))
            for p in prompts
        ]
        self.targets = self._predictions(LayerSubset(model, range(len(model.layers))))

    @torch.inference_mode()
    def _predictions(self, network: DraftNetwork) -> list[torch.Tensor]:
        out = []
        for layout, ids, positions in self.batches:
            ctx = AttentionContext(self.backend, self.backend.prepare(layout, self.dtype), self.kv)
            out.append(network.compute_logits(network(ids, positions, ctx)).argmax(dim=-1))
        return out

    def agreement(self, network: DraftNetwork) -> float:
        predictions = self._predictions(network)
        same = sum(int((p == t).sum()) for p, t in zip(predictions, self.targets))
        return same / sum(len(t) for t in self.targets)


def search_layers(
    model: LlamaForCausalLM, prompts: Sequence[Sequence[int]], keep: int
) -> list[tuple[str, list[int], float]]:
    """Candidate sets of ``keep`` layers with their agreement, best first: the early exit (the first ``keep``
    layers), and layer skipping that leaves out the layers whose removal alone costs the least agreement."""
    probe = AgreementProbe(model, prompts)
    num_layers = len(model.layers)
    every = list(range(num_layers))
    # The first and last layers are always kept: dropping either alone wrecks the output of small models.
    alone = {i: probe.agreement(LayerSubset(model, [j for j in every if j != i])) for i in every[1:-1]}
    dropped = sorted(alone, key=alone.get, reverse=True)[: num_layers - keep]
    skipping = [i for i in every if i not in dropped]
    candidates = [("early exit", every[:keep]), ("layer skipping", skipping)]
    scored = [(name, layers, probe.agreement(LayerSubset(model, layers))) for name, layers in candidates]
    return sorted(scored, key=lambda entry: entry[2], reverse=True)


def sample_prompts(tokenizer: Tokenizer) -> list[list[int]]:
    """A few short chat prompts of different kinds, to compare a draft network with the full model on."""
    texts = [
        "Summarise: the committee met on Tuesday and agreed to extend the library's opening hours to nine.",
        "Write a Python function that returns the squares of a list of numbers.",
        "Explain why the sky is blue in two sentences.",
    ]
    return [tokenizer.encode_chat([{"role": "user", "content": text}]) for text in texts]


def main() -> None:
    from engine.loader import open_model
    from engine.models import build_model

    parser = argparse.ArgumentParser(description="Pick the layers of a self-speculative draft (draft_layers).")
    parser.add_argument("--model", default=None, help="GGUF file or HF directory; default: the embedded model")
    parser.add_argument("--keep", type=int, required=True, help="layers the draft runs")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    source = open_model(args.model)
    model = build_model(source, getattr(torch, args.dtype), torch.device("cpu"), progress=False)
    for name, layers, agreement in search_layers(model, sample_prompts(source.tokenizer), args.keep):
        print(f"{name:<15} draft_layers={format_layers(layers):<30} top-1 agreement {agreement:.1%}")


if __name__ == "__main__":
    main()
