"""The eight problem families of ``MathFamilies``, each a question generator and its reference solution."""

from retool_plugins.datasets._families.algebra import FAMILIES as _ALGEBRA
from retool_plugins.datasets._families.common import Family, Solution
from retool_plugins.datasets._families.number_theory import FAMILIES as _NUMBER_THEORY
from retool_plugins.datasets._families.ranges import FAMILIES as _RANGES

FAMILIES: dict[str, Family] = {**_RANGES, **_NUMBER_THEORY, **_ALGEBRA}
"""The families by name, in the order problems take turns."""

__all__ = ["FAMILIES", "Family", "Solution"]
