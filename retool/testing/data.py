"""The dataset contract as a test suite: what every :class:`~retool.ProblemDataModule` must do.

Subclass :class:`DataContract` and set ``factory`` (a fresh data module, the same arguments each time)::

    class TestMyData(DataContract):
        factory = staticmethod(lambda: MyProblems(path="tests/data/small.jsonl", batch_size=2))

``data_contract(factory)`` runs every rule at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from retool.data import ProblemDataModule
from retool.testing.executor import run_rules
from retool.types import Problem, Trace


class DataContract:
    """The rules of the dataset contract, one ``test_*`` method each (see the module docstring)."""

    factory: ClassVar[Callable[[], ProblemDataModule]]

    def make(self) -> ProblemDataModule:
        return type(self).factory()

    def test_train_problems_are_problems_with_unique_ids(self) -> None:
        problems = self.make().problems("train")
        assert problems, "no training problems"
        assert all(isinstance(p, Problem) for p in problems), [type(p) for p in problems][:3]
        assert all(isinstance(p.prompt, str) and p.prompt.strip() for p in problems), "a problem has no prompt"
        assert all(isinstance(p.answer, str) for p in problems), "an answer is not text"
        ids = [p.id for p in problems]
        assert len(set(ids)) == len(ids), "two training problems share an id"

    def test_val_problems_are_held_out(self) -> None:
        data = self.make()
        train, val = data.problems("train"), data.problems("val")
        assert all(isinstance(p, Problem) for p in val)
        assert not {p.id for p in train} & {p.id for p in val}, "a val problem's id is also in train"
        assert not {p.prompt for p in train} & {p.prompt for p in val}, "a val problem's prompt is also in train"

    def test_the_same_arguments_give_the_same_problems(self) -> None:
        for split in ("train", "val"):
            assert self.make().problems(split) == self.make().problems(split), split

    def test_traces_are_traces_or_a_clear_error(self) -> None:
        data = self.make()
        try:
            traces = data.traces("train")
        except ValueError as error:  # a dataset without worked solutions: the error must say so
            assert str(error), "load_traces raised a ValueError without a message"
            return
        assert all(isinstance(t, Trace) and isinstance(t.response, str) for t in traces)

    def test_batches_are_lists_of_batch_size_in_a_seeded_order(self) -> None:
        def order() -> list[list[str]]:
            data = self.make()
            loader = data.train_dataloader()
            return [[p.id for p in batch] for batch in loader]

        batches = order()
        data = self.make()
        assert batches and all(len(b) == data.batch_size for b in batches[:-1]), [len(b) for b in batches]
        assert batches == order(), "the same seed gave a different order"


def data_contract(factory: Callable[[], ProblemDataModule]) -> None:
    """Check every rule of :class:`DataContract` against data modules made by ``factory``.

    Raises:
        AssertionError: listing each rule that failed and why.
    """
    run_rules(type("DataUnderTest", (DataContract,), {"factory": staticmethod(factory)})())
