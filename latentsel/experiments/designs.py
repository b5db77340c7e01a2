"""What an identifiability experiment is made of, as data: regimes of simulated traces, truths
to simulate from, runs (regimes x truths x sizes x seeds), the models fitted, the NUTS and SBC
checks and the claims tested (DESIGN §6).

A design is a TOML file (:func:`load_design`); the default one ships beside this module
(:data:`DEFAULT_DESIGN`). JAX-free, so that the command line reads its choices from here
without loading JAX.
"""
from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path
from typing import NamedTuple

__all__ = ["Regime", "Truth", "Run", "Design", "load_design", "default_design", "DEFAULT_DESIGN", "IDENTIFY_MODELS",
           "SWEEP_BACKENDS", "NUTS_CHECK_MODELS", "TRUTH_KINDS", "CLAIMS", "IdentifyRegime", "IDENTIFY_REGIMES",
           "identify_regime"]

IDENTIFY_MODELS = ("modular", "entangled")
# the model whose fit NUTS cross-checks (its cost grows with the rows)
NUTS_CHECK_MODELS = ("modular",)
SWEEP_BACKENDS = ("loky", "threading", "sequential", "ray", "dask")
TRUTH_KINDS = ("modular", "entangled")
TRUTH_CONTEXTS = ("beyond-sft", "all")
CLAIMS = ("C1", "C2", "C3", "C4")
DEFAULT_DESIGN = Path(__file__).with_name("default_design.toml")
# the prompt regimes a design may draw programs from (latentsel.traces.regimes.PROMPT_REGIMES)
_SOURCES = ("sft", "rl-atomic", "rl-compound", "eval-seen", "eval-unseen", "eval-ood")


class Regime(NamedTuple):
    """A regime of simulated traces: prompts of the prompt regime ``source``
    (:data:`latentsel.traces.regimes.PROMPT_REGIMES`), ``traces_per_prompt`` traces of each with
    the 1-based steps ``hide`` unobserved, then ``varied`` more traces of the same prompts with
    every step observed; the truth executes the intended module with probability ``fidelity``.
    ``support``: the prompt regime whose program support claim C1 holds the fit to (default the
    source)."""

    name: str
    source: str
    traces_per_prompt: int
    fidelity: float
    hide: tuple = ()
    varied: int = 0
    support: str | None = None

    @property
    def per_prompt(self) -> int:
        """Traces per prompt in all."""
        return self.traces_per_prompt + self.varied

    @property
    def declared_support(self) -> str:
        return self.support or self.source


class Truth(NamedTuple):
    """The parameters traces are simulated from: ``modular``, or ``entangled`` with
    ``strength`` in [0, 1] in the skill ``contexts`` ``"beyond-sft"`` (every bigram outside the
    SFT-seen half) or ``"all"`` (every step after the first)
    (:func:`latentsel.experiments.identify.entangled_truth`)."""

    name: str
    kind: str
    strength: float = 0.0
    contexts: str = "beyond-sft"


class Run(NamedTuple):
    """A cross product of regimes, truths, sizes and seeds; ``test_traces`` (default: the
    design's) fresh traces per task for the held-out comparison of the fits."""

    regimes: tuple
    truths: tuple
    sizes: tuple
    seeds: tuple
    test_traces: int | None = None


