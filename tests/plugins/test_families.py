"""MathFamilies: right answers in every family, seeded and disjoint splits, traces that parse, run and match."""

from __future__ import annotations

import asyncio
import math
import re
import statistics
import time
from fractions import Fraction
from itertools import pairwise
from pathlib import Path

import pytest
import sympy

from retool.plugins import discover
from retool.rollout.format import ReToolFormat
from retool.types import ExecutionResult, Problem, Trace
from retool_plugins.datasets.families import FAMILIES, MathFamilies
from retool_plugins.executors.local import LocalSandbox

FORMAT = ReToolFormat()
ALL = sorted(FAMILIES)
N = r"(\d+)"


def _modpow(base: int, exponent: int, modulus: int) -> int:
    result, base = 1, base % modulus
    while exponent:
        if exponent & 1:
            result = result * base % modulus
        base, exponent = base * base % modulus, exponent >> 1
    return result


def _digit_sum(value: int) -> int:
    total = 0
    while value:
        value, digit = divmod(value, 10)
        total += digit
    return total


def _linear(equations: str, asked: str) -> int:
    x, y, z = sympy.symbols("x y z")
    exprs = []
    for equation in re.split(r", | and ", equations):
        lhs, rhs = equation.split(" = ")
        exprs.append(sympy.sympify(re.sub(r"(\d)([xyz])", r"\1*\2", lhs)) - int(rhs))
    unknowns = [x, y, z] if "z" in equations else [x, y]
    (solution,) = sympy.linsolve(exprs, unknowns)
    values = dict(zip("xyz", solution))
    value = sum(values.values()) if "+" in asked else values[asked]
    assert value.is_integer
    return int(value)


def recompute(prompt: str) -> int:
    """The answer of a generated prompt, by brute force or another method than the generator's."""
    if m := re.fullmatch(rf"How many integers from {N} to {N} \(inclusive\) contain the digit (\d)\?", prompt):
        return sum(1 for n in range(int(m[1]), int(m[2]) + 1) if m[3] in str(n))
    if m := re.fullmatch(
        rf"How many integers from {N} to {N} are divisible by {N}(?: but not by {N}| but by neither {N} nor {N})?\?",
        prompt,
    ):
        lo, hi, k = int(m[1]), int(m[2]), int(m[3])
        excluded = [int(g) for g in m.groups()[3:] if g]
        return sum(1 for n in range(lo, hi + 1) if n % k == 0 and all(n % e for e in excluded))
    if m := re.fullmatch(rf"What is the sum of all multiples of {N} from {N} to {N}\?", prompt):
        k, lo, hi = int(m[1]), int(m[2]), int(m[3])
        return sum(n for n in range(lo, hi + 1) if n % k == 0)
    if m := re.fullmatch(
        rf"What is the sum of all integers from {N} to {N} that are divisible by {N} or {N}(?: but not by {N})?\?",
        prompt,
    ):
        lo, hi, p, q = (int(g) for g in m.groups()[:4])
        r = int(m[5]) if m[5] else None
        return sum(n for n in range(lo, hi + 1) if (n % p == 0 or n % q == 0) and (r is None or n % r))
    if m := re.fullmatch(rf"What is the sum of all odd perfect squares from {N} to {N}\?", prompt):
        lo, hi = int(m[1]), int(m[2])
        return sum(r * r for r in range(1, math.isqrt(hi) + 2, 2) if lo <= r * r <= hi)
    if m := re.fullmatch(
        rf"What is {N}\^{N} mod {N}\?|What is the remainder when {N}\^{N} is divided by {N}\?", prompt
    ):
        a, e, mod = (int(g) for g in m.groups() if g)
        return _modpow(a, e, mod)
    if m := re.fullmatch(r"What is the (greatest common divisor|least common multiple) of (.+)\?", prompt):
        numbers = [int(n) for n in re.split(r", | and ", m[2])]
        return int(sympy.igcd(*numbers) if m[1].startswith("greatest") else sympy.ilcm(*numbers))
    if m := re.fullmatch(rf"What is the sum of the digits of {N}\^{N}\?", prompt):
        return _digit_sum(int(m[1]) ** int(m[2]))
    if m := re.fullmatch(rf"What is the sum of the digits of {N}! \(the factorial of {N}\)\?", prompt):
        assert m[1] == m[2]
        return _digit_sum(math.prod(range(1, int(m[1]) + 1)))
    if m := re.fullmatch(rf"How many positive divisors does {N} have\?", prompt):
        return len(sympy.divisors(int(m[1])))
    if m := re.fullmatch(rf"What is the sum of all positive divisors of {N}\?", prompt):
        return sum(sympy.divisors(int(m[1])))
    if m := re.fullmatch(
        rf"In how many ways can {N} of {N} people be chosen\?|"
        rf"How many ways are there to choose {N} books from {N} different books\?",
        prompt,
    ):
        k, n = (int(g) for g in m.groups() if g)
        return math.factorial(n) // (math.factorial(k) * math.factorial(n - k))
    if m := re.fullmatch(
        rf"In how many ways can {N} of {N} different books be arranged in a row\?|"
        rf"In how many ways can {N} runners take the first {N} places of a race\?",
        prompt,
    ):
        k, n = (int(m[1]), int(m[2])) if m[1] else (int(m[4]), int(m[3]))
        return math.factorial(n) // math.factorial(n - k)
    if m := re.fullmatch(
        rf"A club has {N} men and {N} women\. "
        rf"In how many ways can a committee of {N} m[ae]n and {N} wom[ae]n be chosen\?",
        prompt,
    ):
        men, women, a, b = (int(g) for g in m.groups())
        return int(sympy.binomial(men, a) * sympy.binomial(women, b))
    if m := re.fullmatch(r"(?:Given that|If) (.+), what is (?:the value of )?(x \+ y \+ z|x \+ y|[xyz])\?", prompt):
        return _linear(m[1], m[2])
    raise AssertionError(f"unexpected prompt {prompt!r}")


