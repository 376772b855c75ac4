"""Named evaluation sets (AIME 2024, MATH-500, your own), each with its own sampling protocol.

A dataset's ``eval_sets`` option names them; evaluation rolls each one out with its own protocol and logs its
metrics under ``eval/<name>/...``. A name is a preset, registered by a package under the ``retool.eval_sets``
entry-point group (the built-in ``aime24``, ``aime25`` and ``math500`` ship their problems as files, so that
evaluation needs no network), or a set written out in the recipe::

    eval_sets:
      - aime24                                  # a preset, with the dataset's eval_protocol
      - {name: aime25, protocol: paper}         # a preset with another protocol
      - {name: mine, path: data/mine.jsonl, n: 8, temperature: 0.6, max_new_tokens: 4096}
"""

from __future__ import annotations

import difflib
import importlib.metadata as md
from dataclasses import dataclass, fields, replace
from typing import Any

ENTRY_POINT_GROUP = "retool.eval_sets"


@dataclass(frozen=True)
class Protocol:
    """How a set's problems are answered.

    Args:
        greedy: Answer each problem once greedily (``eval/<name>/accuracy``).
        n: Besides, sample ``n`` answers per problem (``avg@n``, the mean accuracy of the samples, which the
            paper reports as pass@1; ``pass@k`` for k = 1, 2, 4, ... up to n, unbiased estimates).
        temperature: Sampling temperature of the ``n`` samples.
        top_p: Nucleus sampling threshold of the samples.
        max_new_tokens: Model-written tokens per answer (``None``: the rollout's ``max_new_tokens``).
    """

    greedy: bool = True
    n: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError(f"an evaluation protocol's n must be >= 0, got {self.n}")
        if not self.greedy and self.n == 0:
            raise ValueError("an evaluation protocol needs greedy: true or n >= 1 (it would answer nothing)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"an evaluation protocol's top_p must be in (0, 1], got {self.top_p}")
        if self.temperature < 0:
            raise ValueError(f"an evaluation protocol's temperature must be >= 0, got {self.temperature}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"an evaluation protocol's max_new_tokens must be >= 1 or null, got {self.max_new_tokens}")


PROTOCOLS: dict[str, Protocol] = {
    "greedy": Protocol(greedy=True),
    # The ReTool paper (§3.1) and its eval.sh: 32 samples per AIME problem at temperature 1.0, top-p 0.7, up
    # to 16,384 tokens; its "accuracy" is their mean (avg@32).
    "paper": Protocol(greedy=False, n=32, temperature=1.0, top_p=0.7, max_new_tokens=16384),
}
"""Protocols a recipe names: ``greedy`` (the default: one greedy answer per problem) and ``paper``."""


@dataclass(frozen=True)
class EvalSet:
    """A named set of held-out problems in a JSON-lines file, and how to answer them.

    Args:
        name: The name its metrics are logged under (``eval/<name>/avg@32``).
        path: The JSON-lines file (one problem a line).
        prompt_field: Key of the question.
        answer_field: Key of the ground-truth answer.
        id_field: Key of a unique id (``None``: numbered by line).
        limit: Evaluate only the first ``limit`` problems (``None``: all).
        protocol: How to answer them.
        source: Where the file comes from (shown in the docs and in ``retool validate``'s table).
    """

    name: str
    path: str
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    id_field: str | None = "id"
    limit: int | None = None
    protocol: Protocol = Protocol()
    source: str = ""


_SET_KEYS = {f.name for f in fields(EvalSet)} - {"protocol"}
_PROTOCOL_KEYS = {f.name for f in fields(Protocol)}


def presets() -> dict[str, EvalSet]:
    """The registered evaluation sets, by name (entry points of :data:`ENTRY_POINT_GROUP`)."""
    found: dict[str, EvalSet] = {}
    for entry in md.entry_points(group=ENTRY_POINT_GROUP):
        value = entry.load()
        if not isinstance(value, EvalSet):
            raise ValueError(f"the eval set entry point {entry.name!r} ({entry.value}) is not an EvalSet")
        found[entry.name] = value
    return found


def protocol_of(spec: str | dict[str, Any] | Protocol) -> Protocol:
    """A protocol from its name (:data:`PROTOCOLS`), a mapping of its fields, or itself."""
    if isinstance(spec, Protocol):
        return spec
    if isinstance(spec, str):
        if spec not in PROTOCOLS:
            raise ValueError(f"unknown evaluation protocol {spec!r}; known: {', '.join(PROTOCOLS)} (or a mapping)")
        return PROTOCOLS[spec]
    unknown = sorted(set(spec) - _PROTOCOL_KEYS - {"protocol"})
    if unknown:
        raise ValueError(f"unknown evaluation protocol option(s) {unknown}; options: {sorted(_PROTOCOL_KEYS)}")
    base = protocol_of(spec["protocol"]) if "protocol" in spec else Protocol()
    return replace(base, **{k: v for k, v in spec.items() if k in _PROTOCOL_KEYS})


def resolve(
    specs: list[str | dict[str, Any]], default_protocol: str | dict[str, Any] = "greedy", own: str | None = None
) -> list[EvalSet]:
    """The :class:`EvalSet` of each entry of a recipe's ``eval_sets``, with ``default_protocol`` where an entry
    names none; a name that is neither a preset nor given a ``path`` is an error naming the presets. ``own``
    is the name that stands for the dataset's own held-out problems (an :class:`EvalSet` with an empty path)."""
    known = presets()
    default = protocol_of(default_protocol)
    chosen: list[EvalSet] = []
    for spec in specs:
        entry = {"name": spec} if isinstance(spec, str) else dict(spec)
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"an eval_sets entry needs a name, got {spec!r}")
        if "/" in name or name.startswith("."):
            raise ValueError(f"eval set name {name!r}: a name, not a path (give path: separately)")
        unknown = sorted(set(entry) - _SET_KEYS - _PROTOCOL_KEYS - {"protocol"})
        if unknown:
            raise ValueError(
                f"eval set {name!r}: unknown option(s) {unknown}; options: {sorted(_SET_KEYS | _PROTOCOL_KEYS)}"
            )
        if name == own and "path" not in entry:
            base = EvalSet(name=name, path="", protocol=default, source="the dataset's own val problems")
        elif name in known:
            base = replace(known[name], protocol=default)
        elif "path" in entry:
            base = EvalSet(name=name, path=str(entry["path"]), protocol=default)
        else:
            near = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            listed = ", ".join(sorted([*known, *([own] if own else [])])) or "none"
            raise ValueError(f"unknown eval set {name!r}{hint} known: {listed} (or give it a path:)")
        protocol_keys = {k: v for k, v in entry.items() if k in _PROTOCOL_KEYS or k == "protocol"}
        protocol = protocol_of({"protocol": base.protocol, **protocol_keys}) if protocol_keys else base.protocol
        chosen.append(replace(base, **{k: v for k, v in entry.items() if k in _SET_KEYS}, protocol=protocol))
    names = [s.name for s in chosen]
    if len(set(names)) != len(names):
        raise ValueError(f"eval_sets names must be unique, got {names}")
    return chosen


def pass_at_k(n: int, correct: int, k: int) -> float:
    """The unbiased estimate of pass@k from ``n`` samples of which ``correct`` were right (Chen et al., 2021):
    the chance that at least one of k samples drawn without replacement is right."""
    if n - correct < k:
        return 1.0
    estimate = 1.0
    for i in range(n - correct + 1, n + 1):
        estimate *= 1.0 - k / i
    return 1.0 - estimate