class Design(NamedTuple):
    """An identifiability design: see ``default_design.toml`` for every field."""

    regimes: dict
    truths: dict
    runs: tuple
    models: tuple = IDENTIFY_MODELS
    test_traces: int = 1000
    nuts_max: int = 100
    nuts_draws: int = 300
    sbc_regimes: tuple = ()
    sbc_reps: int = 0
    sbc_traces: int = 60
    sbc_draws: int = 99
    claims: dict = {}
    source: str = "<design>"
    nuts_regimes: tuple = ()
    nuts_truths: tuple = ()

    def nuts_pairs(self) -> set[tuple[str, str]]:
        """The (regime, truth) pairs NUTS may check (``nuts.regimes``/``nuts.truths``; empty: all)."""
        return {(r, t) for r in self.regimes for t in self.truths
                if (not self.nuts_regimes or r in self.nuts_regimes) and (not self.nuts_truths or t in self.nuts_truths)}

    def sbc_groups(self) -> list[tuple[str, tuple[str, ...]]]:
        """The regimes SBC calibrates (``sbc.regimes``, default every regime the runs name), one
        per data layout: SBC draws its truths from the prior, so regimes that differ only in
        fidelity or declared support share their calibration. ``[(representative, names)]``."""
        names = self.sbc_regimes or tuple(dict.fromkeys(r for run in self.runs for r in run.regimes))
        groups: dict[tuple, list[str]] = {}
        for name in names:
            g = self.regimes[name]
            groups.setdefault((g.source, g.traces_per_prompt, g.hide, g.varied), []).append(name)
        return [(members[0], tuple(members)) for members in groups.values()] if self.sbc_reps else []

    def test_traces_of(self, regime: str, truth: str) -> int:
        """Held-out traces per task of (regime, truth): the most any run containing it asks for."""
        counts = [self.test_traces if run.test_traces is None else run.test_traces for run in self.runs
                  if regime in run.regimes and truth in run.truths]
        return max(counts, default=self.test_traces)

    def cells(self) -> list[tuple[str, str, int, int]]:
        """Every (regime, truth, N, seed) of the runs, once each, in the order of the runs."""
        seen = {}
        for run in self.runs:
            for r in run.regimes:
                for t in run.truths:
                    for n in run.sizes:
                        for s in run.seeds:
                            seen.setdefault((r, t, int(n), int(s)), None)
        return list(seen)

    def restrict(self, *, regimes=None, truths=None, sizes=None, seeds=None, models=None) -> "Design":
        """The design with its runs kept to ``regimes``/``truths`` and their sizes and seeds
        replaced (the command line's overrides); names not in the design are a ``ValueError``."""
        for what, names, table in (("regime", regimes, self.regimes), ("truth", truths, self.truths)):
            for name in names or ():
                if name not in table:
                    raise ValueError(f"{self.source}: no {what} {name!r}; it has {', '.join(table)}")
        for m in models or ():
            if m not in IDENTIFY_MODELS:
                raise ValueError(f"unknown model {m!r}; identify fits {', '.join(IDENTIFY_MODELS)}")
        runs = []
        for run in self.runs:
            rs = tuple(r for r in run.regimes if regimes is None or r in regimes)
            ts = tuple(t for t in run.truths if truths is None or t in truths)
            if rs and ts:
                runs.append(Run(rs, ts, tuple(sizes) if sizes else run.sizes, tuple(seeds) if seeds else run.seeds,
                                run.test_traces))
        if regimes is not None:  # regimes that no run names get the design's first truth
            named = {r for run in runs for r in run.regimes}
            extra = tuple(r for r in regimes if r not in named)
            if extra:
                base = self.runs[0] if self.runs else Run((), (next(iter(self.truths)),), (100,), (0,))
                ts = tuple(t for t in (truths or base.truths))
                runs.append(Run(extra, ts, tuple(sizes) if sizes else base.sizes, tuple(seeds) if seeds else base.seeds))
        if not runs:
            raise ValueError(f"{self.source}: no run is left with regimes {regimes} and truths {truths}")
        sbc = tuple(r for r in self.sbc_regimes if regimes is None or r in regimes)
        if self.sbc_regimes and not sbc:  # none of the named ones is left: no SBC, not all of them
            return self._replace(runs=tuple(runs), models=tuple(models) if models else self.models, sbc_reps=0)
        return self._replace(runs=tuple(runs), models=tuple(models) if models else self.models, sbc_regimes=sbc)

    def to_json(self) -> dict:
        """The design as plain JSON (``identify.json``'s ``design``)."""
        return json.loads(json.dumps({"regimes": {k: v._asdict() for k, v in self.regimes.items()},
                "truths": {k: v._asdict() for k, v in self.truths.items()},
                "runs": [r._asdict() for r in self.runs], "models": list(self.models),
                "test_traces": self.test_traces,
                "nuts": {"max_traces": self.nuts_max, "draws": self.nuts_draws, "regimes": list(self.nuts_regimes),
                         "truths": list(self.nuts_truths)},
                "sbc": {"regimes": list(self.sbc_regimes), "replications": self.sbc_reps, "traces": self.sbc_traces,
                        "draws": self.sbc_draws},
                "claims": self.claims, "source": self.source}))


