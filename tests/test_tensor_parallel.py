"""Tensor parallelism: how the model is split, and two ranks (two processes, one thread each) giving the same greedy
tokens as one rank in fp32, offline and over HTTP; a worker that dies or hangs fails requests and /health, never
hangs them."""

from __future__ import annotations

import itertools
import json
import signal
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import httpx
import psutil
import pytest
import torch

from engine import LLM, SamplingParams
from engine.config import build_config
from engine.errors import ConfigError
from engine.llm_engine import LLMEngine
from engine.model_spec import ModelSpec
from engine.parallel.shard import TensorShard
from engine.structured.spec import StructuredOutputs
from tests.test_reference_greedy import CHAT_PROMPTS, RAW_PROMPTS

if TYPE_CHECKING:
    from tests.server_fixtures import ServerProcess

pytest_plugins = ["tests.server_fixtures"]

SETTINGS = {"kv_cache_memory": "128MiB", "max_model_len": 2048}
TP2 = SETTINGS | {"tensor_parallel_size": 2, "num_threads": 1}
NEW_TOKENS = 32
# Two processes load the model on the same cores, each at the pace of a one-thread process.
TP_STARTUP_TIMEOUT = 300.0
FAILURE_BOUND_SECONDS = 30.0  # a failed rank must show within this (the collective timeout in the hang test is 5 s)


def spec_of(heads: int, kv_heads: int, intermediate: int, vocab: int) -> ModelSpec:
    return ModelSpec("llama", vocab, 64, intermediate, 2, heads, kv_heads, 8, 10000.0, 1e-5, 128, True)


# ---------------------------------------------------------------------------------------------- the split itself
def test_default_model_splits_by_whole_kv_groups() -> None:
    """SmolLM2's 9 query heads over 3 KV heads cannot halve: rank 0 takes 2 KV heads and their 6 query heads."""
    spec = spec_of(9, 3, 1536, 49152)
    first, second = TensorShard.of(spec, 0, 2), TensorShard.of(spec, 1, 2)
    assert (first.kv_heads, first.heads, second.kv_heads, second.heads) == ((0, 2), (0, 6), (2, 3), (6, 9))
    assert (first.intermediate, second.intermediate) == ((0, 768), (768, 1536))
    assert (first.vocab, second.vocab) == ((0, 24576), (24576, 49152))


@pytest.mark.parametrize(("heads", "kv_heads", "world_size"), [(9, 3, 2), (9, 3, 3), (8, 8, 3), (32, 8, 4), (6, 2, 2)])
def test_shards_partition_heads_units_and_vocabulary(heads: int, kv_heads: int, world_size: int) -> None:
    spec = spec_of(heads, kv_heads, 1001, 997)
    shards = [TensorShard.of(spec, rank, world_size) for rank in range(world_size)]
    group = heads // kv_heads
    for field, total in (("kv_heads", kv_heads), ("heads", heads), ("intermediate", 1001)):
        ranges = [getattr(shard, field) for shard in shards]
        assert ranges[0][0] == 0 and ranges[-1][1] == total
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))  # contiguous, no overlap
        sizes = [end - start for start, end in ranges]
        assert min(sizes) >= 1 and max(sizes) - min(sizes) <= (group if field == "heads" else 1)
    for shard in shards:  # each rank's query heads are exactly the ones its KV heads serve
        assert shard.heads == (shard.kv_heads[0] * group, shard.kv_heads[1] * group)
    widths = {shard.vocab[1] - shard.vocab[0] for shard in shards}
    assert len(widths) == 1 and widths.pop() * world_size >= 997  # equal widths: one gather, padded past the end


def test_cut_weights_reassemble_the_full_weights() -> None:
    """Every rank's slices, put back together along the split dimension, are the original weight: nothing is lost
    or duplicated, and the padded vocabulary rows are zero."""
    spec = spec_of(6, 3, 50, 101)  # 101 rows do not split evenly in 2
    head_dim, hidden = spec.head_dim, spec.hidden_size
    shapes = {
        "model.layers.0.self_attn.q_proj.weight": (spec.q_size, hidden),
        "model.layers.0.self_attn.k_proj.weight": (spec.kv_size, hidden),
        "model.layers.0.self_attn.v_proj.weight": (spec.kv_size, hidden),
        "model.layers.0.self_attn.o_proj.weight": (hidden, spec.q_size),
        "model.layers.0.mlp.gate_proj.weight": (50, hidden),
        "model.layers.0.mlp.up_proj.weight": (50, hidden),
        "model.layers.0.mlp.down_proj.weight": (hidden, 50),
        "model.embed_tokens.weight": (101, hidden),
        "model.layers.0.input_layernorm.weight": (hidden,),
    }
    shards = [TensorShard.of(spec, rank, 2) for rank in range(2)]
    for name, shape in shapes.items():
        full = torch.randn(shape, generator=torch.Generator().manual_seed(len(name)))
        parts = [shard.cut(name, full, head_dim) for shard in shards]
        if "norm" in name:
            assert all(torch.equal(part, full) for part in parts)
            continue
        dim = 1 if any(k in name for k in ("o_proj", "down_proj")) else 0
        joined = torch.cat(parts, dim=dim)
        if "embed_tokens" in name:
            assert torch.count_nonzero(joined[101:]) == 0 and joined.shape[0] == 102
            joined = joined[:101]
        assert torch.equal(joined, full), name


