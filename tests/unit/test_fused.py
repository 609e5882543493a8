"""Fused: stages' DoFns called one from the other, with the outputs each would have had."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import apache_beam as beam
import pytest
from apache_beam import pvalue
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

from moesif_beam.transforms.common.fused import Fused
from tests.helpers import make_pipeline


class _Split(beam.DoFn):
    """Words of a line; an empty line is rejected; counts lines per bundle."""

    def start_bundle(self) -> None:
        self.lines = 0

    def process(self, line: str) -> Iterator[Any]:
        self.lines += 1
        if not line:
            yield pvalue.TaggedOutput("rejects", "empty line")
            return
        yield from line.split()

    def finish_bundle(self) -> Iterator[Any]:
        window = GlobalWindow()
        yield pvalue.TaggedOutput(
            "tallies", WindowedValue(("lines", self.lines), window.max_timestamp(), (window,))
        )
        # A main output from finish_bundle goes through the later stages too.
        yield WindowedValue("end", window.max_timestamp(), (window,))


class _Hold(beam.DoFn):
    """Holds words until the bundle ends (as the spill does), dropping banned ones."""

    def setup(self) -> None:
        self.set_up = True

    def start_bundle(self) -> None:
        self.held: list[str] = []

    def process(self, word: str, banned: dict) -> Iterator[Any]:
        if word in banned:
            yield pvalue.TaggedOutput("rejects", f"banned: {word}")
            return
        self.held.append(word.upper())

    def finish_bundle(self) -> Iterator[Any]:
        assert self.set_up
        window = GlobalWindow()
        for word in self.held:
            yield WindowedValue(word, window.max_timestamp(), (window,))


def test_fused_stages_keep_every_output_and_take_their_side_inputs():
    pipeline = make_pipeline()
    banned = pipeline | "Banned" >> beam.Create([("spam", 1)])
    out = (
        pipeline
        | beam.Create(["ham spam eggs", "", "toast"])
        | Fused(
            [_Split(), _Hold()],
            tags=("rejects", "tallies"),
            side_inputs={"banned": beam.pvalue.AsDict(banned)},
        )
    )
    # "end", from _Split.finish_bundle, went through _Hold with the side input too.
    assert_that(out.main, equal_to(["HAM", "EGGS", "TOAST", "END"]), label="main")
    assert_that(out.rejects, equal_to(["empty line", "banned: spam"]), label="rejects")
    assert_that(out.tallies | beam.CombinePerKey(sum), equal_to([("lines", 3)]), label="tallies")
    pipeline.run().wait_until_finish()


class _HoldByName(_Hold):
    """The same stage, its side inputs taken by keyword only (and in another order)."""

    def process(self, word: str, *, suffix: str, banned: dict) -> Iterator[Any]:
        yield from super().process(word + suffix, banned)


@pytest.mark.parametrize("stage", [_Hold, _HoldByName])
def test_side_inputs_reach_a_stage_by_position_or_by_name(stage):
    # Fused binds a stage's side inputs once per element: by position when they are the
    # parameters right after the element, by name otherwise.
    pipeline = make_pipeline()
    banned = pipeline | "Banned" >> beam.Create([("spam", 1), ("spam!", 1)])
    suffix = pipeline | "Suffix" >> beam.Create(["!"])
    sides = {"banned": beam.pvalue.AsDict(banned)}
    if stage is _HoldByName:
        sides["suffix"] = beam.pvalue.AsSingleton(suffix)
    out = (
        pipeline
        | beam.Create(["ham spam"])
        | Fused([_Split(), stage()], tags=("rejects", "tallies"), side_inputs=sides)
    )
    expected = ["HAM!", "END!"] if stage is _HoldByName else ["HAM", "END"]
    assert_that(out.main, equal_to(expected), label="main")
    rejected = "banned: spam!" if stage is _HoldByName else "banned: spam"
    assert_that(out.rejects, equal_to([rejected]), label="rejects")
    pipeline.run().wait_until_finish()


def test_a_main_output_of_finish_bundle_reaches_the_next_stage():
    pipeline = make_pipeline()
    out = pipeline | beam.Create(["a"]) | Fused([_Split(), beam.Map(str).dofn], tags=("tallies",))
    assert_that(out.main, equal_to(["a", "end"]))
    pipeline.run().wait_until_finish()


def test_fused_refuses_what_it_cannot_run():
    with pytest.raises(ValueError, match="one or more DoFns"):
        Fused([])
    with pytest.raises(ValueError, match=r"no stage takes the side inputs \['other'\]"):
        Fused([_Split()], side_inputs={"other": object()})


class _Flood(beam.DoFn):
    """One element in, many rejects out (a range of lines that are all bad)."""

    def process(self, n: int) -> Iterator[Any]:
        for i in range(n):
            yield f"line {i}"


class _Reject(beam.DoFn):
    def process(self, line: str) -> Iterator[Any]:
        yield pvalue.TaggedOutput("rejects", line)


def test_outputs_leave_as_the_first_stage_goes_not_after_its_element():
    # A range of bad lines must not be held whole: each line's rejects leave before the
    # next line is read.
    from moesif_beam.transforms.common.fused import _ChainFn

    chain = _ChainFn([_Flood(), _Reject()], (), ("rejects",))
    chain.start_bundle()
    outputs = chain.process(3)
    first = next(outputs)
    assert first.value == "line 0"
    assert [o.value for o in outputs] == ["line 1", "line 2"]


def test_an_undeclared_tag_is_an_error_not_a_silent_drop():
    pipeline = make_pipeline()
    _ = pipeline | beam.Create([1]) | Fused([_Flood(), _Reject()], tags=())
    with pytest.raises(Exception, match="not one of the declared tags"):
        pipeline.run().wait_until_finish()


def test_fused_refuses_a_stage_whose_arguments_it_cannot_give():
    class _Windowed(beam.DoFn):
        def process(self, element: Any, window: Any = beam.DoFn.WindowParam) -> None:
            pass

    with pytest.raises(ValueError, match=r"needs \['banned'\]"):
        Fused([_Hold()])
    with pytest.raises(ValueError, match=r"needs \['window'\]"):
        Fused([_Windowed()])


def test_every_stage_is_torn_down_when_one_fails():
    from moesif_beam.transforms.common.fused import _ChainFn

    torn: list[str] = []

    class _Stage(beam.DoFn):
        def __init__(self, name: str, fail: bool) -> None:
            self.name, self.fail = name, fail

        def teardown(self) -> None:
            torn.append(self.name)
            if self.fail:
                raise RuntimeError(self.name)

    chain = _ChainFn([_Stage("a", False), _Stage("b", True), _Stage("c", True)], (), ())
    with pytest.raises(RuntimeError, match="c"):
        chain.teardown()
    assert torn == ["c", "b", "a"]


class _Runs(beam.DoFn):
    """One element in, its words out as one run."""

    def process(self, line: str) -> Iterator[Any]:
        from moesif_beam.transforms.common.fused import Run

        yield Run(line.split())


class _Upper(beam.DoFn):
    """Takes runs whole when it can: each call is recorded, as is each side input."""

    def setup(self) -> None:
        self.calls: list[Any] = []

    def process(self, word: str, banned: dict) -> tuple[Any, ...]:
        self.calls.append(word)
        if word in banned:
            return (pvalue.TaggedOutput("rejects", f"banned: {word}"),)
        return (word.upper(),)

    def process_run(self, run: list[str], banned: dict) -> list[Any]:
        from moesif_beam.transforms.common.fused import Run

        self.calls.append(list(run))
        kept = Run(word.upper() for word in run if word not in banned)
        return [kept, *(pvalue.TaggedOutput("rejects", f"banned: {w}") for w in run if w in banned)]


class _UpperOneByOne(beam.DoFn):
    def process(self, word: str) -> tuple[str]:
        return (word.upper(),)


def test_a_run_reaches_a_stage_that_takes_runs_whole_and_leaves_element_by_element():
    from moesif_beam.transforms.common.fused import _ChainFn

    upper = _Upper()
    chain = _ChainFn([_Runs(), upper], ("banned",), ("rejects",))
    chain.setup()
    chain.start_bundle()
    outputs = list(chain.process("a spam b", banned={"spam": 1}))
    assert upper.calls == [["a", "spam", "b"]]  # one call for the whole run
    assert [o for o in outputs if not isinstance(o, pvalue.TaggedOutput)] == ["A", "B"]
    assert [o.value for o in outputs if isinstance(o, pvalue.TaggedOutput)] == ["banned: spam"]

    # A stage without process_run gets each element of the run in order, and a run the
    # last stage emits leaves as its elements.
    chain = _ChainFn([_Runs(), _UpperOneByOne()], (), ())
    chain.start_bundle()
    assert list(chain.process("x y z")) == ["X", "Y", "Z"]
    alone = _ChainFn([_Runs()], (), ())
    alone.start_bundle()
    assert list(alone.process("x y")) == ["x", "y"]


def test_a_run_through_a_pipeline_gives_what_elements_one_by_one_give():
    pipeline = make_pipeline()
    banned = pipeline | "Banned" >> beam.Create([("spam", 1)])
    out = (
        pipeline
        | beam.Create(["a spam b", "c"])
        | Fused(
            [_Runs(), _Upper()],
            tags=("rejects",),
            side_inputs={"banned": beam.pvalue.AsDict(banned)},
        )
    )
    assert_that(out.main, equal_to(["A", "B", "C"]), label="main")
    assert_that(out.rejects, equal_to(["banned: spam"]), label="rejects")
    pipeline.run().wait_until_finish()