class DesignError(ValueError):
    """A design file that cannot be read; the message names the file and the entry."""


_BASE_FIELDS = {"source": str, "support": str, "traces_per_prompt": int, "fidelity": float, "hide": list,
                "varied": int}
_BASE = {"source": "sft", "support": None, "traces_per_prompt": 1, "fidelity": 0.95, "hide": [], "varied": 0}
_CLAIM_KEYS = {"C1": {"truths", "regimes"}, "C2": {"truth", "golden", "varied"},
               "C3": {"truth", "compressed", "separated"}, "C4": {"truth", "regimes"}}


def _check_fields(where: str, entry, allowed: dict | set) -> dict:
    if not isinstance(entry, dict):
        raise DesignError(f"{where}: expected a table, got {entry!r}")
    unknown = sorted(set(entry) - set(allowed))
    if unknown:
        raise DesignError(f"{where}: unknown field {unknown[0]!r}; expected {', '.join(sorted(allowed))}")
    return entry


def _typed(where: str, value, kind):
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DesignError(f"{where}: expected {kind.__name__}, got {value!r}")
    return value


def _regime(where: str, name: str, fields: dict) -> Regime:
    values = {**_BASE, **fields}
    for key, kind in _BASE_FIELDS.items():
        if values[key] is not None:
            values[key] = _typed(f"{where}.{key}", values[key], kind)
    for key in ("source", "support"):
        if values[key] is not None and values[key] not in _SOURCES:
            raise DesignError(f"{where}.{key}: unknown prompt regime {values[key]!r}; choose from {', '.join(_SOURCES)}")
    if values["traces_per_prompt"] < 1 or values["varied"] < 0:
        raise DesignError(f"{where}: traces_per_prompt must be >= 1 and varied >= 0")
    if not 0 < values["fidelity"] < 0.98:
        raise DesignError(f"{where}.fidelity: must lie in (0, 0.98), got {values['fidelity']}")
    hide = values["hide"]
    if not all(isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in hide):
        raise DesignError(f"{where}.hide: expected 1-based step numbers, got {hide!r}")
    return Regime(name, values["source"], values["traces_per_prompt"], values["fidelity"], tuple(sorted(set(hide))),
                  values["varied"], values["support"])


def _truth(where: str, name: str, fields: dict) -> Truth:
    _check_fields(where, fields, {"kind", "strength", "contexts"})
    kind = _typed(f"{where}.kind", fields.get("kind", "modular"), str)
    if kind not in TRUTH_KINDS:
        raise DesignError(f"{where}.kind: unknown truth {kind!r}; choose from {', '.join(TRUTH_KINDS)}")
    strength = _typed(f"{where}.strength", fields.get("strength", 1.0 if kind == "entangled" else 0.0), float)
    if not 0 <= strength <= 1 or (kind == "modular" and strength):
        raise DesignError(f"{where}.strength: must lie in [0, 1] (and be 0 for a modular truth), got {strength}")
    contexts = _typed(f"{where}.contexts", fields.get("contexts", "beyond-sft"), str)
    if contexts not in TRUTH_CONTEXTS:
        raise DesignError(f"{where}.contexts: expected one of {', '.join(TRUTH_CONTEXTS)}, got {contexts!r}")
    return Truth(name, kind, strength, contexts)


