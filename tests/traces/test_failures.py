"""Completion failures: every step of a malformed completion classified, none taken for hidden."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from latentsel.policy.tokenizer import Tokenizer
from latentsel.traces import Trace
from latentsel.traces.failures import StepStatus, completion_status, fitted_prefix
from latentsel.world import default_world

WORLD = default_world()
TOK = Tokenizer.from_world(WORLD)
PROGRAM = [("input", "reverse"), ("prev", "sort"), ("prev", "double"), ("input", "odds")]
OK, BAD, STOP, AFTER = StepStatus.OK, StepStatus.UNREADABLE, StepStatus.STOPPED, StepStatus.AFTER


def _ids(text):
    """'|' = sep, '$' = eos, '#' = a skill token (unreadable as a character), letters as they are."""
    table = {"|": TOK.sep, "$": TOK.eos, "#": TOK.vocab_size - 1}
    return [table[c] if c in table else TOK.first_char + WORLD.alphabet.index(c) for c in text]


def _trace(text, depth=4):
    parsed = TOK.parse_completion(_ids(text), depth)
    return Trace("t", "abc", PROGRAM[:depth], parsed.steps, None, {"kind": "policy"}, None,
                 {"malformed": parsed.malformed})


@pytest.mark.parametrize("text, steps, ran_on, fitted", [
    ("ab|cd|ef|gh$", (OK, OK, OK, OK), False, 4),
    ("ab|cd|ef$", (OK, OK, OK, STOP), False, 3),            # stopped after 3 of 4 steps
    ("ab$", (OK, STOP, STOP, STOP), False, 1),
    ("ab|c#d|ef|gh$", (OK, BAD, AFTER, AFTER), False, 1),   # step 2 unreadable, the rest unfitted
    ("#|cd$", (BAD, AFTER, STOP, STOP), False, 0),
    ("ab|cd|ef|gh|ij$", (OK, OK, OK, OK), True, 4),         # a fifth step: ran on
    ("ab|cd|ef|gh", (OK, OK, OK, OK), True, 4),             # no end token
    ("ab|cd|ef|" + "g" * (WORLD.max_len + 1), (OK, OK, OK, BAD), True, 3),  # too long and never stopped
])
def test_every_step_is_classified(text, steps, ran_on, fitted):
    trace = _trace(text)
    status = completion_status(trace)
    assert status.steps == steps and status.ran_on == ran_on and status.n_fitted == fitted
    prefix = fitted_prefix(trace, status)
    if fitted == 0:
        assert prefix is None
    else:
        assert prefix.depth == fitted and None not in prefix.steps and prefix.program == PROGRAM[:fitted]


def test_a_well_formed_trace_keeps_its_hidden_steps():
    trace = Trace("t", "abc", PROGRAM[:3], ["cba", None, "aabbcc"], None, {}, None, {})
    assert completion_status(trace).steps == (OK, OK, OK)
    assert fitted_prefix(trace) is trace


def test_an_unknown_reason_never_makes_a_hidden_step():
    trace = Trace("t", "abc", PROGRAM[:3], ["cba", None, "aabbcc"], None, {}, None, {"malformed": "cosmic ray"})
    assert completion_status(trace).steps == (OK, BAD, AFTER)


@given(st.lists(st.sampled_from(list("ab|#$")), max_size=14), st.integers(1, 4))
@settings(max_examples=300, deadline=None)
def test_status_agrees_with_the_parse(chars, depth):
    trace = _trace("".join(chars), depth)
    status = completion_status(trace)
    assert len(status.steps) == depth
    for y, s in zip(trace.steps, status.steps):
        assert (y is None) == (s in (BAD, STOP))
    assert (trace.extra["malformed"] is None) == (status.reason is None)
    # the fitted prefix is exactly the steps before the first failure
    assert all(s == OK for s in status.steps[: status.n_fitted])
    assert status.n_fitted == depth or status.steps[status.n_fitted] != OK
