"""Page selection for decode (kv_policy quest): block scores and the choice of blocks against a naive reference,
key summaries against the rows actually written, attention against the naive attention restricted to the chosen
blocks (CPU and Triton), a budget covering every block against full attention, and the engine end to end."""

from __future__ import annotations

import random

import pytest
import torch

from engine.errors import ConfigError
from engine.loader import ModelSource, open_model
from engine.outputs import EngineCounters
from kernels.backend import BatchLayout
from kernels.cpu_attention import CpuAttentionBackend
from kernels.native import load_native_kernels
from kernels.page_selecting_backend import PageSelectingBackend
from kernels.page_selection import BlockSummaries, DecodeSelection, PageSelectionPolicy, WrittenBlocks, block_scores
from kernels.triton_backend import TritonAttentionBackend
from scheduler.output import SchedulerStats
from server.metrics import EngineMetrics
from tests.attention_reference import TOLERANCE, make_case, mixed_batch, reference_attention, reference_write
from tests.conftest import hf_greedy, long_text
from tests.test_kv_policy import generate, make_engine

CPU = torch.device("cpu")
BLOCK = 16

# --- the naive reference ---------------------------------------------------------------------------------------------


def naive_scores(query: torch.Tensor, key_cache: torch.Tensor, table: list[int], context_len: int) -> list[float]:
    """Per block of one sequence: the Quest bound sum_d max(q_d min_d, q_d max_d) over the keys of the block's
    written rows, maximised over query heads (each against its KV head)."""
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = query.shape[0] // num_kv_heads
    scores = []
    for index, block in enumerate(table[: -(-context_len // block_size)]):
        rows = key_cache[block, : min(block_size, context_len - index * block_size)].float()  # [rows, KVH, D]
        low, high = rows.amin(0), rows.amax(0)
        bounds = []
        for head in range(query.shape[0]):
            q = query[head].float()
            bounds.append(float(torch.maximum(q * low[head // group], q * high[head // group]).sum()))
        scores.append(max(bounds))
    return scores


def naive_choice(scores: list[float], context_len: int, policy: PageSelectionPolicy) -> list[int]:
    """Indices into the sequence's table: every block within the budget; past it the sink blocks, the blocks of
    the last ``window_tokens`` tokens and the best-scored others, in order."""
    num_blocks = len(scores)
    if num_blocks <= policy.budget_blocks:
        return list(range(num_blocks))
    first_window_token = max(context_len - policy.window_tokens, 0)
    kept = {i for i in range(num_blocks) if i < policy.sink_blocks or (i + 1) * policy.block_size > first_window_token}
    others = sorted(set(range(num_blocks)) - kept, key=lambda i: -scores[i])
    return sorted(kept | set(others[: policy.budget_blocks - len(kept)]))


def selected_layout(layout: BatchLayout, key_cache, query, policy: PageSelectionPolicy) -> BatchLayout:
    """The step as the reference sees it: each decode's table and length cut to its naively chosen blocks."""
    tables, lens = list(layout.block_tables), list(layout.context_lens)
    for i in range(layout.num_decodes):
        scores = naive_scores(query[i], key_cache, tables[i], lens[i])
        chosen = naive_choice(scores, lens[i], policy)
        tables[i] = [tables[i][c] for c in chosen]
        lens[i] -= (len(scores) - len(chosen)) * policy.block_size
    return BatchLayout(layout.query_lens, lens, tables, layout.slot_mapping, layout.block_size)


def context_slots(layout: BatchLayout) -> torch.Tensor:
    """Every cache slot the step's sequences hold before the step's own rows."""
    slots = [
        table[p // layout.block_size] * layout.block_size + p % layout.block_size
        for query_len, context_len, table in zip(layout.query_lens, layout.context_lens, layout.block_tables)
        for p in range(context_len - query_len)
    ]
    return torch.tensor(slots, dtype=torch.long)


# --- selection -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("heads", [(4, 4), (9, 3), (8, 2)], ids=["mha", "gqa3", "gqa4"])
def test_scores_and_choice_match_the_naive_reference(heads: tuple[int, int]) -> None:
    num_heads, num_kv_heads = heads
    policy = PageSelectionPolicy.from_tokens(8 * BLOCK, 4, 20, BLOCK)
    rng = random.Random(num_heads)
    context_lens = [3, BLOCK, 8 * BLOCK, 8 * BLOCK + 1, 13 * BLOCK - 4, 30 * BLOCK + 7, rng.randint(9, 40 * BLOCK)]
    case = make_case(rng, context_lens, [], BLOCK, num_heads, num_kv_heads, 32, torch.float32)
    layout = case.layout
    # Summaries of every row the sequences hold (their whole contexts), as the backend keeps them.
    written = [
        table[p // BLOCK] * BLOCK + p % BLOCK
        for length, table in zip(layout.context_lens, layout.block_tables)
        for p in range(length)
    ]
    summaries = BlockSummaries(case.key_cache)
    summaries.update(case.key_cache, WrittenBlocks.of(torch.tensor(written), BLOCK))
    held = [-(-length // BLOCK) for length in layout.context_lens]
    selection = DecodeSelection.of([t[:n] for t, n in zip(layout.block_tables, held)], layout.context_lens, policy, CPU)
    scores = block_scores(case.query, summaries.minimum, summaries.maximum, selection.block_tables[:, :-1])
    chosen_tables, chosen_lens = selection.choose(scores), selection.context_lens
    for i, (table, length) in enumerate(zip(layout.block_tables, layout.context_lens)):
        expected = naive_scores(case.query[i], case.key_cache, table, length)
        torch.testing.assert_close(scores[i, : held[i]], torch.tensor(expected), atol=1e-4, rtol=1e-5)
        chosen = naive_choice(expected, length, policy)
        assert chosen_tables[i, : len(chosen)].tolist() == [table[c] for c in chosen], i
        assert int(chosen_lens[i]) == length - (held[i] - len(chosen)) * BLOCK
    assert (chosen_lens < torch.tensor(layout.context_lens)).sum() >= 3, "no sequence was cut: the test proves nothing"


def test_summaries_follow_the_rows_written_and_forget_a_reused_block() -> None:
    """Rows arrive as a prefill chunk, then one decode row at a time, then the blocks go to another sequence whose
    rows overwrite them from offset 0: each block's summary is always the min/max of its rows written so far."""
    generator = torch.Generator().manual_seed(0)
    key_cache = torch.randn(6, BLOCK, 2, 8, generator=generator).to(torch.bfloat16)  # stale noise everywhere
    summaries = BlockSummaries(key_cache)
    written: dict[int, list[torch.Tensor]] = {}

    def write(table: list[int], begin: int, end: int) -> None:
        slots = torch.tensor([table[p // BLOCK] * BLOCK + p % BLOCK for p in range(begin, end)])
        rows = torch.randn(end - begin, 2, 8, generator=generator).to(torch.bfloat16)
        key_cache.view(-1, 2, 8).index_copy_(0, slots, rows)
        summaries.update(key_cache, WrittenBlocks.of(slots, BLOCK))
        for p, row in zip(range(begin, end), rows):
            written.setdefault(table[p // BLOCK], [])
            if p % BLOCK == 0:
                written[table[p // BLOCK]] = []  # a block's first row: whatever it held before is gone
            written[table[p // BLOCK]].append(row)

    def check() -> None:
        for block, rows in written.items():
            stacked = torch.stack(rows)
            assert torch.equal(summaries.minimum[block], stacked.amin(0)), block
            assert torch.equal(summaries.maximum[block], stacked.amax(0)), block

    first = [4, 1, 3]
    write(first, 0, 21)
    check()
    for position in range(21, 40):
        write(first, position, position + 1)
        check()
    second = [3, 4]  # freed and handed to another sequence, in another order
    write(second, 0, 5)
    check()
    write(second, 5, 19)
    check()


# --- attention -------------------------------------------------------------------------------------------------------


def backends() -> list[tuple[str, object]]:
    return [("cpu", CpuAttentionBackend(load_native_kernels())), ("triton", TritonAttentionBackend(CPU))]


def selecting(inner, policy: PageSelectionPolicy, key_cache: torch.Tensor) -> PageSelectingBackend:
    if inner.name == "triton":
        from kernels.triton_ops.block_scores import block_scores as triton_scores

        return PageSelectingBackend(inner, policy, [key_cache], triton_scores)
    return PageSelectingBackend(inner, policy, [key_cache])


def run_step(backend: PageSelectingBackend, case, dtype: torch.dtype) -> torch.Tensor:
    """One layer of one step, with the summaries of what the sequences held before it."""
    backend.summaries[case.key_cache.data_ptr()].update(
        case.key_cache, WrittenBlocks.of(context_slots(case.layout), BLOCK)
    )
    metadata = backend.prepare(case.layout, dtype)
    return backend.forward(case.query, case.key, case.value, case.key_cache, case.value_cache, metadata, 0.125)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["cpu", "triton"])
def test_a_small_budget_attends_to_exactly_the_chosen_blocks(name: str, dtype: torch.dtype) -> None:
    """Long decodes beside short ones and prefill chunks: every row equals the naive attention over the blocks the
    naive reference chooses (prefills and short decodes: over everything)."""
    policy = PageSelectionPolicy.from_tokens(6 * BLOCK, 4, 16, BLOCK)
    rng = random.Random(3)
    _, prefills = mixed_batch(rng, BLOCK)
    decodes = [12 * BLOCK + 5, 3 * BLOCK, 20 * BLOCK, 6 * BLOCK + 1, 9 * BLOCK - 1]
    case = make_case(rng, decodes, prefills, BLOCK, 9, 3, 64, dtype)
    inner = dict(backends())[name]
    reference_cache = (case.key_cache.clone(), case.value_cache.clone())
    got = run_step(selecting(inner, policy, case.key_cache), case, dtype)
    reference_write(*reference_cache, case.key, case.value, case.slots)
    layout = selected_layout(case.layout, reference_cache[0], case.query, policy)
    assert sum(layout.context_lens) < sum(case.layout.context_lens) - 20 * BLOCK, "nothing was left out"
    expected = reference_attention(case.query, *reference_cache, layout, 0.125)
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("name", ["cpu", pytest.param("triton", marks=pytest.mark.slow)])  # the interpreter is slow
def test_a_budget_covering_every_block_is_full_attention(name: str) -> None:
    """In a step where no decode exceeds the budget, the output is the plain backend's, bit for bit; in one where a
    single decode does, every other row still equals the plain backend's (to fp32 rounding: the kernel splits
    contexts by the step's longest one)."""
    rng = random.Random(5)
    decodes, prefills = mixed_batch(rng, BLOCK)
    roomy = PageSelectionPolicy.from_tokens(16 * BLOCK, 4, 16, BLOCK)
    for long_decode, exact in ((None, True), (40 * BLOCK + 3, False)):
        lens = decodes if long_decode is None else [*decodes, long_decode]
        case = make_case(random.Random(6), lens, prefills, BLOCK, 9, 3, 64, torch.float32)
        assert max(lens) > 16 * BLOCK or long_decode is None
        plain_cache = (case.key_cache.clone(), case.value_cache.clone())
        inner = dict(backends())[name]
        plain_metadata = inner.prepare(case.layout, torch.float32)
        plain = inner.forward(case.query, case.key, case.value, *plain_cache, plain_metadata, 0.125)
        got = run_step(selecting(inner, roomy, case.key_cache), case, torch.float32)
        assert torch.equal(case.key_cache, plain_cache[0]) and torch.equal(case.value_cache, plain_cache[1])
        if exact:
            assert torch.equal(got, plain)
        else:
            others = [r for r in range(got.shape[0]) if r != len(decodes)]
            torch.testing.assert_close(got[others], plain[others], atol=1e-5, rtol=1e-5)
            assert not torch.allclose(got[len(decodes)], plain[len(decodes)], atol=1e-3), "the long decode was not cut"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 96])
def test_triton_block_scores_match_pytorch(dtype: torch.dtype, head_dim: int) -> None:
    from kernels.triton_ops.block_scores import block_scores as triton_scores

    generator = torch.Generator().manual_seed(head_dim)
    summaries = torch.randn(2, 40, 3, head_dim, generator=generator).to(dtype)
    minimum, maximum = summaries.amin(0), summaries.amax(0)
    query = torch.randn(5, 9, head_dim, generator=generator).to(dtype)
    tables = torch.randint(0, 40, (5, 37), generator=generator, dtype=torch.int32)
    expected = block_scores(query, minimum, maximum, tables.long())
    torch.testing.assert_close(triton_scores(query, minimum, maximum, tables), expected, atol=1e-4, rtol=1e-5)


# --- the engine ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def source() -> ModelSource:
    return open_model()


def test_a_budget_covering_every_block_decodes_as_the_reference(source, hf_model) -> None:
    prompt = source.tokenizer.encode(long_text(600))
    engine = make_engine(source, kv_policy="quest", kv_budget=len(prompt) + 32)
    assert generate(engine, [prompt], 12)[0] == hf_greedy(hf_model, prompt, 12)[0]
    counters = engine.counters
    assert counters.page_selection_decodes == 11 and counters.page_selection_blocks_read > 11 * len(prompt) // BLOCK
    assert counters.page_selection_blocks_read == counters.page_selection_blocks_held


def test_a_small_budget_reads_only_the_long_sequences_budget(source) -> None:
    """A long prompt and a short one decoded together: the long one reads its budget only; the short one, within
    the budget, decodes as with full attention."""
    tokenizer = source.tokenizer
    prompts = [tokenizer.encode(long_text(1200)), tokenizer.encode("Once upon a time")]
    engine = make_engine(source, kv_policy="quest", kv_budget=6 * BLOCK)
    got = generate(engine, prompts, 10)
    assert got[1] == generate(make_engine(source), prompts[1:], 10)[0]
    counters = engine.counters
    held_by_long = -(-len(prompts[0]) // BLOCK)
    assert counters.page_selection_decodes == 18
    assert counters.page_selection_blocks_read == 9 * (6 + 1)
    assert counters.page_selection_blocks_held >= 9 * (held_by_long + 1)


def test_cached_prefix_blocks_keep_their_summaries(source) -> None:
    """The same prompt twice: the second time its blocks come from the prefix cache and only the last token is
    computed (a decode row, under page selection), so its selection reads the summaries the first request wrote.
    The tokens equal those of an engine without prefix caching that computes the same last token alone."""
    prompt = source.tokenizer.encode(long_text(1500))
    prompt = prompt[: (len(prompt) - 1) // BLOCK * BLOCK + 1]  # the last token alone after whole cached blocks
    engine = make_engine(source, kv_policy="quest", kv_budget=6 * BLOCK)
    generate(engine, [prompt], 10)
    again = generate(engine, [prompt], 10)[0]
    assert engine.stats().prefix_cache_hits >= len(prompt) - 1
    split = make_engine(
        source,
        kv_policy="quest",
        kv_budget=6 * BLOCK,
        enable_prefix_caching=False,
        max_num_batched_tokens=len(prompt) - 1,
    )
    assert generate(split, [prompt], 10)[0] == again


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"kv_budget": 32}, r"kv_budget \(32\) must be at least 80 for kv_policy quest"),
        ({"kv_cache_dtype": "int8"}, "kv_policy quest needs a plain KV cache"),
        ({"attention_backend": "torch"}, "kv_policy quest needs attention backend 'cpu'"),
    ],
)
def test_unsupported_page_selection_settings_are_start_up_errors(source, overrides: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        make_engine(source, kv_policy="quest", **overrides)


def test_blocks_read_reach_the_metrics() -> None:
    metrics = EngineMetrics("m", kv_policy="quest", kv_budget=512)
    counters = EngineCounters(page_selection_decodes=3, page_selection_blocks_read=40, page_selection_blocks_held=90)
    metrics.observe([], SchedulerStats(0, 0, 0.0, 0, 0, 0, 1, 1), counters)
    value = lambda name: metrics.registry.get_sample_value(f"spindle:{name}_total", {"model_name": "m"})  # noqa: E731
    assert value("page_selection_decodes") == 3
    assert value("page_selection_blocks_read") == 40
    assert value("page_selection_blocks_held") == 90