def _int_list(where: str, value, low: int) -> tuple:
    if not isinstance(value, list) or not value:
        raise DesignError(f"{where}: expected a non-empty list of integers, got {value!r}")
    for v in value:
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise DesignError(f"{where}: expected integers >= {low}, got {v!r}")
    return tuple(value)


def _names(where: str, value, table: dict, what: str) -> tuple:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise DesignError(f"{where}: expected a non-empty list of {what} names, got {value!r}")
    for v in value:
        if v not in table:
            raise DesignError(f"{where}: no {what} {v!r}; the design has {', '.join(table)}")
    return tuple(value)


def parse_design(doc: dict, source: str = "<design>") -> Design:
    """A :class:`Design` from the parsed TOML ``doc``; :class:`DesignError` naming ``source`` and
    the entry at the first problem."""
    top = {"models", "test_traces", "base", "regimes", "truths", "runs", "nuts", "sbc", "claims"}
    _check_fields(source, doc, top)
    base = _check_fields(f"{source}: [base]", doc.get("base", {}), _BASE_FIELDS)
    regimes_doc = _check_fields(f"{source}: [regimes]", doc.get("regimes", {}), set(doc.get("regimes", {})))
    if not regimes_doc:
        raise DesignError(f"{source}: [regimes] names no regime")
    regimes = {}
    for name, fields in regimes_doc.items():
        where = f"{source}: regimes.{name}"
        _check_fields(where, fields, _BASE_FIELDS)
        regimes[name] = _regime(where, name, {**base, **fields})
    truths_doc = doc.get("truths", {"modular": {"kind": "modular"}})
    _check_fields(f"{source}: [truths]", truths_doc, set(truths_doc))
    truths = {name: _truth(f"{source}: truths.{name}", name, f) for name, f in truths_doc.items()}
    if not truths:
        raise DesignError(f"{source}: [truths] names no truth")
    runs_doc = doc.get("runs")
    if not isinstance(runs_doc, list) or not runs_doc:
        raise DesignError(f"{source}: expected at least one [[runs]] table")
    runs = []
    for i, run in enumerate(runs_doc, 1):
        where = f"{source}: runs #{i}"
        _check_fields(where, run, {"regimes", "truths", "sizes", "seeds", "test_traces"})
        missing = [k for k in ("regimes", "sizes", "seeds") if k not in run]
        if missing:
            raise DesignError(f"{where}: missing field {missing[0]!r}")
        runs.append(Run(_names(f"{where}.regimes", run["regimes"], regimes, "regime"),
                        _names(f"{where}.truths", run.get("truths", list(truths)[:1]), truths, "truth"),
                        _int_list(f"{where}.sizes", run["sizes"], 1), _int_list(f"{where}.seeds", run["seeds"], 0),
                        _int_list(f"{where}.test_traces", [run["test_traces"]], 0)[0] if "test_traces" in run else None))
    models = doc.get("models", list(IDENTIFY_MODELS))
    if not isinstance(models, list) or not models or any(m not in IDENTIFY_MODELS for m in models):
        raise DesignError(f"{source}: models: expected a list from {', '.join(IDENTIFY_MODELS)}, got {models!r}")
    test_traces = doc.get("test_traces", 1000)
    if not isinstance(test_traces, int) or isinstance(test_traces, bool) or test_traces < 0:
        raise DesignError(f"{source}: test_traces: expected an integer >= 0, got {test_traces!r}")
    nuts = _check_fields(f"{source}: [nuts]", doc.get("nuts", {}), {"max_traces", "draws", "regimes", "truths"})
    sbc = _check_fields(f"{source}: [sbc]", doc.get("sbc", {}), {"regimes", "replications", "traces", "draws"})
    ints = {}
    for where, table, key, default, low in ((f"{source}: nuts.max_traces", nuts, "max_traces", 100, 0),
                                            (f"{source}: nuts.draws", nuts, "draws", 300, 4),
                                            (f"{source}: sbc.replications", sbc, "replications", 0, 0),
                                            (f"{source}: sbc.traces", sbc, "traces", 60, 1),
                                            (f"{source}: sbc.draws", sbc, "draws", 99, 1)):
        ints[where] = _int_list(where, [table.get(key, default)], low)[0]
    sbc_regimes = _names(f"{source}: sbc.regimes", sbc["regimes"], regimes, "regime") if "regimes" in sbc else ()
    nuts_regimes = _names(f"{source}: nuts.regimes", nuts["regimes"], regimes, "regime") if "regimes" in nuts else ()
    nuts_truths = _names(f"{source}: nuts.truths", nuts["truths"], truths, "truth") if "truths" in nuts else ()
    claims_doc = _check_fields(f"{source}: [claims]", doc.get("claims", {}), set(CLAIMS))
    claims = {}
    for claim, specs in claims_doc.items():
        specs = specs if isinstance(specs, list) else [specs]  # a claim may be tested on several pairs
        claims[claim] = []
        for i, spec in enumerate(specs, 1):
            where = f"{source}: claims.{claim}" + (f" #{i}" if len(specs) > 1 else "")
            _check_fields(where, spec, _CLAIM_KEYS[claim])
            required = sorted(_CLAIM_KEYS[claim] - {"truths", "regimes"})
            missing = [k for k in required if k not in spec]
            if claim != "C1" and missing:
                raise DesignError(f"{where}: missing field {missing[0]!r}; {claim} needs {', '.join(required)}")
            if claim == "C2" and truths.get(spec.get("truth")) and truths[spec["truth"]].kind != "entangled":
                raise DesignError(f"{where}.truth: C2 is about an entangled truth; {spec['truth']!r} is "
                                  f"{truths[spec['truth']].kind}")
            out = {}
            for key, value in spec.items():
                table, what = (truths, "truth") if key.startswith("truth") else (regimes, "regime")
                names = _names(f"{where}.{key}", value, table, what)
                out[key] = list(names) if key in ("regimes", "truths") else names[0]
            claims[claim].append(out)
    v = list(ints.values())
    return Design(regimes, truths, tuple(runs), tuple(models), test_traces, v[0], v[1], sbc_regimes, v[2], v[3], v[4],
                  claims, source, nuts_regimes, nuts_truths)