_ARITHMETIC = r"[\d\s+\-*/()^%]*"


def _value(expr: str) -> Fraction | None:
    """The exact value of a plain arithmetic expression (``^`` is a power), or ``None`` when it is not one."""
    if not re.search(r"\d", expr) or any(int(e) > 200 for e in re.findall(r"\^\s*(\d+)", expr)):
        return None
    try:
        return eval(re.sub(r"\d+", lambda m: f"F({m[0]})", expr.replace("^", "**")), {"F": Fraction})
    except (SyntaxError, ZeroDivisionError, TypeError):
        return None  # a fragment such as "126)" of "gcd(84, 126)"


def checked_equalities(text: str) -> int:
    """Check every ``arithmetic = arithmetic`` claim of a text solution; return how many there were."""
    checked = 0
    for line in text.replace(" mod ", " % ").splitlines():
        parts = line.split(" = ")
        for left, right in pairwise(parts):
            lhs, rhs = _value(re.search(f"{_ARITHMETIC}$", left)[0]), _value(re.match(_ARITHMETIC, right)[0])
            if lhs is not None and rhs is not None:
                assert lhs == rhs, f"{left} = {right} in {text!r}"
                checked += 1
    return checked


def everything(dm: MathFamilies) -> list[Problem]:
    return dm.problems("train") + dm.problems("val")


def largest_number(prompt: str) -> int:
    return max(int(n) for n in re.findall(r"\d+", prompt))


# --- problems ---------------------------------------------------------------------------------------------


def test_every_family_gives_right_answers_at_every_level() -> None:
    dm = MathFamilies(num_train=200, num_val=40)
    problems = everything(dm)
    assert [p.metadata["family"] for p in problems[:8]] == list(FAMILIES)  # families take turns
    for p in problems:
        assert p.answer == str(recompute(p.prompt)), p
        assert re.fullmatch(rf"{p.metadata['family']}-\d+", p.id)
        assert p.prompt.endswith("?") and "\n" not in p.prompt
        assert p.metadata["level"] in (1, 2, 3)
    for family in FAMILIES:
        levels = {p.metadata["level"] for p in problems if p.metadata["family"] == family}
        assert levels == {1, 2, 3}, family
    assert len({p.prompt for p in problems}) == len(problems) == 240
    assert len({p.id for p in problems}) == 240


@pytest.mark.parametrize("family", ALL)
def test_levels_set_the_size(family: str) -> None:
    sizes = {}
    for level in (1, 2, 3):
        problems = MathFamilies(num_train=12, num_val=0, families=[family], min_level=level, max_level=level)
        train = problems.problems("train")
        assert {p.metadata["level"] for p in train} == {level}
        assert all(p.answer == str(recompute(p.prompt)) for p in train)
        if family == "linear_system":  # three unknowns at level 3, two below
            assert all(("z" in p.prompt) == (level == 3) for p in train)
        sizes[level] = statistics.median(math.log(largest_number(p.prompt)) for p in train)
    if family != "linear_system":
        assert sizes[1] < sizes[2] < sizes[3], sizes


