"""Grammar-constrained decoding below the server: compiled grammars, matchers, batched masks and the sampler.

Masks are checked against references computed another way: the vocabulary scanned with the tokenizer's own decoding,
and the matcher's token-by-token validation.
"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import llguidance
import pytest
import torch

from engine.sampler import Sampler, SamplingRow
from engine.sampling_params import InvalidParameter, SamplingParams
from engine.structured import GrammarCompiler, GrammarError, GrammarMasks, GrammarMatcher, StructuredOutputs
from engine.tokenizer import Tokenizer

pytest_plugins = ["tests.grammar_fixtures"]

COLOURS = ["red", "green", "blue", "reddish"]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


def allowed_by_mask(matcher: GrammarMatcher) -> set[int]:
    pending = GrammarMasks().start([matcher])
    assert pending is not None
    return set(pending.allowed()[0].nonzero().flatten().tolist())


def allowed_one_by_one(matcher: GrammarMatcher) -> set[int]:
    return {token for token in range(matcher.vocab_size) if matcher.accepts([token]) == 1}


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def test_choice_mask_is_every_token_that_begins_an_option(tokenizer: Tokenizer, compiler: GrammarCompiler) -> None:
    texts = [tokenizer.decode([t], skip_special_tokens=False) for t in range(tokenizer.vocab_size)]
    expected = {t for t, text in enumerate(texts) if text and any(c.startswith(text) for c in COLOURS)}
    expected -= tokenizer.eos_token_ids
    matcher = compiler.matcher(StructuredOutputs.choice(COLOURS))
    assert allowed_by_mask(matcher) == expected
    for token in encode(tokenizer, "red"):
        assert matcher.advance(token)
    # "red" is complete, and "reddish" may still follow: the end of sequence and the continuations are allowed.
    after_red = allowed_by_mask(matcher)
    assert tokenizer.eos_token_ids <= after_red
    assert {tokenizer.decode([t]) for t in after_red - tokenizer.eos_token_ids} <= {"d", "di", "dis", "dish"}
    assert matcher.finished and not matcher.terminated


@pytest.mark.parametrize(
    "spec",
    [
        StructuredOutputs.json_object(),
        StructuredOutputs("regex", r"[0-9]{3}-[a-z]+"),
        StructuredOutputs("grammar", 'root ::= "yes" | "no" " because " [a-z]+'),
        StructuredOutputs("grammar", 'start: NUMBER "x"\nNUMBER: /[0-9]+/'),
    ],
    ids=["json_object", "regex", "gbnf", "lark"],
)
def test_batched_masks_match_token_by_token_validation(compiler: GrammarCompiler, spec: StructuredOutputs) -> None:
    matcher = compiler.matcher(spec)
    assert allowed_by_mask(matcher) == allowed_one_by_one(matcher)


def test_forced_text_is_offered_in_its_canonical_tokens(tokenizer: Tokenizer, compiler: GrammarCompiler) -> None:
    """Where the grammar forces the next bytes (a schema's first key), the mask offers only the tokens the
    tokenizer itself would write them with; spelling them otherwise would still validate."""
    matcher = compiler.matcher(StructuredOutputs.json_schema(PERSON))
    forced = encode(tokenizer, '{"name": "')
    assert allowed_by_mask(matcher) == {forced[0]}
    assert allowed_one_by_one(matcher) > {forced[0]}


def test_masks_apply_to_their_rows_only(tokenizer: Tokenizer, compiler: GrammarCompiler) -> None:
    regex, choice = (
        compiler.matcher(StructuredOutputs("regex", "[0-9]+")),
        compiler.matcher(StructuredOutputs.choice(COLOURS)),
    )
    logits = torch.randn(4, tokenizer.vocab_size + 7)  # a padded model vocabulary
    original = logits.clone()
    pending = GrammarMasks().start([None, regex, None, choice])
    assert pending is not None
    pending.apply(logits)
    assert torch.equal(logits[0], original[0]) and torch.equal(logits[2], original[2])
    for row, matcher in ((1, regex), (3, choice)):
        allowed = allowed_one_by_one(matcher)
        finite = set(torch.isfinite(logits[row]).nonzero().flatten().tolist())
        assert finite == allowed
        assert torch.equal(logits[row, sorted(allowed)], original[row, sorted(allowed)])
    assert GrammarMasks().start([None, None]) is None


def test_accepts_advance_rollback_for_draft_tokens(tokenizer: Tokenizer, compiler: GrammarCompiler) -> None:
    matcher = compiler.matcher(StructuredOutputs.json_schema(PERSON))
    good = encode(tokenizer, json.dumps({"name": "Ann", "age": 7}))
    bad = encode(tokenizer, '{"name": "Ann", "age": 700}')
    first_bad = next(i for i, (a, b) in enumerate(zip(good, bad)) if a != b)
    assert matcher.accepts(good) == len(good)
    assert matcher.accepts(bad) < len(bad)
    assert matcher.accepts(bad) >= first_bad
    start = allowed_by_mask(matcher)
    for token in good[:5]:
        assert matcher.advance(token)
    assert matcher.accepts(good[5:]) == len(good) - 5  # accepts() never moves the matcher
    matcher.rollback(5)
    assert allowed_by_mask(matcher) == start
    for token in good:
        assert matcher.advance(token)
    assert matcher.finished and allowed_by_mask(matcher) == set(tokenizer.eos_token_ids)
    assert not matcher.advance(encode(tokenizer, "x")[0]) and matcher.error


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        (StructuredOutputs("json", '{"type": "array", "uniqueItems": true}'), "uniqueItems"),
        (StructuredOutputs("json", '{"type": "integer", "minimum": 5, "maximum": 1}'), "Unsatisfiable"),
        (StructuredOutputs("json", '{"$ref": "#/$defs/missing"}'), "missing"),
        (StructuredOutputs("regex", "([a-z"), "unclosed"),
        (StructuredOutputs("grammar", "root ::= undefined_rule"), "undefined_rule"),
    ],
)
def test_bad_grammars_name_the_problem(compiler: GrammarCompiler, spec: StructuredOutputs, problem: str) -> None:
    with pytest.raises(GrammarError, match=re.escape(problem)):
        compiler.matcher(spec)
    with pytest.raises(GrammarError):
        StructuredOutputs.json_schema("{not json")
    with pytest.raises(GrammarError):
        StructuredOutputs.choice([])


@pytest.mark.parametrize(
    "fields", [{"min_tokens": 2}, {"ignore_eos": True}, {"stop": ["}"]}, {"stop_token_ids": [90]}], ids=str
)
def test_what_would_end_a_constrained_output_elsewhere_is_refused(fields: dict[str, Any]) -> None:
    """Only the grammar ends a constrained output, so "stop" always means a complete document."""
    with pytest.raises(InvalidParameter) as refused:
        SamplingParams(structured_outputs=StructuredOutputs.json_object(), **fields)
    assert refused.value.param == next(iter(fields))
    SamplingParams(**fields)  # each is fine without a grammar


def test_sampler_draws_only_allowed_tokens_and_advances(tokenizer: Tokenizer, compiler: GrammarCompiler) -> None:
    """Greedy picks the best allowed token; sampling at a high temperature stays inside the grammar."""
    sampler = Sampler()
    spec = StructuredOutputs("regex", "[0-9]{2}")
    greedy_params = SamplingParams(temperature=0.0, structured_outputs=spec)
    random_params = SamplingParams(temperature=5.0, seed=3, structured_outputs=spec)
    rows = [
        SamplingRow(greedy_params, None, [1], [], tokenizer.eos_token_ids, compiler.matcher(spec)),
        SamplingRow(SamplingParams(temperature=0.0), None, [1], [], tokenizer.eos_token_ids),
        SamplingRow(random_params, torch.Generator().manual_seed(3), [1], [], tokenizer.eos_token_ids),
    ]
    rows[2].matcher = compiler.matcher(spec)
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):
        logits = torch.randn(3, tokenizer.vocab_size, generator=generator)
        allowed = sorted(allowed_one_by_one(rows[0].matcher))  # type: ignore[arg-type]
        best_allowed = allowed[int(logits[0, allowed].argmax())]
        unconstrained = int(logits[1].argmax())
        masks = GrammarMasks().start([row.matcher for row in rows])
        tokens = [t.token_id for t in sampler(logits, rows, masks)]
        assert tokens[0] == best_allowed and tokens[1] == unconstrained
        assert tokenizer.decode([tokens[2]]).isdigit()
    assert rows[0].matcher.finished and rows[2].matcher.finished  # type: ignore[union-attr]


def test_json_schema_outputs_are_valid_when_finished(tokenizer: Tokenizer, compiler: GrammarCompiler) -> None:
    """Random walks through the grammar (uniform over allowed tokens) end in documents the schema accepts."""
    generator = torch.Generator().manual_seed(1)
    spec = StructuredOutputs.json_schema(PERSON)
    for _ in range(5):
        matcher, tokens = compiler.matcher(spec), []
        while not matcher.terminated and len(tokens) < 200:
            allowed = sorted(allowed_by_mask(matcher) - tokenizer.eos_token_ids)
            if matcher.finished and (not allowed or torch.rand(1, generator=generator).item() < 0.3):
                break
            token = allowed[int(torch.randint(len(allowed), (1,), generator=generator))]
            assert matcher.advance(token)
            tokens.append(token)
        assert matcher.finished
        jsonschema.validate(json.loads(tokenizer.decode(tokens)), PERSON)


# ---------------------------------------------------------------- grammars that compile but fail once running
def late_failing_grammar(rows: int = 2001) -> str:
    """Lark that llguidance compiles and starts, whose "b" branch fails when taken: a row of ``rows`` alternatives
    passes llguidance's parser limit on the items of one row."""
    alternatives = " | ".join(f'"x{i}"' for i in range(rows))
    return f'start: "a" | "b" big\nbig: {alternatives}'


@pytest.mark.parametrize(
    ("build", "problem"),
    [
        (lambda: StructuredOutputs.json_schema({"$ref": "#"}), "allows no output"),
        (lambda: StructuredOutputs("grammar", 'start: "x" start'), "Too many items"),
        (lambda: StructuredOutputs.choice([f"option {i}" for i in range(50_000)]), "at most 1999 options"),
    ],
    ids=["self_reference", "endless_recursion", "fifty_thousand_choices"],
)
def test_grammars_that_fail_on_their_first_step_are_refused_when_compiled(
    compiler: GrammarCompiler, build: Any, problem: str
) -> None:
    with pytest.raises(GrammarError, match=re.escape(problem)) as refused:
        compiler.compile(build())
    assert "<state>" not in str(refused.value) and "\n" not in str(refused.value)  # no parser dump


def test_the_most_choices_allowed_still_decode(tokenizer: Tokenizer, compiler: GrammarCompiler) -> None:
    options = [f"option {i}" for i in range(1999)]
    matcher = compiler.matcher(StructuredOutputs.choice(options))
    for token in encode(tokenizer, "option 1998"):
        assert matcher.advance(token), matcher.error
    assert matcher.finished


def test_a_grammar_failing_mid_output_fails_its_row_alone(tokenizer: Tokenizer, compiler: GrammarCompiler) -> None:
    """The sampler marks the row whose grammar fails on its token (llguidance finds the error only as it consumes
    it); the other rows get their tokens and their matchers move, and nothing raises: the step need not run again."""
    bad_spec = StructuredOutputs("grammar", late_failing_grammar())
    b = encode(tokenizer, "b")[0]
    good_spec = StructuredOutputs("regex", "[0-9]{2}")
    rows = [
        SamplingRow(SamplingParams(temperature=0.0, logit_bias={b: 100.0}), None, [1], [], tokenizer.eos_token_ids),
        SamplingRow(SamplingParams(temperature=0.0), None, [1], [], tokenizer.eos_token_ids),
    ]
    rows[0].matcher, rows[1].matcher = compiler.matcher(bad_spec), compiler.matcher(good_spec)
    logits = torch.randn(2, tokenizer.vocab_size, generator=torch.Generator().manual_seed(0))
    tokens = Sampler()(logits, rows, GrammarMasks().start([row.matcher for row in rows]))
    assert rows[0].grammar_error is not None and "Current row has" in rows[0].grammar_error
    assert "\n" not in rows[0].grammar_error
    assert rows[1].grammar_error is None and tokenizer.decode([tokens[1].token_id]).isdigit()
    assert rows[1].matcher.accepts(encode(tokenizer, "0")) == 1 and not rows[1].matcher.finished  # type: ignore[union-attr]


def test_a_matcher_in_its_error_state_fails_its_row(tokenizer: Tokenizer, compiler: GrammarCompiler) -> None:
    """A grammar whose mask computation itself fails (it allows no output) fails its row in the sampler, not the
    step: here built without the compiler's check, as a grammar failing later than its first step would be."""
    ll_tokenizer = compiler._llg_tokenizer()
    grammar = llguidance.LLMatcher.grammar_from_json_schema({"$ref": "#"})
    broken = GrammarMatcher(llguidance.LLMatcher(ll_tokenizer, grammar, log_level=0), compiler.vocab_size)
    rows = [
        SamplingRow(SamplingParams(temperature=0.0), None, [1], [], tokenizer.eos_token_ids, broken),
        SamplingRow(SamplingParams(temperature=0.0), None, [1], [], tokenizer.eos_token_ids),
    ]
    logits = torch.randn(2, tokenizer.vocab_size, generator=torch.Generator().manual_seed(1))
    expected = int(logits[1].argmax())
    tokens = Sampler()(logits, rows, GrammarMasks().start([row.matcher for row in rows]))
    assert rows[0].grammar_error is not None and "NoExtensionBias" in rows[0].grammar_error
    assert tokens[1].token_id == expected and rows[1].grammar_error is None