def load_design(path: str | Path | None = None) -> Design:
    """The design in the TOML file ``path`` (default :data:`DEFAULT_DESIGN`); a
    :class:`DesignError` (a ``ValueError``) naming the file and the entry or line at fault."""
    path = Path(DEFAULT_DESIGN if path is None else path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DesignError(f"{path}: cannot read the design: {getattr(e, 'strerror', None) or e}") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise DesignError(f"{path}: not a TOML design: {e}") from None
    # the shipped design is named as in the source tree, not by where it is installed
    shown = "latentsel/experiments/default_design.toml" if path.resolve() == DEFAULT_DESIGN.resolve() else str(path)
    return parse_design(doc, shown)


def default_design() -> Design:
    """The shipped default design."""
    return load_design(DEFAULT_DESIGN)


# The regimes of the default design, by name (the command line's choices without --design).
IDENTIFY_REGIMES = default_design().regimes
IdentifyRegime = Regime


def identify_regime(name: str, design: Design | None = None) -> Regime:
    """The regime called ``name`` in ``design`` (default: the default design); ``ValueError``
    naming the choices if there is none."""
    table = IDENTIFY_REGIMES if design is None else design.regimes
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown regime {name!r}; choose from {', '.join(table)}") from None


def prompts_for(regime: Regime, n_traces: int) -> int:
    """How many prompts give ``n_traces`` traces of ``regime``."""
    return math.ceil(n_traces / regime.per_prompt)