def test_same_seed_same_problems_other_seed_others() -> None:
    a, b = MathFamilies(seed=3, num_train=80, num_val=16), MathFamilies(seed=3, num_train=80, num_val=16)
    assert everything(a) == everything(b)
    assert a.traces("train") == b.traces("train")
    other = {p.prompt for p in everything(MathFamilies(seed=4, num_train=80, num_val=16))}
    assert len(other & {p.prompt for p in everything(a)}) < 10


def test_a_familys_problems_do_not_depend_on_the_others_or_the_trace_options() -> None:
    both = MathFamilies(num_train=40, num_val=10, families=["divisors", "modpow"])
    alone = MathFamilies(num_train=20, num_val=5, families=["divisors"], trace_style="text", trace_max_level=1)
    assert [p for p in everything(both) if p.metadata["family"] == "divisors"] == everything(alone)
    # The training problems do not depend on how many validation problems follow them.
    assert MathFamilies(num_train=50, num_val=0).problems("train") == MathFamilies(num_train=50).problems("train")


def test_train_and_val_are_disjoint() -> None:
    dm = MathFamilies(num_train=1000, num_val=500)
    train, val = dm.problems("train"), dm.problems("val")
    assert (len(train), len(val)) == (1000, 500)
    assert not {p.prompt for p in train} & {p.prompt for p in val}
    assert len({p.id for p in train + val}) == 1500


def test_generating_2000_problems_with_traces_is_fast() -> None:
    start = time.perf_counter()
    dm = MathFamilies(num_train=2000, num_val=0)
    assert len(dm.traces("train")) == 2000
    assert time.perf_counter() - start < 1.0


def test_too_few_distinct_problems_names_the_fix() -> None:
    dm = MathFamilies(num_train=1000, num_val=0, families=["combinatorics"], max_level=1)
    with pytest.raises(ValueError, match="raise max_level or lower num_train/num_val"):
        dm.problems("train")


# --- traces -----------------------------------------------------------------------------------------------


def test_trace_filters_choose_the_traced_problems() -> None:
    dm = MathFamilies(
        num_train=120,
        num_val=30,
        families=["modpow", "gcd_lcm", "divisors"],
        trace_families=["modpow", "divisors"],
        trace_max_level=2,
    )
    traces = dm.traces("train")
    eligible = [p for p in dm.problems("train") if p.metadata["family"] != "gcd_lcm" and p.metadata["level"] <= 2]
    assert [t.problem for t in traces] == eligible and len(eligible) > 20
    for t in traces:
        assert t.metadata == {
            "family": t.problem.metadata["family"],
            "level": t.problem.metadata["level"],
            "style": "code",
        }
    # Problems without traces are still problems (for RL and evaluation).
    problems = everything(dm)
    assert any(p.metadata["family"] == "gcd_lcm" for p in problems)
    assert any(p.metadata["level"] == 3 for p in problems)
    assert {t.problem.id for t in dm.traces("val")} <= {p.id for p in dm.problems("val")}


def test_trace_options_from_the_constructor() -> None:
    dm = MathFamilies(num_train=100, num_val=40, trace_families=["range_sum"], trace_max_level=1, num_traces=3)
    traces = dm.traces("train")
    assert len(traces) == 3
    assert all(t.problem.metadata["family"] == "range_sum" and t.problem.metadata["level"] == 1 for t in traces)
    first = [p for p in dm.problems("train") if p.metadata["family"] == "range_sum" and p.metadata["level"] == 1]
    assert [t.problem for t in traces] == first[:3]
    # num_traces limits only the training traces.
    val = [p for p in dm.problems("val") if p.metadata["family"] == "range_sum" and p.metadata["level"] == 1]
    assert [t.problem for t in dm.traces("val")] == val
    assert MathFamilies(num_train=16, num_traces=0).traces("train") == []
    assert len(MathFamilies(num_train=16, num_val=0).traces("train")) == 16


def _code_trace_parts(trace: Trace) -> tuple[str, str, str]:
    pieces = FORMAT.split_response(trace.response)
    assert [by_model for _, by_model in pieces] == [True, False, True], trace.response
    (before, _), (interpreter, _), (after, _) = pieces
    assert before.endswith("\n<code>\n```python\n" + FORMAT.extract_code(before) + "\n```\n</code>")
    assert FORMAT.cell_closed(before)
    assert after == f"<answer>\\boxed{{{trace.problem.answer}}}</answer>"
    reasoning = before.split("\n<code>")[0]
    assert reasoning.endswith(".") and "print" not in reasoning
    return before, interpreter, after


