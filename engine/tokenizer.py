"""Text <-> token id conversion for a model, built from GGUF metadata or a Hugging Face tokenizer directory.

A GGUF file carries no `tokenizer.json`: only the vocabulary, merges, token types and special ids under llama.cpp's
metadata keys. The equivalent `tokenizers` pipeline is rebuilt here, with the pre-tokenizer that llama.cpp selects
from `tokenizer.ggml.pre`, so that prompts tokenize exactly as the model saw text in training.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from engine.chat_template import ChatTemplateError, render_chat_template

__all__ = ["GGUFMetadata", "Tokenizer"]

# llama.cpp's token types (`tokenizer.ggml.token_type`).
_NORMAL = 1
_CONTROL = 3
_USER_DEFINED = 4

_SPM_SPACE = "\u2581"

# Pre-tokenizer regexes as llama.cpp applies them (llama-vocab.cpp); each one further splits the previous pieces.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp rewrites these two with lookaheads because its regex engine lacks \p{Lu} etc.; Oniguruma has them, so
# the models' original expressions are used.
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class _BPEPreTokenizer:
    """How llama.cpp pre-tokenizes for one `tokenizer.ggml.pre` value."""

    splits: tuple[str, ...]
    ignore_merges: bool = False
    # Whether to add BOS when the file has no `tokenizer.ggml.add_bos_token`.
    add_bos: bool = False


_GPT2 = _BPEPreTokenizer((_GPT2_SPLIT,))
_DIGITS_GPT2 = _BPEPreTokenizer((r"\p{N}", _GPT2_SPLIT))
_LLAMA3 = _BPEPreTokenizer((_LLAMA3_SPLIT,), ignore_merges=True, add_bos=True)
_QWEN2 = _BPEPreTokenizer((_QWEN2_SPLIT,))
_GPT4O = _BPEPreTokenizer((_GPT4O_SPLIT,))

_BPE_PRE_TOKENIZERS: dict[str, _BPEPreTokenizer] = {
    "default": _BPEPreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", "[0-9][0-9][0-9]")),
    **dict.fromkeys(("gpt-2", "gpt2", "phi-2", "mpt", "olmo", "jais", "trillion"), _GPT2),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"), _DIGITS_GPT2),
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"), _LLAMA3
    ),
    **dict.fromkeys(("dbrx", "smaug-bpe"), _BPEPreTokenizer((_LLAMA3_SPLIT,))),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez", "stablelm2"), _QWEN2),
    "falcon": _BPEPreTokenizer((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2_SPLIT, "[0-9][0-9][0-9]")),
    "tekken": _BPEPreTokenizer((_TEKKEN_SPLIT,), ignore_merges=True, add_bos=True),
    **dict.fromkeys(("gpt-4o", "llama4"), _GPT4O),
}

# Special token names exposed to chat templates, as transformers does.
_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


class GGUFMetadata(Protocol):
    """The part of `gguf.GGUFReader` used here: `fields[key].contents()` gives a metadata value."""

    @property
    def fields(self) -> Mapping[str, Any]: ...


def _gguf_value(reader: GGUFMetadata, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _byte_level_bpe(tokens: Sequence[str], merges: Sequence[str] | None, pre: str) -> tuple[tokenizers.Tokenizer, bool]:
    spec = _BPE_PRE_TOKENIZERS.get(pre)
    if spec is None:
        raise ValueError(
            f"unsupported GGUF pre-tokenizer tokenizer.ggml.pre={pre!r}; known: {sorted(_BPE_PRE_TOKENIZERS)}"
        )
    if not merges:
        raise ValueError("GGUF byte-level BPE tokenizer has no tokenizer.ggml.merges")
    model = models.BPE(
        vocab={token: index for index, token in enumerate(tokens)},
        merges=[tuple(merge.split(" ", 1)) for merge in merges],
        ignore_merges=spec.ignore_merges,
    )
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated") for split in spec.splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    return backend, spec.add_bos


def _merges_from_scores(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's rule of joining the adjacent pair whose union scores highest."""
    normal = {token for token, token_type in zip(tokens, types, strict=True) if token_type == _NORMAL}
    ranked = [
        (-score, token[:cut], token[cut:])
        for token, score in zip(tokens, scores, strict=True)
        if token in normal
        for cut in range(1, len(token))
        if token[:cut] in normal and token[cut:] in normal
    ]
    ranked.sort(key=lambda merge: merge[0])
    return [(left, right) for _, left, right in ranked]