def test_more_ranks_than_kv_heads_is_refused() -> None:
    with pytest.raises(ConfigError, match="exceeds the model's 3 KV heads"):
        LLMEngine(build_config("fp32", SETTINGS | {"tensor_parallel_size": 4}))


def test_kv_policy_with_tensor_parallelism_is_refused() -> None:
    with pytest.raises(ConfigError, match="kv_policy cannot be combined with tensor_parallel_size"):
        LLMEngine(build_config("fp32", TP2 | {"kv_policy": "sink_window", "kv_budget": 256}))


# ---------------------------------------------------------------------------------------------- two ranks vs one
@pytest.fixture(scope="module")
def tp1() -> LLM:
    return LLM(config=build_config("fp32", SETTINGS))


@pytest.fixture(scope="module")
def tp2() -> Iterator[LLM]:
    llm = LLM(config=build_config("fp32", TP2))
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def prompts(tp1: LLM) -> list[list[int]]:
    return [tp1.tokenizer.encode_chat(m) for m in CHAT_PROMPTS] + [tp1.tokenizer.encode(t) for t in RAW_PROMPTS]


def test_two_ranks_hold_only_their_slices(tp2: LLM, tp1: LLM) -> None:
    whole, shard = tp1.engine.runner, tp2.engine.runner
    key_cache, _ = shard.kv_caches[0]
    assert key_cache.shape[2] == 2  # rank 0's KV heads; rank 1 holds the third
    assert shard.model.layers[0].self_attn.qkv_proj.weight.shape[0] == (6 + 2 * 2) * 64
    assert shard.model.layers[0].mlp.down_proj.weight.shape[1] == 768
    assert shard.model.embed_tokens.weight.shape[0] == 49152 // 2
    params = lambda runner: sum(p.numel() for p in runner.model.parameters())  # noqa: E731
    assert params(shard) < 0.6 * params(whole)


def test_one_tensor_parallel_engine_per_process(tp2: LLM) -> None:
    with pytest.raises(ConfigError, match="already runs a tensor-parallel engine"):
        LLMEngine(build_config("fp32", TP2))


def test_two_ranks_greedy_equals_one_rank(tp1: LLM, tp2: LLM, prompts: list[list[int]]) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    expected = [r.outputs[0].token_ids for r in tp1.generate(prompts, params)]
    got = [r.outputs[0].token_ids for r in tp2.generate(prompts, params)]
    for i, (tokens, reference) in enumerate(zip(got, expected)):
        assert tokens == reference, f"prompt {i} diverged"


def test_two_ranks_logprobs_match_one_rank(tp1: LLM, tp2: LLM, prompts: list[list[int]]) -> None:
    """The gathered vocabulary shards give the same distribution: top-20 logprobs of the first token and the
    prompt logprobs of a short prompt, within 1e-4."""
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=20, prompt_logprobs=3)
    chosen = [prompts[0], prompts[4]]
    for one, two in zip(tp1.generate(chosen, params), tp2.generate(chosen, params)):
        a, b = one.outputs[0], two.outputs[0]
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs + (a.prompt_logprobs or []), b.logprobs + (b.prompt_logprobs or [])):
            assert x.token_id == y.token_id and abs(x.logprob - y.logprob) < 1e-4
            assert [t for t, _ in x.top_logprobs] == [t for t, _ in y.top_logprobs]


def test_two_ranks_structured_output_equals_one_rank(tp1: LLM, tp2: LLM) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    params = SamplingParams(temperature=0.0, max_tokens=48, structured_outputs=StructuredOutputs.json_schema(schema))
    prompt = tp1.tokenizer.encode_chat([{"role": "user", "content": "Give a JSON object with a name."}])
    one, two = (llm.generate([prompt], params)[0].outputs[0] for llm in (tp1, tp2))
    assert two.token_ids == one.token_ids
    assert "name" in json.loads(two.text)


