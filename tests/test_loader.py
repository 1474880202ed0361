"""Model loading: GGUF and Hugging Face directories give the weights the reference implementation sees, and bad
input is refused with one clear error.

References: HF transformers (its own GGUF reader, dequantizer and Q/K un-permutation), a block decoder for Q4_1/Q8_0
written here from the GGML block layout, llama.cpp's Q/K row permutation, and transformers' logits for a small
random model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.errors import ModelLoadError
from engine.loader import open_model
from engine.loader.hf_export import export_hf_directory
from engine.models import AttentionContext, build_model
from kernels.backend import BatchLayout
from kernels.cpu_attention import CpuAttentionBackend
from server.cli import main as cli_main
from tests.conftest import long_text

transformers = pytest.importorskip("transformers")

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]
QT = gguf.GGMLQuantizationType


def build(path: Path | str):
    source = open_model(path)
    return source, build_model(source, torch.float32, CPU, progress=False)


# --- the default model: GGUF loader vs HF transformers vs the HF-directory loader ------------------------------------


@pytest.fixture(scope="module")
def gguf_built(model_path: Path):
    return build(model_path)


@pytest.fixture(scope="module")
def hf_saved_dir(hf_model, hf_tokenizer, tmp_path_factory) -> Path:
    """What ``save_pretrained`` writes for the default model, as transformers dequantized it from the GGUF."""
    out = tmp_path_factory.mktemp("hf_saved")
    config_dict = hf_model.config.to_dict()
    config_dict.pop("quantization_config", None)  # a GGUF-quantized model refuses to serialize; the copy is plain
    config = type(hf_model.config).from_dict(config_dict)
    with torch.device("meta"):
        plain = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(hf_model.state_dict(), assign=True)
    plain.tie_weights()
    plain.save_pretrained(out, safe_serialization=True)
    hf_tokenizer.save_pretrained(out)
    return out


def test_hf_directory_and_gguf_give_the_same_model(gguf_built, hf_saved_dir: Path) -> None:
    gguf_source, gguf_model = gguf_built
    hf_source, hf_dir_model = build(hf_saved_dir)

    saved = json.loads((hf_saved_dir / "config.json").read_text())
    assert saved["tie_word_embeddings"] is True
    with safe_open(str(hf_saved_dir / "model.safetensors"), framework="pt") as shard:
        assert "lm_head.weight" not in set(shard.keys())  # the tied head is not saved: the loader must tie it

    def fields(spec):
        return {k: v for k, v in dataclasses.asdict(spec).items() if k != "name"}

    assert fields(hf_source.spec) == fields(gguf_source.spec)
    assert gguf_source.spec.rope_theta == 100000.0 and gguf_source.spec.num_kv_heads == 3
    assert hf_source.tokenizer.vocab_size == gguf_source.tokenizer.vocab_size

    hf_params = dict(hf_dir_model.named_parameters(remove_duplicate=False))
    gguf_params = dict(gguf_model.named_parameters(remove_duplicate=False))
    assert hf_params.keys() == gguf_params.keys()
    different = [name for name in hf_params if not torch.equal(hf_params[name], gguf_params[name])]
    assert different == []
    assert hf_dir_model.lm_head.weight.data_ptr() == hf_dir_model.embed_tokens.weight.data_ptr()


def test_gguf_weights_equal_transformers_dequantized_weights(gguf_built, hf_model) -> None:
    """Every parameter of every layer equals what transformers decodes from the same file."""
    spec = gguf_built[0].spec
    ours = gguf_built[1]
    theirs = dict(hf_model.named_parameters(remove_duplicate=False))
    q, kv, inter = spec.q_size, spec.kv_size, spec.intermediate_size
    compared = 0

    def same(our: torch.Tensor, name: str) -> None:
        nonlocal compared
        assert torch.equal(our, theirs[name]), name
        compared += 1

    same(ours.embed_tokens.weight, "model.embed_tokens.weight")
    same(ours.norm.weight, "model.norm.weight")
    same(ours.lm_head.weight, "lm_head.weight")
    for i, layer in enumerate(ours.layers):
        prefix = f"model.layers.{i}."
        qkv = layer.self_attn.qkv_proj.weight
        same(qkv[:q], prefix + "self_attn.q_proj.weight")
        same(qkv[q : q + kv], prefix + "self_attn.k_proj.weight")
        same(qkv[q + kv :], prefix + "self_attn.v_proj.weight")
        same(layer.self_attn.o_proj.weight, prefix + "self_attn.o_proj.weight")
        gate_up = layer.mlp.gate_up_proj.weight
        same(gate_up[:inter], prefix + "mlp.gate_proj.weight")
        same(gate_up[inter:], prefix + "mlp.up_proj.weight")
        same(layer.mlp.down_proj.weight, prefix + "mlp.down_proj.weight")
        same(layer.input_layernorm.weight, prefix + "input_layernorm.weight")
        same(layer.post_attention_layernorm.weight, prefix + "post_attention_layernorm.weight")
    assert compared == 3 + 9 * spec.num_layers == len(theirs)


def decode_blocks(raw: np.ndarray, kind: QT, row_length: int) -> np.ndarray:
    """GGML block formats, decoded from their definition: Q8_0 = f16 scale + 32 int8; Q4_1 = f16 scale, f16 min,
    16 bytes whose low nibbles are elements 0..15 and high nibbles elements 16..31."""
    if kind == QT.Q8_0:
        blocks = raw.reshape(-1, 34)
        scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)
        quants = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
        values = scale * quants
    elif kind == QT.Q4_1:
        blocks = raw.reshape(-1, 20)
        scale = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
        minimum = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        packed = blocks[:, 4:]
        quants = np.concatenate([packed & 0x0F, packed >> 4], axis=1).astype(np.float32)
        values = scale * quants + minimum
    elif kind == QT.F32:
        values = raw.copy().view(np.float32)
    else:
        raise AssertionError(f"no test decoder for {kind.name}")
    return values.reshape(-1, row_length)


def llama_cpp_permute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The row order convert_hf_to_gguf.py writes Q/K projections in (for llama.cpp's interleaved RoPE)."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, 2, rows // num_heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def test_gguf_blocks_decode_to_our_weights(gguf_built, model_path: Path) -> None:
    """The raw file bytes, decoded here, equal our weights (Q/K brought back to the file's row order)."""
    spec, model = gguf_built[0].spec, gguf_built[1]
    tensors = {t.name: t for t in gguf_built[0].gguf_reader.tensors}
    last = spec.num_layers - 1
    q, kv = spec.q_size, spec.kv_size
    expected = {
        "token_embd.weight": model.embed_tokens.weight,
        "output_norm.weight": model.norm.weight,
        **{
            f"blk.{i}.{name}": tensor
            for i in (0, last)
            for name, tensor in {
                "attn_q.weight": llama_cpp_permute(model.layers[i].self_attn.qkv_proj.weight[:q], spec.num_heads),
                "attn_k.weight": llama_cpp_permute(
                    model.layers[i].self_attn.qkv_proj.weight[q : q + kv], spec.num_kv_heads
                ),
                "attn_v.weight": model.layers[i].self_attn.qkv_proj.weight[q + kv :],
                "ffn_down.weight": model.layers[i].mlp.down_proj.weight,
                "attn_norm.weight": model.layers[i].input_layernorm.weight,
            }.items()
        },
    }
    kinds = set()
    for name, ours in expected.items():
        info = tensors[name]
        raw = np.fromfile(model_path, dtype=np.uint8, count=int(info.n_bytes), offset=int(info.data_offset))
        decoded = torch.from_numpy(decode_blocks(raw, info.tensor_type, int(info.shape[0])))
        assert decoded.shape == ours.reshape(-1, decoded.shape[-1]).shape, name
        assert torch.equal(decoded, ours.reshape(decoded.shape)), name
        kinds.add(info.tensor_type)
    assert kinds == {QT.Q8_0, QT.Q4_1, QT.F32}


# --- a small random model: HF directory and GGUF, against transformers' logits ----------------------------------------

TINY_VOCAB = 256


def tiny_tokenizer_json(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, TINY_VOCAB)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path / "tokenizer.json"))