def _sentencepiece_bpe(
    tokens: Sequence[str],
    scores: Sequence[float] | None,
    types: Sequence[int],
    merges: Sequence[str] | None,
    unk_token: str | None,
    add_space_prefix: bool,
) -> tokenizers.Tokenizer:
    if merges:
        pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    elif scores is not None:
        pairs = _merges_from_scores(tokens, scores, types)
    else:
        raise ValueError("GGUF SentencePiece tokenizer has neither tokenizer.ggml.scores nor tokenizer.ggml.merges")
    model = models.BPE(
        vocab={token: index for index, token in enumerate(tokens)},
        merges=pairs,
        unk_token=unk_token,
        fuse_unk=True,
        byte_fallback=True,
    )
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=_SPM_SPACE, prepend_scheme="first" if add_space_prefix else "never", split=False
    )
    steps = [decoders.Replace(_SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _set_post_processor(
    backend: tokenizers.Tokenizer, bos_id: int | None, eos_id: int | None, add_bos: bool, add_eos: bool
) -> None:
    """Make `encode(..., add_special_tokens=True)` add BOS/EOS exactly as the flags say."""
    special: list[tuple[str, int]] = []
    prefix: list[str] = []
    suffix: list[str] = []
    for flag, token_id, name, pieces in ((add_bos, bos_id, "BOS", prefix), (add_eos, eos_id, "EOS", suffix)):
        if not flag:
            continue
        if token_id is None:
            raise ValueError(f"the tokenizer is configured to add {name} but defines no {name} token")
        content = backend.id_to_token(token_id)
        special.append((content, token_id))
        pieces.append(content)
    single = [*prefix, "$A:0", *suffix]
    pair = [*single, *(f"{piece}:1" for piece in prefix), "$B:1", *(f"{piece}:1" for piece in suffix)]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _config_token(config: Mapping[str, Any], name: str) -> str | None:
    """A special token from `tokenizer_config.json`, stored either as a string or as a serialized AddedToken."""
    value = config.get(name)
    return value.get("content") if isinstance(value, Mapping) else value


def _config_chat_template(root: Path, config: Mapping[str, Any]) -> str | None:
    template_file = root / "chat_template.jinja"
    if template_file.is_file():
        return template_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        # Named templates: [{"name": "default", "template": "..."}, ...].
        template = next((entry["template"] for entry in template if entry.get("name") == "default"), None)
    return template


class Tokenizer:
    """A model's tokenizer: encoding, decoding, special ids and chat template rendering."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None,
        eos_token_ids: Iterable[int],
        pad_token_id: int | None = None,
        unk_token_id: int | None = None,
        chat_template: str | None = None,
    ) -> None:
        """`eos_token_ids` lists the primary EOS first; the rest are extra ids that also end generation."""
        eos_ids = list(eos_token_ids)
        self._backend = backend
        self._bos_token_id = bos_token_id
        self._eos_token_ids = frozenset(eos_ids)
        self._pad_token_id = pad_token_id
        self._chat_template = chat_template
        named_ids = (bos_token_id, eos_ids[0] if eos_ids else None, unk_token_id, pad_token_id)
        self._special_tokens = {
            name: backend.id_to_token(token_id)
            for name, token_id in zip(_SPECIAL_TOKEN_NAMES, named_ids, strict=True)
            if token_id is not None
        }
        probe = backend.encode("", add_special_tokens=True).ids
        self._add_bos_token = bos_token_id is not None and probe[:1] == [bos_token_id]

    @classmethod
    def from_gguf(cls, reader: GGUFMetadata) -> Tokenizer:
        """Build the tokenizer described by a GGUF file's `tokenizer.*` metadata."""
        tokens: list[str] | None = _gguf_value(reader, "tokenizer.ggml.tokens")
        if not tokens:
            raise ValueError("GGUF metadata has no tokenizer.ggml.tokens")
        types: list[int] = _gguf_value(reader, "tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
        merges: list[str] | None = _gguf_value(reader, "tokenizer.ggml.merges")
        ids = {
            name: _gguf_value(reader, f"tokenizer.ggml.{name}_token_id")
            for name in ("bos", "eos", "unknown", "padding", "eot", "eom")
        }
        model = _gguf_value(reader, "tokenizer.ggml.model")
        if model == "gpt2":
            backend, default_add_bos = _byte_level_bpe(
                tokens, merges, _gguf_value(reader, "tokenizer.ggml.pre", "default")
            )
        elif model == "llama":
            unk = ids["unknown"]
            backend = _sentencepiece_bpe(
                tokens,
                _gguf_value(reader, "tokenizer.ggml.scores"),
                types,
                merges,
                tokens[unk] if unk is not None else None,
                _gguf_value(reader, "tokenizer.ggml.add_space_prefix", True),
            )
            default_add_bos = True
        else:
            raise ValueError(f"unsupported GGUF tokenizer model tokenizer.ggml.model={model!r}; supported: gpt2, llama")

        # Control tokens (chat markers, EOS, ...) and user-defined ones must match whole in the input text;
        # only control tokens are dropped by decode(skip_special_tokens=True).
        typed = list(zip(tokens, types, strict=True))
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in typed if k == _CONTROL])
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in typed if k == _USER_DEFINED])
        _set_post_processor(
            backend,
            ids["bos"],
            ids["eos"],
            _gguf_value(reader, "tokenizer.ggml.add_bos_token", default_add_bos),
            _gguf_value(reader, "tokenizer.ggml.add_eos_token", False),
        )
        return cls(
            backend,
            bos_token_id=ids["bos"],
            eos_token_ids=[token_id for token_id in (ids["eos"], ids["eot"], ids["eom"]) if token_id is not None],
            pad_token_id=ids["padding"],
            unk_token_id=ids["unknown"],
            chat_template=_gguf_value(reader, "tokenizer.chat_template"),
        )

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load `tokenizer.json`, `tokenizer_config.json`, the chat template and `generation_config.json` EOS ids."""
        root = Path(path)
        tokenizer_file = root / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {root}")
        backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        config = _read_json(root / "tokenizer_config.json")

        def token_id(name: str) -> int | None:
            token = _config_token(config, name)
            if token is None:
                return None
            found = backend.token_to_id(token)
            if found is None:
                raise ValueError(f"{name} {token!r} from tokenizer_config.json is not in the vocabulary")
            return found

        bos, eos = token_id("bos_token"), token_id("eos_token")
        # Like transformers: explicit flags override whatever post-processor tokenizer.json carries.
        if "add_bos_token" in config or "add_eos_token" in config:
            _set_post_processor(
                backend, bos, eos, bool(config.get("add_bos_token", False)), bool(config.get("add_eos_token", False))
            )
        generation_eos = _read_json(root / "generation_config.json").get("eos_token_id", [])
        if isinstance(generation_eos, int):
            generation_eos = [generation_eos]
        return cls(
            backend,
            bos_token_id=bos,
            eos_token_ids=[*([eos] if eos is not None else []), *generation_eos],
            pad_token_id=token_id("pad_token"),
            unk_token_id=token_id("unk_token"),
            chat_template=_config_chat_template(root, config),
        )

    @property
    def vocab_size(self) -> int:
        """Number of token ids, including added tokens."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def vocabulary(self) -> dict[str, int]:
        """Every token's text and id, added tokens included."""
        return self._backend.get_vocab(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Every id that ends generation."""
        return self._eos_token_ids

    @property
    def pad_token_id(self) -> int | None:
        return self._pad_token_id

    @property
    def special_tokens(self) -> dict[str, str]:
        """The named special tokens (bos_token, eos_token, unk_token, pad_token) that this tokenizer defines."""
        return dict(self._special_tokens)

    @property
    def add_bos_token(self) -> bool:
        """Whether `encode(..., add_special_tokens=True)` prepends BOS."""
        return self._add_bos_token

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for `text`; special tokens written in the text are recognized as such."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        """Vocabulary strings of `ids` (byte-level BPE spells bytes with printable characters, e.g. 'Ġ' for ' ')."""
        tokens = []
        for token_id in ids:
            token = self._backend.id_to_token(token_id)
            if token is None:
                raise ValueError(f"token id {token_id} is out of range for a vocabulary of {self.vocab_size}")
            tokens.append(token)
        return tokens

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def backend_json(self) -> str:
        """The `tokenizers` pipeline as `tokenizer.json` text, for libraries that rebuild the tokenizer from it."""
        return self._backend.to_str()

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render `messages` into a prompt string; raises `ChatTemplateError` if there is no or a failing template."""
        if self._chat_template is None:
            raise ChatTemplateError("this model has no chat template, so chat requests are not supported")
        return render_chat_template(
            self._chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            special_tokens=self._special_tokens,
            **kwargs,
        )

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> list[int]:
        """Prompt ids for a conversation; BOS is not added again since the template writes its own markers."""
        prompt = self.apply_chat_template(messages, add_generation_prompt, tools, **kwargs)
        return self.encode(prompt, add_special_tokens=False)