@pytest.mark.slow
def test_two_ranks_greedy_matches_reference(tp2: LLM, prompts: list[list[int]], hf_model) -> None:
    """Against HF transformers directly (64 tokens, the reference-greedy prompt set)."""
    from tests.conftest import hf_greedy

    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    for i, result in enumerate(tp2.generate(prompts, params)):
        assert result.outputs[0].token_ids == hf_greedy(hf_model, prompts[i], 64)[0], f"prompt {i} diverged"


# ---------------------------------------------------------------------------------------------- over HTTP
def worker_of(server: ServerProcess) -> psutil.Process:
    (worker,) = [p for p in psutil.Process(server.process.pid).children() if "engine.parallel.worker" in p.cmdline()]
    return worker


def stream_in_background(server: ServerProcess) -> tuple[threading.Thread, dict[str, Any]]:
    """A long streamed completion; the result holds its SSE payloads (or the exception) once it ends."""
    result: dict[str, Any] = {}

    def run() -> None:
        body = {"prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as response:
                result["payloads"] = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        except Exception as exc:
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def wait_for_tokens(server: ServerProcess) -> None:
    deadline = time.monotonic() + 60
    while server.metrics().get("spindle:generation_tokens_total", 0) < 5:
        assert time.monotonic() < deadline, "the stream produced no tokens"
        time.sleep(0.2)


def assert_fails_cleanly(server: ServerProcess, thread: threading.Thread, result: dict[str, Any], cause: str) -> None:
    thread.join(FAILURE_BOUND_SECONDS)
    assert not thread.is_alive(), "the in-flight request hung"
    assert "error" not in result, result.get("error")
    assert result["payloads"][-1] == "[DONE]"
    error = json.loads(result["payloads"][-2])["error"]
    assert error["code"] == "engine_unavailable" and cause in error["message"], error
    health = httpx.get(f"{server.url}/health", timeout=10)
    assert health.status_code == 503 and cause in health.json()["error"]["message"]
    refused = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=10)
    assert refused.status_code == 503


@pytest.fixture(scope="module")
def tp2_server(launch_server) -> ServerProcess:
    return launch_server("tp2", ["--tensor-parallel-size", "2", "--num-threads", "1"]).wait_ready(TP_STARTUP_TIMEOUT)


def test_http_two_ranks_greedy_equals_one_rank(tp2_server: ServerProcess, tp1: LLM, prompts) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    for prompt in (prompts[0], prompts[5]):
        body = {"prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}
        response = httpx.post(f"{tp2_server.url}/v1/completions", json=body | {"return_token_ids": True}, timeout=120)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["token_ids"] == tp1.generate([prompt], params)[0].outputs[0].token_ids


def test_http_killed_worker_fails_requests_and_health(tp2_server: ServerProcess) -> None:
    """Runs after the greedy test: it takes this module's server down."""
    thread, result = stream_in_background(tp2_server)
    wait_for_tokens(tp2_server)
    worker = worker_of(tp2_server)
    worker.kill()
    assert_fails_cleanly(tp2_server, thread, result, "exited with code -9")
    tp2_server.process.terminate()
    assert tp2_server.process.wait(timeout=60) == 0  # a clean exit: the engine closed its group


@pytest.mark.slow
def test_http_two_ranks_speculative_decoding_equals_one_rank(launch_server, tp1: LLM, prompts) -> None:
    """The n-gram drafter on rank 0, its drafts verified on the gathered logits: the same greedy tokens."""
    flags = ["--tensor-parallel-size", "2", "--num-threads", "1", "--config", "ngram", "--dtype", "float32"]
    server = launch_server("tp2-ngram", flags).wait_ready(TP_STARTUP_TIMEOUT)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    for prompt in (prompts[3], prompts[7]):  # a rewrite request and a long text: prompt lookup finds matches
        body = {"prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}
        response = httpx.post(f"{server.url}/v1/completions", json=body | {"return_token_ids": True}, timeout=300)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["token_ids"] == tp1.generate([prompt], params)[0].outputs[0].token_ids
    assert server.metrics()["spindle:spec_decode_num_draft_tokens_total"] > 0


@pytest.mark.slow
def test_http_hung_worker_fails_after_the_collective_timeout(launch_server) -> None:
    """A worker that stops answering (SIGSTOP) without exiting: the step's collective times out (5 s here)."""
    server = launch_server("tp2-hang", ["--tensor-parallel-size", "2", "--tensor-parallel-timeout", "5"]).wait_ready(
        TP_STARTUP_TIMEOUT
    )
    thread, result = stream_in_background(server)
    wait_for_tokens(server)
    worker = worker_of(server)
    worker.send_signal(signal.SIGSTOP)
    try:
        assert_fails_cleanly(server, thread, result, "WorkerGroupError")
    finally:
        worker.send_signal(signal.SIGCONT)