def run_cells(codes: list[str]) -> list[ExecutionResult]:
    """Run each code in a fresh session of one real LocalSandbox."""

    async def main() -> list[ExecutionResult]:
        sandbox = LocalSandbox(preload=["math", "sympy"], timeout_s=30)
        try:
            results = []
            for i, code in enumerate(codes):
                results.append(await sandbox.execute(code, f"cell-{i}"))
                await sandbox.close_session(f"cell-{i}")
            return results
        finally:
            await sandbox.aclose()

    return asyncio.run(main())


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="LocalSandbox uses Linux /proc")
def test_code_traces_run_in_the_sandbox_and_print_what_they_show() -> None:
    dm = MathFamilies(num_train=400, num_val=0, seed=1)
    chosen: dict[tuple[str, int], Trace] = {}
    for trace in dm.traces("train"):
        chosen.setdefault((trace.problem.metadata["family"], trace.problem.metadata["level"]), trace)
    assert len(chosen) == 3 * len(FAMILIES)
    parts = {key: _code_trace_parts(trace) for key, trace in chosen.items()}
    codes = [FORMAT.extract_code(parts[key][0]) for key in chosen]
    assert all("print(" in code for code in codes)
    for (key, trace), result in zip(chosen.items(), run_cells(codes)):
        assert result.ok, (key, result)
        assert result.stdout == f"{trace.problem.answer}\n", key
        assert FORMAT.feedback(result) == parts[key][1], key
        assert trace.problem.answer == str(recompute(trace.problem.prompt))


def test_every_code_trace_has_the_rollout_shape() -> None:
    for trace in MathFamilies(num_train=300, num_val=0).traces("train"):
        _, interpreter, _ = _code_trace_parts(trace)
        assert interpreter == FORMAT.feedback(ExecutionResult(stdout=trace.problem.answer + "\n"))


def test_text_traces_have_no_code_and_box_the_answer() -> None:
    dm = MathFamilies(num_train=300, num_val=0, trace_style="text")
    traces = dm.traces("train")
    assert len(traces) == 300
    for trace in traces:
        assert "<code>" not in trace.response and "<interpreter>" not in trace.response
        assert "```" not in trace.response and FORMAT.extract_code(trace.response) is None
        body, boxed = trace.response.rsplit("\n", 1)
        assert boxed == f"<answer>\\boxed{{{trace.problem.answer}}}</answer>"
        assert body.strip() and trace.metadata["style"] == "text"
        assert trace.problem.answer in body  # the derivation ends at the answer, not only the box
    # Every arithmetic step the text shows is right.
    assert sum(checked_equalities(t.response) for t in traces) > len(traces)
    assert checked_equalities("3^17 mod 47 = 2\n2 + 2 = 4") == 2
    with pytest.raises(AssertionError):
        checked_equalities("so 12 * (3 + 4) = 83.")
    # Where a closed form exists, the text shows it.
    by_family = {t.problem.metadata["family"]: t.response for t in traces}
    assert "Cramer's rule" in by_family["linear_system"] or "Eliminating" in by_family["linear_system"]
    assert "gcd(" in by_family["gcd_lcm"]


# --- arguments and discovery ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"families": ["modpow", "modpw"]}, r"unknown MathFamilies families entry 'modpw'; did you mean 'modpow'\?"),
        ({"families": ["nope"]}, r"available: \['combinatorics', 'digit_sum', 'divisors', 'gcd_lcm'"),
        ({"families": []}, r"families is empty; name some of"),
        ({"min_level": 3, "max_level": 2}, r"need 1 <= min_level <= max_level <= 3"),
        ({"max_level": 4}, r"need 1 <= min_level <= max_level <= 3"),
        ({"num_val": -1}, r"num_train and num_val must be >= 0"),
        ({"families": ["modpow"], "trace_families": ["divisors"]}, r"add them to families or drop them from"),
        ({"trace_families": ["divisor"]}, r"trace_families entry 'divisor'; did you mean 'divisors'\?"),
        ({"min_level": 2, "trace_max_level": 1}, r"raise trace_max_level, or set it to None"),
        ({"trace_style": "python"}, r"unknown trace_style 'python'; use 'code' or 'text'"),
        ({"num_traces": -2}, r"num_traces must be >= 0, or None"),
    ],
)
def test_bad_arguments_name_the_fix(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MathFamilies(**kwargs)  # type: ignore[arg-type]


def test_unknown_split() -> None:
    dm = MathFamilies(num_train=8, num_val=8)
    with pytest.raises(ValueError, match="use 'train' or 'val'"):
        dm.load_problems("test")
    with pytest.raises(ValueError, match="use 'train' or 'val'"):
        dm.load_traces("test")


def test_is_discovered_as_a_data_plugin() -> None:
    found = [p for p in discover() if p.name == "MathFamilies"]
    assert len(found) == 1
    assert found[0].kind == "data" and found[0].cls is MathFamilies
