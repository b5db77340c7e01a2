"""Policy-corpus fits: failures kept, the emission chosen on held-out traces, a modularity test
that comes out either way."""
import numpy as np
import pytest

from latentsel.experiments.policy_fits import choose_emission, modularity_test, prepare_corpus
from latentsel.models.registry import default_params
from latentsel.traces import write_traces
from latentsel.traces.regimes import generate
from latentsel.traces.simulate import simulate
from latentsel.world import default_world
from tests.analysis.test_entanglement import _entangled_truth

WORLD = default_world()


def _write(path, traces):
    write_traces(path, traces)
    return path


def test_malformed_completions_are_failures_not_hidden_steps(tmp_path):
    traces = generate("eval-ood", 6, 0)
    for tr in traces:
        tr.extra["malformed"] = None
    traces[0].steps[1:] = [None] * 3
    traces[0].extra["malformed"] = "1 of 4 steps"
    traces[1].steps[0] = None
    traces[1].extra["malformed"] = "step 1 holds a non-character token"
    c = prepare_corpus("p", "ood", _write(tmp_path / "p.eval-ood.jsonl", traces), WORLD)
    assert c.n_malformed == 2 and c.fitted == [0, 2, 3, 4, 5]
    assert [p.depth for p in c.prefixes] == [1, 4, 4, 4, 4]
    assert bool((c.data.free | ~c.data.step_mask).all()) and not c.data.blocks  # no step is taken for hidden


def test_a_corpus_with_nothing_read_has_no_data(tmp_path):
    traces = generate("eval-seen", 3, 0)
    for tr in traces:
        tr.steps = [None] * tr.depth
        tr.extra["malformed"] = "step 1 holds a non-character token"
    c = prepare_corpus("p", "seen", _write(tmp_path / "p.eval-seen.jsonl", traces), WORLD)
    assert c.data is None and c.fitted == []


def _noisy(traces, noise_of_skill, seed):
    """Golden traces whose every step's characters are replaced at the rate of its skill."""
    rng = np.random.default_rng(seed)
    for tr in traces:
        for t, (_, k) in enumerate(tr.program):
            y = list(tr.steps[t])
            for j in range(len(y)):
                if rng.random() < noise_of_skill(k):
                    y[j] = WORLD.alphabet[(WORLD.alphabet.index(y[j]) + 1 + rng.integers(WORLD.n_chars - 1))
                                          % WORLD.n_chars]
            tr.steps[t] = "".join(y)
    return traces


@pytest.mark.parametrize("per_skill", [False, True])
def test_the_emission_is_chosen_either_way(tmp_path, per_skill):
    noisy = {"reverse", "sort", "double", "mirror", "dedup", "odds"}
    rate = (lambda k: 0.4 if k in noisy else 0.02) if per_skill else (lambda k: 0.1)
    traces = _noisy(generate("eval-seen", 300, 1), rate, 0)
    c = prepare_corpus("p", "seen", _write(tmp_path / "p.eval-seen.jsonl", traces), WORLD)
    choice = choose_emission(c.data, folds=3)
    assert choice["chosen"] == ("per_skill" if per_skill else "shared"), choice["verdict"]


@pytest.mark.parametrize("truth", ["modular", "entangled"])
def test_the_modularity_test_comes_out_either_way(tmp_path, truth):
    """Modular execution: the modular fit predicts held-out bigrams better. Execution that swaps
    the skill in held-out bigrams: the modular fit's confident prediction loses, once the
    entangled fit has data enough for its context rows (at 300 seen traces it still loses to
    modular's pooling: measured 0.34 ± 0.08 nats a trace for modular)."""
    params = (default_params("modular", WORLD, fidelity=0.9, noise=0.05, off_module=0.02) if truth == "modular"
              else _entangled_truth(0.9))
    corpora = {}
    for split, seed in (("seen", 1), ("unseen", 2)):
        traces = simulate(generate(f"eval-{split}", 1000 if split == "seen" else 300, seed), params, truth, WORLD,
                          seed)
        corpora[split] = prepare_corpus("p", split, _write(tmp_path / f"p.eval-{split}.jsonl", traces), WORLD)
    # the entanglement rho comes out either way in tests/analysis/test_entanglement.py
    res = modularity_test(corpora["seen"], corpora["unseen"], WORLD, entangle=truth == "modular")
    assert res["preferred"] == truth, res["verdict"]
    if truth == "modular":
        assert res["rho_lower"] == 0.0


