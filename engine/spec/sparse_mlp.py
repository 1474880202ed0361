"""Self-speculative drafting with contextual sparsity in the MLPs: the target model, every layer of it, with each MLP
computing only the input channels that matter most for the current token.

WINA (Chen et al., 2025, arXiv:2505.19427) keeps, per token and linear layer, the input channels with the largest
``|x_i| * ||W[:, i]||_2`` (the activation times the norm of the weight column it multiplies), training-free. Sirius
(Zhou et al., 2024, arXiv:2409.03856) found that such a sparse model's mistakes are few and that the dense model can
correct them; here the correction is speculative verification: the sparse model drafts, the dense target verifies,
so the output is the dense model's.

Both input sides of an MLP are sparse: the gate/up projection keeps ``density`` of the hidden channels (scored with
the norms of the fused gate/up columns: one choice for both), the down projection ``density`` of the intermediate
units. Each layer keeps a transposed copy of its MLP weights, in which a channel's weights are one contiguous row, so
a token's projection is the weighted sum of the kept rows and the bytes read shrink with the density; on the CPU the
copy is in 8 bits (ChannelRows). Attention, norms and the LM head are the target's, and the draft shares the
target's KV rows as layer skipping does (engine/spec/model_drafter.py).

``python -m engine.spec.sparse_mlp`` prints the top-1 agreement with the full model at several densities.
"""

from __future__ import annotations

import argparse

import torch
from torch.nn import functional as F

from engine.models import LlamaForCausalLM
from engine.models.llama import MLP
from engine.spec.layer_skip import AgreementProbe, LayerSubset, sample_prompts


class ChannelRows:
    """A linear layer's weight as one row per input channel (its transpose), for weighted sums of a few rows.

    ``int8``: rows stored in 8 bits with a scale and offset each (fbgemm's row-wise format, CPU only): half the bytes
    of bf16, and its weighted-sum kernel is about twice as fast as ``embedding_bag``'s in bf16 at a decode step's
    sizes. The draft is verified, so its small rounding costs at most some acceptance.
    """

    def __init__(self, weight: torch.Tensor, int8: bool) -> None:
        rows = weight.detach().t().contiguous()  # [in, out]
        self.norms = rows.float().norm(dim=1)
        self.int8 = int8
        self.rows = torch.ops.quantized.embedding_bag_byte_prepack(rows.float()) if int8 else rows

    def weighted_sum(self, channels: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Per bag (``offsets`` into the flat ``channels``): the sum of ``weights`` x the channels' rows."""
        if self.int8:
            return torch.ops.quantized.embedding_bag_byte_rowwise_offsets(
                self.rows, channels, offsets, False, 0, False, weights.float(), None, False
            )
        return F.embedding_bag(channels, self.rows, offsets, mode="sum", per_sample_weights=weights.to(self.rows.dtype))


def sparse_matmul(x: torch.Tensor, weight: ChannelRows, keep: int) -> torch.Tensor:
    """``x @ W.T`` [T, in] -> [T, out] over each token's ``keep`` channels of highest ``|x_i| * ||W[:, i]||``."""
    channels = (x.float().abs() * weight.norms).topk(keep, dim=-1).indices
    offsets = torch.arange(0, channels.numel(), keep, device=x.device)
    return weight.weighted_sum(channels.flatten(), x.gather(-1, channels).flatten(), offsets)


class SparseMlp:
    """One layer's SwiGLU MLP with WINA input sparsity on both projections (``int8``: see ChannelRows)."""

    def __init__(self, mlp: MLP, density: float, int8: bool) -> None:
        self.gate_up = ChannelRows(mlp.gate_up_proj.weight, int8)
        self.down = ChannelRows(mlp.down_proj.weight, int8)
        self.hidden_keep = max(1, round(density * self.gate_up.norms.numel()))
        self.intermediate_keep = max(1, round(density * self.down.norms.numel()))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = sparse_matmul(x, self.gate_up, self.hidden_keep).chunk(2, dim=-1)
        return sparse_matmul(F.silu(gate) * up, self.down, self.intermediate_keep).to(x.dtype)


def sparse_network(model: LlamaForCausalLM, density: float) -> LayerSubset:
    """Every layer of ``model``, with sparse MLPs keeping ``density`` of their input channels (a DraftNetwork)."""
    int8 = next(model.parameters()).device.type == "cpu"
    layers = range(len(model.layers))
    return LayerSubset(model, layers, mlps=[SparseMlp(model.layers[i].mlp, density, int8) for i in layers])


def main() -> None:
    from engine.loader import open_model
    from engine.models import build_model

    parser = argparse.ArgumentParser(description="Top-1 agreement of the sparse-MLP draft (draft_mlp_density).")
    parser.add_argument("--model", default=None, help="GGUF file or HF directory; default: the embedded model")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.25, 0.4, 0.5, 0.65, 0.8])
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    source = open_model(args.model)
    model = build_model(source, getattr(torch, args.dtype), torch.device("cpu"), progress=False)
    probe = AgreementProbe(model, sample_prompts(source.tokenizer))
    for density in args.densities:
        print(f"draft_mlp_density={density:<5} top-1 agreement {probe.agreement(sparse_network(model, density)):.1%}")


if __name__ == "__main__":
    main()
