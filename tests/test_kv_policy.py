"""KV-cache eviction policies: each policy against a naive per-head reference, compaction of the paged cache, exact
block accounting, and greedy decoding against HF transformers with the same eviction expressed as an attention mask.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import httpx
import pytest
import torch

from engine.config import build_config
from engine.errors import ConfigError
from engine.kv_policy import EVICTION_POLICIES, KVCompactor, QueryRecorder, build_eviction_policy
from engine.kv_policy.eviction import EvictMergePolicy, KeyNormPolicy, SnapKVPolicy
from engine.llm_engine import LLMEngine
from engine.loader import ModelSource, open_model
from engine.sampling_params import SamplingParams
from tests.conftest import hf_greedy, long_text

if TYPE_CHECKING:
    from tests.server_fixtures import Launcher

pytest_plugins = ["tests.server_fixtures"]

BUDGET, SINK, WINDOW, BLOCK = 40, 4, 8, 16


@pytest.fixture(scope="module")
def source() -> ModelSource:
    return open_model()


def random_rows(num_rows: int = 70, kv_heads: int = 3, head_dim: int = 16, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(num_rows, kv_heads, head_dim, generator=generator) * torch.rand(num_rows, kv_heads, 1) * 3
    values = torch.randn(num_rows, kv_heads, head_dim, generator=generator)
    queries = torch.randn(12, kv_heads * 3, head_dim, generator=generator)
    return keys, values, queries


def protected(num_rows: int) -> set[int]:
    return set(range(SINK)) | set(range(num_rows - WINDOW, num_rows))


def naive_attention_mass(keys, queries, scale) -> torch.Tensor:
    """Per KV head and row: the softmax weight each recent query (causal: it sits at row N - W + w) gives the row."""
    num_rows, kv_heads, _ = keys.shape
    window, heads, _ = queries.shape
    mass = torch.zeros(kv_heads, num_rows)
    for head in range(heads):
        kv_head = head // (heads // kv_heads)
        for w in range(window):
            row = num_rows - window + w
            weights = torch.softmax(keys[: row + 1, kv_head] @ queries[w, head] * scale, dim=0)
            mass[kv_head, : row + 1] += weights
    return mass


def naive_keep(scores: torch.Tensor, num_rows: int) -> list[list[int]]:
    kept = []
    for head_scores in scores:
        others = sorted(set(range(num_rows)) - protected(num_rows), key=lambda r: -float(head_scores[r]))
        kept.append(sorted(protected(num_rows) | set(others[: BUDGET - SINK - WINDOW])))
    return kept


def test_key_norm_keeps_the_smallest_keys() -> None:
    keys, values, _ = random_rows()
    policy = KeyNormPolicy(BUDGET, SINK, WINDOW, BLOCK)
    new_keys, new_values = policy.compact(keys, values, None, 0.25)
    for head, rows in enumerate(naive_keep(-keys.norm(dim=-1).t(), len(keys))):
        assert torch.equal(new_keys[:, head], keys[rows, head]) and torch.equal(new_values[:, head], values[rows, head])


def test_snapkv_keeps_the_rows_recent_queries_attend_to() -> None:
    keys, values, queries = random_rows()
    policy = SnapKVPolicy(BUDGET, SINK, WINDOW, BLOCK)
    mass = naive_attention_mass(keys, queries, 0.25)
    pooled = torch.stack([torch.stack([m[max(0, i - 3) : i + 4].max() for i in range(len(m))]) for m in mass])
    assert torch.allclose(policy.scores(keys, values, queries, 0.25), pooled, atol=1e-5)
    keep = policy.select(policy.scores(keys, values, queries, 0.25))
    num_rows = len(keys)
    for head, rows in enumerate(keep.tolist()):
        # Max-pooling makes plateaus of equal scores, so check the kept set is a best one rather than one order.
        assert len(set(rows)) == BUDGET and protected(num_rows) <= set(rows)
        chosen = [float(pooled[head, r]) for r in set(rows) - protected(num_rows)]
        dropped = [float(pooled[head, r]) for r in set(range(num_rows)) - set(rows)]
        assert min(chosen) >= max(dropped) - 1e-6
    new_keys, _ = policy.compact(keys, values, queries, 0.25)
    assert torch.equal(new_keys, torch.stack([keys[rows, h] for h, rows in enumerate(keep.tolist())], dim=1))


def test_evict_merge_folds_evicted_rows_into_their_nearest_kept_row() -> None:
    keys, values, queries = random_rows()
    policy = EvictMergePolicy(BUDGET, SINK, WINDOW, BLOCK)
    new_keys, new_values = policy.compact(keys, values, queries, 0.25)
    mass = naive_attention_mass(keys, queries, 0.25)
    num_rows = len(keys)
    keep = policy.select(policy.scores(keys, values, queries, 0.25))  # which rows: checked in the snapkv test
    for head, rows in enumerate(keep.tolist()):
        absorbing = [r for r in rows if r not in protected(num_rows)]
        groups = {r: [r] for r in rows}
        for evicted in sorted(set(range(num_rows)) - set(rows)):
            similarity = [float(torch.cosine_similarity(keys[evicted, head], keys[r, head], dim=0)) for r in absorbing]
            groups[absorbing[similarity.index(max(similarity))]].append(evicted)
        for i, row in enumerate(rows):
            members = groups[row]
            weights = mass[head, members].unsqueeze(-1)
            expected_k = (keys[members, head] * weights).sum(0) / weights.sum()
            expected_v = (values[members, head] * weights).sum(0) / weights.sum()
            assert torch.allclose(new_keys[i, head], expected_k, atol=1e-5), (head, row)
            assert torch.allclose(new_values[i, head], expected_v, atol=1e-5), (head, row)
        assert any(len(groups[r]) > 1 for r in absorbing), "nothing was merged"


@pytest.mark.parametrize("name", sorted(EVICTION_POLICIES))
def test_compaction_rewrites_only_the_requests_blocks(name: str) -> None:
    """Through a scattered block table, the request's first rows become what the policy keeps; other blocks keep
    their bytes, whichever layer."""
    policy = build_eviction_policy(name, BUDGET, SINK, WINDOW, BLOCK)
    num_blocks, kv_heads, head_dim, num_rows = 12, 3, 16, 70
    caches = [(torch.randn(num_blocks, BLOCK, kv_heads, head_dim), torch.randn(num_blocks, BLOCK, kv_heads, head_dim))]
    caches.append((caches[0][0] * 2, caches[0][1] - 1))
    before = [(k.clone(), v.clone()) for k, v in caches]
    table = [7, 2, 10, 4, 5]
    recorder = QueryRecorder(12)
    recorder.begin_step([("r", 0, 12)], torch.device("cpu"))
    layer_queries = [torch.randn(12, kv_heads * 3, head_dim) for _ in caches]
    for layer, queries in enumerate(layer_queries):
        recorder(layer, queries)
    recorder.end_step()
    KVCompactor(policy, caches, BLOCK, torch.float32, 0.25, recorder).compact("r", table, num_rows)
    rows = torch.arange(num_rows)
    slots = torch.tensor(table)[rows // BLOCK] * BLOCK + rows % BLOCK
    for layer, ((key_cache, value_cache), (old_k, old_v)) in enumerate(zip(caches, before)):
        flat_old_k, flat_old_v = old_k.view(-1, kv_heads, head_dim), old_v.view(-1, kv_heads, head_dim)
        expected_k, expected_v = policy.compact(flat_old_k[slots], flat_old_v[slots], layer_queries[layer], 0.25)
        flat_k, flat_v = key_cache.view(-1, kv_heads, head_dim), value_cache.view(-1, kv_heads, head_dim)
        assert torch.equal(flat_k[slots[:BUDGET]], expected_k) and torch.equal(flat_v[slots[:BUDGET]], expected_v)
        untouched = [b for b in range(num_blocks) if b not in table]
        assert torch.equal(key_cache[untouched], old_k[untouched])
        assert torch.equal(value_cache[untouched], old_v[untouched])


def test_query_recorder_keeps_each_requests_latest_queries() -> None:
    recorder = QueryRecorder(4)
    seen: dict[str, list[torch.Tensor]] = {"a": [], "b": []}
    for step, spans in enumerate([[("a", 0, 6), ("b", 6, 7)], [("b", 0, 1), ("a", 1, 2)], [("a", 0, 1)]]):
        recorder.begin_step(spans, torch.device("cpu"))
        total = spans[-1][2]
        per_layer = [torch.randn(total, 2, 8) for _ in range(3)]
        for layer, queries in enumerate(per_layer):
            recorder(layer, queries)
        recorder.end_step()
        for request_id, begin, end in spans:
            seen[request_id].append(torch.stack([q[begin:end] for q in per_layer]))
        for request_id in seen:
            expected = torch.cat(seen[request_id], dim=1)[:, -4:]
            for layer in range(3):
                assert torch.equal(recorder.queries(request_id, layer), expected[layer]), (step, request_id)
    recorder.drop("a")
    assert recorder.queries("a", 0) is None


# ---------------------------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------------------------


def make_engine(source: ModelSource, **overrides) -> LLMEngine:
    return LLMEngine(build_config("fp32", {"block_size": BLOCK, **overrides}), source=source, progress=False)


def generate(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    tokens: list[list[int]] = [[] for _ in prompts]
    while engine.has_unfinished_requests():
        for output in engine.step():
            tokens[int(output.request_id)].extend(output.new_token_ids)
        running = [engine.scheduler.get_request(str(i)) for i in range(len(prompts))]
        held = sum(engine.kv_manager.num_blocks_needed(r.num_kv_tokens) for r in running if r is not None)
        assert engine.kv_manager.pool.num_used_blocks == held, "block accounting drifted from the resident rows"
    assert engine.kv_manager.num_free_blocks == engine.num_kv_blocks, "KV blocks leaked"
    return tokens


def sink_window_greedy(hf_model, prompt: list[int], max_tokens: int, chunk: int, budget: int, sink: int) -> list[int]:
    """The reference: HF transformers without a KV cache, every token's attention restricted by a 4D mask to the
    rows a sink + window cache held when it was computed (prefill in chunks of ``chunk``, compaction after each step
    once the cache reaches budget + one block)."""

    def compact(rows: list[int]) -> list[int]:
        return rows[:sink] + rows[len(rows) - (budget - sink) :] if len(rows) >= budget + BLOCK else rows

    ids, visible, resident = list(prompt), [], []
    for begin in range(0, len(prompt), chunk):
        new = list(range(begin, min(begin + chunk, len(prompt))))
        visible += [resident + new[: i + 1] for i in range(len(new))]
        resident = compact(resident + new)
    out = []
    with torch.inference_mode():
        for _ in range(max_tokens):
            mask = torch.full((1, 1, len(ids), len(ids)), torch.finfo(torch.float32).min)
            for row, columns in enumerate(visible):
                mask[0, 0, row, columns] = 0.0
            token = int(hf_model(input_ids=torch.tensor([ids]), attention_mask=mask).logits[0, -1].argmax())
            out.append(token)
            visible.append([*resident, len(ids)])
            resident = compact([*resident, len(ids)])
            ids.append(token)
    return out


@pytest.mark.parametrize("chunk", [512, 24])
def test_sink_window_matches_the_reference_with_the_same_eviction(source, hf_model, chunk: int) -> None:
    """A long prompt evicted during (chunked) prefill and decode, batched with a short one that never is."""
    tokenizer = source.tokenizer
    long_prompt, short_prompt = tokenizer.encode(long_text(400)), tokenizer.encode("Once upon a time")
    engine = make_engine(
        source, kv_policy="sink_window", kv_budget=48, kv_sink_tokens=SINK, max_num_batched_tokens=chunk
    )
    got = generate(engine, [long_prompt, short_prompt], 20)
    assert engine.counters.kv_compactions >= 2 and engine.counters.kv_evicted_tokens > len(long_prompt) - 48
    assert got[0] == sink_window_greedy(hf_model, long_prompt, 20, chunk, 48, SINK)
    assert got[0] != hf_greedy(hf_model, long_prompt, 20)[0], "eviction made no difference: the test proves nothing"
    assert got[1] == hf_greedy(hf_model, short_prompt, 20)[0]


@pytest.mark.parametrize("name", sorted(EVICTION_POLICIES))
def test_a_budget_above_every_sequence_is_lossless(source, hf_model, name: str) -> None:
    prompt = source.tokenizer.encode(long_text(300))
    engine = make_engine(source, kv_policy=name, kv_budget=len(prompt) + 16)
    assert generate(engine, [prompt], 12)[0] == hf_greedy(hf_model, prompt, 12)[0]
    assert engine.counters.kv_compactions == 0


@pytest.mark.parametrize("name", sorted(EVICTION_POLICIES))
def test_policies_under_pressure_keep_accounting_exact(source, name: str) -> None:
    """Four long prompts in a pool too small for their full KV: compaction, preemption and recompute interleave;
    the accounting check runs after every step (in ``generate``)."""
    tokenizer = source.tokenizer
    prompts = [tokenizer.encode(long_text(300 + 80 * i)) for i in range(4)]
    bytes_per_block = make_engine(source).kv_layout.bytes_per_block
    engine = make_engine(
        source,
        dtype="bfloat16",  # no reference to match here: the faster dtype
        kv_policy=name,
        kv_budget=BUDGET,
        kv_sink_tokens=SINK,
        kv_window_tokens=WINDOW,
        kv_cache_memory=str(14 * bytes_per_block),
        max_num_batched_tokens=64,
    )
    tokens = generate(engine, prompts, 24)
    assert all(len(t) == 24 for t in tokens)
    assert engine.counters.kv_compactions > 0
    assert engine.kv_manager.pool.enable_prefix_caching is False


def test_policies_compose_with_a_quantized_cache(source) -> None:
    """Compaction reads and rewrites int8 rows: a budget above the sequence changes nothing against int8 alone,
    and a small one compacts with exact accounting."""
    prompt = source.tokenizer.encode(long_text(300))
    plain = generate(make_engine(source, kv_cache_dtype="int8"), [prompt], 12)
    roomy = make_engine(source, kv_cache_dtype="int8", kv_policy="evict_merge", kv_budget=len(prompt) + 16)
    assert generate(roomy, [prompt], 12) == plain
    tight = make_engine(source, kv_cache_dtype="int8", kv_policy="evict_merge", kv_budget=BUDGET)
    assert len(generate(tight, [prompt], 12)[0]) == 12 and tight.counters.kv_compactions > 0


def test_generation_continues_past_the_kv_capacity(source) -> None:
    """A sequence longer than the whole KV cache: without a policy it is refused, with sink_window it completes."""
    prompt = source.tokenizer.encode(long_text(200))
    bytes_per_block = make_engine(source).kv_layout.bytes_per_block
    small = {"kv_cache_memory": str(8 * bytes_per_block), "max_num_batched_tokens": 64}
    with pytest.raises(ValueError, match=r"exceeds max_model_len \(128\)"):
        make_engine(source, **small).add_request("0", prompt, SamplingParams(max_tokens=150))
    engine = make_engine(source, kv_policy="sink_window", kv_budget=48, dtype="bfloat16", **small)
    assert len(generate(engine, [prompt], 150)[0]) == 150  # 8 blocks hold 128 rows; the sequence reaches ~200


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"kv_policy": "h3o"}, "unknown kv_policy 'h3o'"),
        ({"kv_policy": "snapkv", "kv_budget": 10}, "kv_budget (10) must be at least"),
        ({"kv_policy": "key_norm", "kv_window_tokens": 0}, "kv_window_tokens >= 1"),
        ({"kv_observation_window": 0}, "kv_observation_window"),
    ],
)
def test_bad_policy_settings_are_config_errors(overrides: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace("(", r"\(").replace(")", r"\)")):
        build_config(None, overrides)


def test_a_budget_the_cache_cannot_hold_is_a_start_up_error(source) -> None:
    bytes_per_block = make_engine(source).kv_layout.bytes_per_block
    with pytest.raises(ConfigError, match="kv_budget 512 plus one step"):
        make_engine(source, kv_policy="snapkv", kv_budget=512, kv_cache_memory=str(20 * bytes_per_block))


def test_policy_over_http(launch_server: Launcher, source, hf_model) -> None:
    """Chosen by environment variable; the completion equals the reference with the same eviction, /metrics reports
    the policy and what it evicted, and every block is back once the request ends."""
    server = launch_server(
        "kv-policy", ["--block-size", str(BLOCK)], env={"SPINDLE_KV_POLICY": "sink_window", "SPINDLE_KV_BUDGET": "48"}
    ).wait_ready()
    prompt = source.tokenizer.encode(long_text(400))
    body = {"prompt": prompt, "max_tokens": 20, "temperature": 0.0, "ignore_eos": True, "return_token_ids": True}
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    token_ids = response.json()["choices"][0]["token_ids"]
    assert token_ids == sink_window_greedy(hf_model, prompt, 20, 2048, 48, SINK)
    metrics = server.wait_idle()
    assert metrics["spindle:kv_policy_compactions_total"] >= 2
    assert metrics["spindle:kv_policy_evicted_tokens_total"] > len(prompt) - 48
    assert metrics["spindle:kv_cache_usage_perc"] == 0
    info = re.search(r"^spindle:kv_policy_info\{(.*)\} 1\.0$", httpx.get(f"{server.url}/metrics").text, re.MULTILINE)
    assert info and 'policy="sink_window"' in info.group(1) and 'budget="48"' in info.group(1)
