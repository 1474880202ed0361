"""Benchmark workloads: what each request sends and how many tokens it asks for.

- ``random``: prompts of random vocabulary tokens, input/output lengths drawn uniformly within ``range_ratio`` of the
  asked lengths (as vLLM's random dataset);
- ``file``: a JSON array or JSONL file of ShareGPT conversations (``{"conversations": [{"from": "human", ...},
  {"from": "gpt", ...}]}``: the first human turn is the prompt, the first reply's length the output length), or of
  ``{"prompt": ..., "output_len": ...}`` / ``{"messages": [...]}`` records;
- ``prefix``: ``groups`` long shared system prompts, each request one of them plus its own question, which is the
  workload prefix caching is for.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from engine.tokenizer import Tokenizer


@dataclass(frozen=True)
class BenchRequest:
    messages: list[dict[str, str]]  # the chat form; completions send the concatenated contents
    prompt_len: int  # tokens, as the benchmark's tokenizer counts them
    output_len: int

    @property
    def prompt(self) -> str:
        return "\n".join(message["content"] for message in self.messages)


class DatasetError(ValueError):
    pass


def _random_text(tokenizer: Tokenizer, rng: random.Random, length: int, attempts: int = 8) -> str:
    """Random vocabulary that encodes to ``length`` tokens (special tokens are dropped by decoding).

    Decoding random ids and encoding the text again merges or splits some pieces, so the ids are re-drawn from the
    text's own encoding, cut or topped up, until the count holds; a text that never settles stays within a few tokens.
    """
    ids = [rng.randrange(tokenizer.vocab_size) for _ in range(length)]
    text = tokenizer.decode(ids)
    for _ in range(attempts):
        encoded = tokenizer.encode(text)
        if len(encoded) == length:
            break
        ids = encoded[:length] + [rng.randrange(tokenizer.vocab_size) for _ in range(length - len(encoded))]
        text = tokenizer.decode(ids)
    return text


def _length(rng: random.Random, mean: int, range_ratio: float) -> int:
    return max(1, rng.randint(int(mean * (1 - range_ratio)), int(mean * (1 + range_ratio))))


def random_dataset(
    tokenizer: Tokenizer, num_prompts: int, input_len: int, output_len: int, range_ratio: float, seed: int
) -> list[BenchRequest]:
    if not 0 <= range_ratio < 1:
        raise DatasetError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    rng = random.Random(seed)
    requests = []
    for _ in range(num_prompts):
        text = _random_text(tokenizer, rng, _length(rng, input_len, range_ratio))
        requests.append(
            BenchRequest(
                [{"role": "user", "content": text}],
                len(tokenizer.encode(text)),
                _length(rng, output_len, range_ratio),
            )
        )
    return requests


def _record_to_request(record: dict, tokenizer: Tokenizer, output_len: int | None) -> BenchRequest | None:
    if "conversations" in record:
        turns = record["conversations"]
        human = next((t["value"] for t in turns if t.get("from") in ("human", "user")), None)
        reply = next((t["value"] for t in turns if t.get("from") in ("gpt", "assistant")), None)
        if human is None or (reply is None and output_len is None):
            return None
        messages = [{"role": "user", "content": human}]
        wanted = output_len or len(tokenizer.encode(reply))
    elif "messages" in record:
        messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
        wanted = output_len or int(record.get("output_len", 128))
    elif "prompt" in record:
        messages = [{"role": "user", "content": record["prompt"]}]
        wanted = output_len or int(record.get("output_len", 128))
    else:
        raise DatasetError(f"a record needs 'conversations', 'messages' or 'prompt': {sorted(record)}")
    prompt_len = sum(len(tokenizer.encode(m["content"])) for m in messages)
    return BenchRequest(messages, prompt_len, max(1, wanted))


def file_dataset(
    path: Path, tokenizer: Tokenizer, num_prompts: int, output_len: int | None, seed: int
) -> list[BenchRequest]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise DatasetError(f"cannot read dataset {path}: {exc}") from exc
    try:
        if text.lstrip().startswith("["):
            records = json.loads(text)
        else:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path} is neither a JSON array nor JSON lines: {exc}") from exc
    random.Random(seed).shuffle(records)
    requests = []
    for record in records:
        request = _record_to_request(record, tokenizer, output_len)
        if request is not None:
            requests.append(request)
        if len(requests) == num_prompts:
            break
    if not requests:
        raise DatasetError(f"{path} holds no usable prompt")
    return requests


def prefix_dataset(
    tokenizer: Tokenizer,
    num_prompts: int,
    groups: int,
    prefix_len: int,
    suffix_len: int,
    output_len: int,
    seed: int,
) -> list[BenchRequest]:
    if groups < 1:
        raise DatasetError("--prefix-groups must be at least 1")
    rng = random.Random(seed)
    system_prompts = [_random_text(tokenizer, rng, prefix_len) for _ in range(groups)]
    requests = []
    for index in range(num_prompts):
        messages = [
            {"role": "system", "content": system_prompts[index % groups]},
            {"role": "user", "content": _random_text(tokenizer, rng, suffix_len)},
        ]
        prompt_len = sum(len(tokenizer.encode(m["content"])) for m in messages)
        requests.append(BenchRequest(messages, prompt_len, output_len))
    return requests
