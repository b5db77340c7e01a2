"""Tokenizer round trips and the parsing of malformed completions."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from latentsel.policy.sampling import completion_traces
from latentsel.policy.tokenizer import Tokenizer
from latentsel.traces import read_traces, write_traces
from latentsel.traces.regimes import generate
from latentsel.world import default_world

WORLD = default_world()
TOK = Tokenizer.from_world(WORLD)
steps_st = st.lists(st.text(alphabet=WORLD.alphabet, max_size=WORLD.max_len), min_size=1, max_size=4)


def test_vocabulary_has_one_token_per_character_routing_and_skill():
    assert TOK.vocab_size == 6 + WORLD.n_chars + WORLD.n_routes + WORLD.n_skills
    assert len({TOK.pad, TOK.bos, TOK.eos, TOK.sep, TOK.prog, TOK.out}) == 6
    assert TOK.name(TOK.first_char) == "a"


@given(steps_st)
@settings(max_examples=100, deadline=None)
def test_completion_round_trip(steps):
    parsed = TOK.parse_completion(TOK.encode_completion(steps), len(steps))
    assert parsed.steps == steps and parsed.malformed is None


def test_prompt_names_the_program_and_completion_names_no_module():
    trace = generate("eval-ood", 1, seed=3)[0]
    prompt = TOK.encode_prompt(trace.input, trace.program)
    names = [TOK.name(i) for i in prompt]
    assert names[0] == "<bos>" and names[-1] == "<out>"
    assert "".join(names[1: 1 + len(trace.input)]) == trace.input
    assert names[2 + len(trace.input):-1] == [n for r, k in trace.program for n in (f"r:{r}", f"k:{k}")]
    completion = TOK.encode_completion(trace.steps)
    assert all(TOK.is_char(i) or i in (TOK.sep, TOK.eos) for i in completion)
    assert len(prompt) + len(completion) <= TOK.block_size(4)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="outside the alphabet"):
        TOK.encode_prompt("abC", [("prev", "reverse")])
    with pytest.raises(KeyError, match="unknown skill 'nope'"):
        TOK.encode_prompt("abc", [("prev", "nope")])
    with pytest.raises(ValueError, match="unobserved"):
        TOK.encode_completion(["abc", None])


def _ids(text):
    """Token ids from a readable form: letters, '|' = sep, '$' = eos, '#' = a skill token."""
    table = {"|": TOK.sep, "$": TOK.eos, "#": TOK.vocab_size - 1, "^": TOK.bos}
    return [table[c] if c in table else TOK.first_char + WORLD.alphabet.index(c) for c in text]


@pytest.mark.parametrize("text, depth, steps, reason", [
    ("abc|de$", 2, ["abc", "de"], None),
    ("|$", 2, ["", ""], None),
    ("abc|de", 2, ["abc", "de"], "no end token"),
    ("abc$", 3, ["abc", None, None], "1 of 3 steps"),
    ("abc|d#e|f$", 3, ["abc", None, "f"], "non-character token"),
    ("a|b|c|d$", 2, ["a", "b"], "4 steps for a program of 2"),
    ("a" * 17 + "|b$", 2, [None, "b"], "longer than max_len"),
    ("", 2, ["", None], "no end token"),
    ("^^^", 1, [None], "non-character"),
    ("ab$cd|ef", 1, ["ab"], None),
])
def test_malformed_completions_parse_without_crashing(text, depth, steps, reason):
    parsed = TOK.parse_completion(_ids(text), depth)
    assert parsed.steps == steps
    if reason is None:
        assert parsed.malformed is None
    else:
        assert reason in parsed.malformed


@given(st.lists(st.integers(0, TOK.vocab_size - 1), max_size=80), st.integers(1, 4))
@settings(max_examples=50, deadline=None)
def test_any_token_sequence_becomes_a_valid_trace(tmp_path_factory, ids, depth):
    prompt = generate("eval-ood" if depth == 4 else "rl-atomic" if depth == 1 else "sft", 1, seed=depth)[0]
    prompt.program, prompt.steps = prompt.program[:depth], prompt.steps[:depth]
    source = {"kind": "policy", "policy": "test", "checkpoint": "none", "seed": 0, "device": "cpu"}
    [trace] = completion_traces([prompt], [ids], TOK, source)
    assert len(trace.steps) == depth
    path = tmp_path_factory.mktemp("traces") / "t.jsonl.gz"
    write_traces(path, [trace])
    [back] = read_traces(path)
    assert back.steps == trace.steps and back.extra["malformed"] == trace.extra["malformed"]
    assert back.source["kind"] == "policy"