def test_the_demo_finds_the_shipped_corpora_and_policies():
    from latentsel.experiments.demo import SHIPPED_CORPORA, SHIPPED_RUN
    from latentsel.experiments.policy_fits import find_checkpoints, find_corpora

    found = find_corpora(SHIPPED_CORPORA)
    policies = sorted({p for p, _ in found})
    assert len(found) == 9 and sorted(find_checkpoints(SHIPPED_RUN / "policies", policies)) == policies


@pytest.mark.slow  # loads a shipped policy and runs it teacher-forced (about 40 s)
def test_fidelity_is_checked_against_the_policy(tmp_path):
    from latentsel.experiments.demo import SHIPPED_CORPORA, SHIPPED_RUN
    from latentsel.experiments.policy_fits import find_checkpoints, fit_policy_corpora

    corpora = {("sft", "seen"): SHIPPED_CORPORA / "sft.eval-seen.jsonl.gz"}
    res = fit_policy_corpora(corpora, tmp_path, WORLD, draws=5, max_traces=60, folds=2, progress=False,
                             checkpoints=find_checkpoints(SHIPPED_RUN / "policies", ["sft"]))
    rows = res["fidelity"]
    assert rows and {r["policy"] for r in rows} == {"sft"}
    assert all(0 <= r["teacher_forced"] <= 1 and 0 <= r["as_intended"] <= 1 for r in rows)
    assert sum(r["steps"] for r in rows) == 180  # every step of the 60 depth-3 traces, once


@pytest.mark.slow  # four analyze runs of two corpora (about 70 s of CPU)
def test_analyze_resumes_finished_corpora(tmp_path, monkeypatch):
    from latentsel.experiments import policy_fits

    traces = simulate(generate("eval-seen", 40, 1), default_params("modular", WORLD, fidelity=0.8), "modular",
                      WORLD, 1)
    corpora = {("p", "seen"): _write(tmp_path / "p.eval-seen.jsonl", traces),
               ("p", "ood"): _write(tmp_path / "p.eval-ood.jsonl", simulate(generate("eval-ood", 30, 2),
                                    default_params("modular", WORLD, fidelity=0.8), "modular", WORLD, 2))}
    kw = dict(draws=4, folds=2, progress=False, entangle=False)
    first = policy_fits.fit_policy_corpora(corpora, tmp_path / "out", WORLD, **kw)
    calls = []
    real = policy_fits.choose_emission
    monkeypatch.setattr(policy_fits, "choose_emission", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = policy_fits.fit_policy_corpora(corpora, tmp_path / "out", WORLD, **kw)
    assert again["resumed"] == 2 and not calls
    for key in ("attribution", "by_step", "emission", "loo", "differences"):
        assert again[key] == first[key], key
    # a changed option refits; a run killed before its second corpus finished resumes from the first
    third = policy_fits.fit_policy_corpora(corpora, tmp_path / "out", WORLD, **{**kw, "folds": 3})
    assert third["resumed"] == 0
    (tmp_path / "out" / "p.seen" / "corpus.json").unlink()
    fourth = policy_fits.fit_policy_corpora(corpora, tmp_path / "out", WORLD, **{**kw, "folds": 3})
    assert fourth["resumed"] == 1
    for key in ("attribution", "by_step", "emission", "loo", "differences"):
        assert fourth[key] == third[key], key