def random_llama(tie: bool, seed: int):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=50000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.2)  # large enough that attention is far from uniform
    return model


def write_tiny_gguf(path: Path, model, tie: bool) -> None:
    """The same weights as llama.cpp's converter would write them: F32, Q/K rows permuted, lm_head only if untied."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(["<unk>", "w", "1", *(f"w{i}" for i in range(1, TINY_VOCAB - 2))])
    writer.add_token_types([1] * TINY_VOCAB)
    writer.add_token_merges(["w 1"])
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    if not tie:
        writer.add_tensor("output.weight", state["lm_head.weight"])
    names = {
        "self_attn.o_proj": "attn_output",
        "self_attn.v_proj": "attn_v",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    for i in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{i}."
        q = llama_cpp_permute(model.model.layers[i].self_attn.q_proj.weight.detach(), cfg.num_attention_heads)
        k = llama_cpp_permute(model.model.layers[i].self_attn.k_proj.weight.detach(), cfg.num_key_value_heads)
        writer.add_tensor(f"blk.{i}.attn_q.weight", q.numpy())
        writer.add_tensor(f"blk.{i}.attn_k.weight", k.numpy())
        for hf, ours in names.items():
            writer.add_tensor(f"blk.{i}.{ours}.weight", state[f"{prefix}{hf}.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def tiny(request, tmp_path_factory):
    tie = request.param
    model = random_llama(tie, seed=7 + tie)
    directory = tmp_path_factory.mktemp(f"tiny_{'tied' if tie else 'untied'}")
    model.save_pretrained(directory, safe_serialization=True)
    tiny_tokenizer_json(directory)
    gguf_path = directory.parent / f"{directory.name}.gguf"
    write_tiny_gguf(gguf_path, model, tie)
    return model, directory, gguf_path


def run_steps(model, token_ids: list[int], chunks: list[int], block_size: int = 4) -> list[torch.Tensor]:
    """Feed one sequence through the paged CPU backend in chunks (prefill, prefill with cached prefix, decodes)."""
    spec = model.spec
    backend = CpuAttentionBackend()
    num_blocks = 12
    block_table = [9, 2, 7, 0, 11, 4, 1, 5, 3, 10, 6, 8][: -(-len(token_ids) // block_size)]
    caches = [
        (
            torch.zeros(num_blocks, block_size, spec.num_kv_heads, spec.head_dim),
            torch.zeros(num_blocks, block_size, spec.num_kv_heads, spec.head_dim),
        )
        for _ in range(spec.num_layers)
    ]
    outputs, start = [], 0
    for length in chunks:
        positions = list(range(start, start + length))
        slots = [block_table[p // block_size] * block_size + p % block_size for p in positions]
        layout = BatchLayout(
            query_lens=[length],
            context_lens=[start + length],
            block_tables=[block_table],
            slot_mapping=torch.tensor(slots),
            block_size=block_size,
        )
        ctx = AttentionContext(backend, backend.prepare(layout, torch.float32), caches)
        with torch.inference_mode():
            hidden = model(torch.tensor(token_ids[start : start + length]), torch.tensor(positions), ctx)
            outputs.append(model.compute_logits(hidden))
        start += length
    return outputs


def test_tiny_model_logits_match_transformers(tiny) -> None:
    reference_model, directory, _ = tiny
    source, model = build(directory)
    spec = source.spec
    assert (spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.rope_theta) == (4, 2, 16, 50000.0)
    assert spec.tie_word_embeddings == reference_model.config.tie_word_embeddings
    token_ids = torch.randint(1, TINY_VOCAB, (15,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.inference_mode():
        reference = reference_model(torch.tensor([token_ids])).logits[0]
    chunks = [6, 7, 1, 1]  # a prefill, a prefill after a cached prefix (crossing blocks), two decodes
    logits = torch.cat(run_steps(model, token_ids, chunks))
    assert logits.shape == reference.shape
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)


def test_tiny_gguf_loads_the_same_weights_as_its_hf_directory(tiny) -> None:
    _, directory, gguf_path = tiny
    hf_source, from_dir = build(directory)
    gguf_source, from_gguf = build(gguf_path)
    # GGUF stores the epsilon as float32
    hf_spec = dataclasses.replace(hf_source.spec, name="", rms_norm_eps=float(np.float32(hf_source.spec.rms_norm_eps)))
    assert dataclasses.replace(gguf_source.spec, name="") == hf_spec
    dir_params = dict(from_dir.named_parameters(remove_duplicate=False))
    gguf_params = dict(from_gguf.named_parameters(remove_duplicate=False))
    assert dir_params.keys() == gguf_params.keys()
    assert [n for n in dir_params if not torch.equal(dir_params[n], gguf_params[n])] == []


# --- export: the served model as a Hugging Face directory, for servers that read only that format ---------------


@pytest.fixture(scope="module")
def exported_fp32(model_path: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exported_fp32")
    export_hf_directory(open_model(model_path), out, torch.float32)
    return out


def test_exported_directory_gives_transformers_our_logits(gguf_built, exported_fp32: Path, hf_tokenizer) -> None:
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(exported_fp32), dtype=torch.float32).eval()
    token_ids = hf_tokenizer("The quick brown fox jumps over the lazy dog, and then it")["input_ids"]
    with torch.inference_mode():
        theirs = reference(torch.tensor([token_ids])).logits[0]
    ours = torch.cat(run_steps(gguf_built[1], token_ids, [len(token_ids) - 2, 1, 1]))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_exported_tokenizer_and_eos_match_the_gguf_ones(exported_fp32: Path, hf_tokenizer, hf_model) -> None:
    exported = transformers.AutoTokenizer.from_pretrained(str(exported_fp32))
    texts = [long_text(800), "h\u00e9llo w\u00f6rld 12345 <|im_start|>user\nhi<|im_end|>", "  tabs\tand\n\nnewlines  "]
    for text in texts:
        assert exported(text)["input_ids"] == hf_tokenizer(text)["input_ids"]
    messages = [{"role": "user", "content": "What is 2+2?"}]
    assert exported.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    )
    generation = transformers.GenerationConfig.from_pretrained(str(exported_fp32))
    assert generation.eos_token_id == [hf_model.generation_config.eos_token_id]


def test_export_cli_writes_bf16_weights_rounded_from_the_reference(model_path: Path, hf_model, tmp_path: Path) -> None:
    assert cli_main(["export-hf", str(tmp_path), "--model", str(model_path)]) == 0
    reference = dict(hf_model.named_parameters(remove_duplicate=False))
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as shard:
        assert set(shard.keys()) == set(reference) - {"lm_head.weight"}  # tied: transformers ties it on load
        for name in shard.keys():  # noqa: SIM118 - safe_open has no __iter__
            weight = shard.get_tensor(name)
            assert weight.dtype == torch.bfloat16 and torch.equal(weight, reference[name].to(torch.bfloat16)), name
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"


def test_safetensors_index_selects_the_model_shards(tiny, tmp_path: Path) -> None:
    """A stray ``consolidated.safetensors`` beside the indexed shards is not loaded."""
    _, directory, _ = tiny
    copy = tmp_path / "indexed"
    shutil.copytree(directory, copy)
    save_file({"layers.0.attention.wq.weight": torch.zeros(2, 2)}, copy / "consolidated.safetensors")
    with pytest.raises(ModelLoadError, match="unexpected weight"):
        build(copy)  # without an index every file is a shard
    with safe_open(str(copy / "model.safetensors"), framework="pt") as shard:
        weight_map = dict.fromkeys(shard.keys(), "model.safetensors")
    (copy / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _, model = build(copy)
    _, reference = build(directory)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))

    (copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00002.safetensors"}}))
    with pytest.raises(ModelLoadError, match=r"model-00002\.safetensors"):
        open_model(copy)


# --- bad input: one clear error naming the problem ------------------------------------------------------------------


def test_missing_paths(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"not found.*nope\.gguf"):
        open_model(tmp_path / "nope.gguf")
    with pytest.raises(ModelLoadError, match=r"not found.*nothing_here"):
        open_model(tmp_path / "nothing_here")
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        open_model(tmp_path)


@pytest.fixture(scope="module")
def cut_points(gguf_built, model_path: Path) -> dict[str, int]:
    reader = gguf_built[0].gguf_reader
    return {
        "in-magic": 2,
        "in-header": 12,
        "in-metadata": int(reader.fields["general.name"].offset) + 3,
        "in-tokenizer-metadata": int(reader.fields["tokenizer.ggml.merges"].offset) + 1000,
        "in-tensor-infos": int(reader.tensors[0].field.offset) + 5,
        "in-first-tensor-data": int(reader.data_offset) + 1000,
        "last-byte-missing": model_path.stat().st_size - 1,
    }


@pytest.mark.parametrize(
    "where",
    [
        "in-magic",
        "in-header",
        "in-metadata",
        # Each cut past the tokenizer re-parses ~2 MB of metadata (2-3 s); two of them run by default.
        pytest.param("in-tokenizer-metadata", marks=pytest.mark.slow),
        pytest.param("in-tensor-infos", marks=pytest.mark.slow),
        "in-first-tensor-data",
        "last-byte-missing",
    ],
)
def test_truncated_gguf(where: str, cut_points: dict[str, int], model_path: Path, tmp_path: Path) -> None:
    cut = cut_points[where]
    assert 0 < cut < model_path.stat().st_size
    truncated = tmp_path / "cut.gguf"
    with model_path.open("rb") as src, truncated.open("wb") as dst:
        dst.write(src.read(cut))
    with pytest.raises(ModelLoadError, match=r"cut\.gguf.*truncated"):
        open_model(truncated)  # refused when opened, not later while the weights stream in


def test_random_bytes_gguf(tmp_path: Path) -> None:
    path = tmp_path / "noise.gguf"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ModelLoadError, match=r"noise\.gguf.*not a readable GGUF"):
        open_model(path)


def write_gguf(
    path: Path, arch: str, tensors: dict[str, tuple[np.ndarray, QT | None]], skip: str = "", text: str = ""
) -> None:
    """A tiny GGUF with the llama hyper-parameter keys, except ``skip`` (left out) and ``text`` (stored as a string)."""
    writer = gguf.GGUFWriter(str(path), arch)
    setters = {
        "block_count": lambda: writer.add_block_count(1),
        "context_length": lambda: writer.add_context_length(64),
        "embedding_length": lambda: writer.add_embedding_length(256),
        "feed_forward_length": lambda: writer.add_feed_forward_length(64),
        "head_count": lambda: writer.add_head_count(4),
        "layer_norm_rms_epsilon": lambda: writer.add_layer_norm_rms_eps(1e-5),
        "vocab_size": lambda: writer.add_vocab_size(4),
    }
    for key, setter in setters.items():
        if key == text:
            writer.add_string(f"{arch}.{key}", "wide")
        elif key != skip:
            setter()
    for name, (array, raw_dtype) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = tmp_path / "ssm.gguf"
    write_gguf(path, "mamba", {"token_embd.weight": (np.zeros((4, 256), np.float32), None)})
    with pytest.raises(ModelLoadError, match=r"ssm\.gguf: unsupported architecture 'mamba'"):
        open_model(path)


def test_unsupported_quantization_type(tmp_path: Path) -> None:
    block_elements, block_bytes = gguf.GGML_QUANT_SIZES[QT.IQ2_XXS]
    raw = np.random.default_rng(1).integers(0, 256, (4, 256 // block_elements * block_bytes), dtype=np.uint8)
    path = tmp_path / "iq2.gguf"
    write_gguf(path, "llama", {"token_embd.weight": (raw, QT.IQ2_XXS)})
    assert QT.IQ2_XXS in {t.tensor_type for t in gguf.GGUFReader(path).tensors}
    with pytest.raises(ModelLoadError, match=r"iq2\.gguf: tensor 'token_embd\.weight'.*unsupported.*IQ2_XXS"):
        open_model(path)


def test_missing_metadata_key(tmp_path: Path) -> None:
    path = tmp_path / "nohidden.gguf"
    write_gguf(path, "llama", {"token_embd.weight": (np.zeros((4, 256), np.float32), None)}, skip="embedding_length")
    with pytest.raises(ModelLoadError, match=r"nohidden\.gguf.*'llama\.embedding_length'"):
        open_model(path)


def test_malformed_metadata_value(tmp_path: Path) -> None:
    path = tmp_path / "strhidden.gguf"
    write_gguf(path, "llama", {"token_embd.weight": (np.zeros((4, 256), np.float32), None)}, text="embedding_length")
    with pytest.raises(ModelLoadError, match=r"strhidden\.gguf: invalid llama metadata.*'wide'"):
        open_model(path)


def test_gguf_without_tokenizer(tmp_path: Path) -> None:
    path = tmp_path / "notok.gguf"
    write_gguf(path, "llama", {"token_embd.weight": (np.zeros((4, 256), np.float32), None)})
    with pytest.raises(ModelLoadError, match=r"notok\.gguf.*tokenizer\.ggml\.tokens"):
        open_model(path)


@pytest.fixture
def tiny_copy(tiny, tmp_path: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(tiny[1], copy)
    return copy


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_safetensors(tiny_copy: Path, damage: str) -> None:
    weights = tiny_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"garbage": os.urandom(4096), "truncated": data[: len(data) // 2], "empty": b""}[damage])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors is not a readable safetensors file"):
        open_model(tiny_copy)


def edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model_type": "gpt2"}, r"unsupported model_type 'gpt2'"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0, "factor": 4.0}}, r"rope_parameters.*yarn"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, r"rope_scaling.*llama3"),
        ({"hidden_size": "wide"}, r"config\.json has an invalid value"),
    ],
)
def test_bad_hf_config(tiny_copy: Path, changes: dict, message: str) -> None:
    edit_config(tiny_copy, **changes)
    with pytest.raises(ModelLoadError, match=message):
        open_model(tiny_copy)


def test_hf_config_missing_key_or_not_json(tiny_copy: Path) -> None:
    config = json.loads((tiny_copy / "config.json").read_text())
    del config["num_hidden_layers"]
    (tiny_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="missing the required key 'num_hidden_layers'"):
        open_model(tiny_copy)
    (tiny_copy / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"config\.json is not valid JSON"):
        open_model(tiny_copy)


def test_hf_directory_without_weights_or_tokenizer(tiny_copy: Path) -> None:
    (tiny_copy / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match=r"tokenizer.*tokenizer\.json"):
        open_model(tiny_copy)
    (tiny_copy / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors weight files"):
        open_model(tiny_copy)


@pytest.mark.parametrize("kind", ["missing", pytest.param("noise", marks=pytest.mark.slow)])
def test_cli_reports_one_line_without_traceback(kind: str, tmp_path: Path) -> None:
    if kind == "missing":
        model = "/nonexistent.gguf"
    else:
        model = str(tmp_path / "noise.gguf")
        Path(model).write_bytes(b"GGUF" + os.urandom(1000))
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "generate", "--model", model, "hi"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("spindle: error: ")]
    assert len(errors) == 1, result.stderr
    assert model in errors[0]
    assert result.stdout == ""
