"""Several stages' DoFns run as one step, for runners that pay per element per step.

Beam's Python runners fuse consecutive steps into one stage but still pass every element
from step to step through their own machinery: measured on the local runner, about a
microsecond per element per step, and another for a step that reads a side input. A
bounded local run handed every record on four times (six steps). :class:`Fused` calls the
stages' own DoFns directly instead, so what each stage guarantees is unchanged: the same
code, counters and outputs, with none of the hand-offs in between.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.transforms.window import GlobalWindow
from apache_beam.typehints.decorators import no_annotations
from apache_beam.utils.windowed_value import WindowedValue

from moesif_beam.transforms.common.garbage import collect_garbage_less_often

__all__ = ["Fused", "Run"]


class Run(list):
    """Many main outputs of one stage, handed to the next stage at once inside :class:`Fused`.

    The next stage's ``process_run(run, *side_inputs)`` takes the whole run if it has one
    (it must do for the run what ``process`` does for each element, in order); otherwise
    each element goes to ``process``. A run the last stage emits leaves element by
    element. A dedup partition's winners travel as one: handing each record on by itself
    was about 2 µs of CPU a record in the second phase of a bounded run (measured).
    """

    __slots__ = ()


# The class of DoFn.WindowParam, TimestampParam, StateParam...: what only a runner fills in.
_BEAM_PARAM = type(beam.DoFn.WindowParam)


def _positional(stage: beam.DoFn, takes: tuple[str, ...]) -> tuple[str, ...] | None:
    """The side inputs ``takes`` in the order ``stage.process`` takes them after the element.

    None when they are not the plain parameters right after it: they are then given by name.
    """
    if not takes:
        return None
    params = list(inspect.signature(stage.process).parameters.values())[1 : 1 + len(takes)]
    if sorted(p.name for p in params) != list(takes):
        return None
    if any(p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params):
        return None
    return tuple(p.name for p in params)


def _no_side_inputs(index: int, takes: tuple[str, ...], element: Any) -> Any:
    msg = f"stage {index} needs its side inputs {list(takes)} before any element came"
    raise RuntimeError(msg)


class _ChainFn(beam.DoFn):
    """Each stage's main outputs are the next stage's input; tagged outputs leave as they are.

    What one output of the first stage leads to downstream is gathered and emitted before
    the first stage goes on, so memory holds one input line's (or one winner's) outputs at
    a time, never a whole range's. ``finish_bundle`` finishes the stages in order, and what
    one stage emits there goes through the later stages before they finish. Side inputs
    reach the stages whose ``process`` names them; a stage reached from ``finish_bundle``
    gets the bundle's last ones. A tag not declared is an error, not a silent drop.
    """

    def __init__(
        self, stages: Sequence[beam.DoFn], side_names: Iterable[str], tags: Iterable[str]
    ) -> None:
        self._stages = list(stages)
        names = set(side_names)
        self._takes = [
            tuple(sorted(names & set(inspect.signature(stage.process).parameters)))
            for stage in self._stages
        ]
        self._orders = [
            _positional(stage, takes)
            for stage, takes in zip(self._stages, self._takes, strict=True)
        ]
        self._tags = frozenset(tags)
        # A stage takes runs whole if it says so and its side inputs (if any) go by position.
        self._run_fns = [
            getattr(stage, "process_run", None) if not takes or order is not None else None
            for stage, takes, order in zip(self._stages, self._takes, self._orders, strict=True)
        ]

    def setup(self) -> None:
        collect_garbage_less_often()  # see transforms/common/garbage.py
        for stage in self._stages:
            stage.setup()

    def start_bundle(self) -> None:
        # Each stage's process and the side inputs it is given after the element: bound
        # once per input element, not per record (a dict of keywords per record and
        # stage was a tenth of the delivery step's instructions, measured).
        self._callers: list[tuple[Any, tuple[Any, ...]]] = [
            (functools.partial(_no_side_inputs, index, takes) if takes else stage.process, ())
            for index, (stage, takes) in enumerate(zip(self._stages, self._takes, strict=True))
        ]
        for stage in self._stages:
            stage.start_bundle()

    # Beam would read ``**side`` as one side input typed as a dict; the stages check their own.
    @no_annotations
    def process(self, element: Any, **side: Any) -> Iterator[Any]:
        for index, takes in enumerate(self._takes):
            if takes:
                self._callers[index] = self._bound(index, side)
        outputs = self._call(0, element)
        if outputs is None:
            return
        if len(self._stages) == 1:
            yield from self._checked(outputs)
            return
        emitted: list[Any] = []
        for output in outputs:
            kind = type(output)
            if kind is pvalue.TaggedOutput:
                yield self._tagged(output)
                continue
            if kind is Run:
                self._push_run(1, output, emitted)
            else:
                self._push(1, output, emitted)
            if emitted:
                yield from emitted
                emitted.clear()

    def _bound(self, index: int, side: Mapping[str, Any]) -> tuple[Any, tuple[Any, ...]]:
        process = self._stages[index].process
        order = self._orders[index]
        if order is not None:
            return process, tuple(side[name] for name in order)
        return functools.partial(process, **{name: side[name] for name in self._takes[index]}), ()

    def _call(self, index: int, element: Any) -> Any:
        process, args = self._callers[index]
        return process(element, *args) if args else process(element)

    def _push(self, index: int, element: Any, emitted: list[Any]) -> None:
        # _call's two lines, written out here: this runs per record per stage, and a call
        # fewer each time was measurable.
        process, args = self._callers[index]
        outputs = process(element, *args) if args else process(element)
        if outputs is not None:
            self._forward(index + 1, outputs, emitted)

    def _push_run(self, index: int, run: Run, emitted: list[Any]) -> None:
        process_run = self._run_fns[index]
        if process_run is None:
            for element in run:
                self._push(index, element, emitted)
            return
        _, args = self._callers[index]
        self._forward(index + 1, process_run(run, *args), emitted)

    def _forward(self, following: int, outputs: Iterable[Any], emitted: list[Any]) -> None:
        """One stage's outputs: tagged ones out, the rest (single or runs) to ``following``."""
        if following == len(self._stages):
            self._leave(outputs, emitted)
            return
        for output in outputs:
            kind = type(output)
            if kind is pvalue.TaggedOutput:
                emitted.append(self._tagged(output))
            elif kind is Run:
                self._push_run(following, output, emitted)
            else:
                self._push(following, output, emitted)

    def _leave(self, outputs: Iterable[Any], emitted: list[Any]) -> None:
        """The last stage's outputs, as the chain emits them: runs element by element."""
        for output in outputs:
            kind = type(output)
            if kind is pvalue.TaggedOutput:
                emitted.append(self._tagged(output))
            elif kind is Run:
                emitted.extend(output)
            else:
                emitted.append(output)

    def _tagged(self, output: pvalue.TaggedOutput) -> pvalue.TaggedOutput:
        if output.tag not in self._tags:
            msg = f"a stage emitted to {output.tag!r}, not one of the declared tags"
            raise ValueError(msg)
        return output

    def _checked(self, outputs: Iterable[Any]) -> Iterator[Any]:
        for output in outputs:
            kind = type(output)
            if kind is pvalue.TaggedOutput:
                yield self._tagged(output)
            elif kind is Run:
                yield from output
            else:
                yield output

    def finish_bundle(self) -> Iterable[Any]:
        window = GlobalWindow()
        for index, stage in enumerate(self._stages):
            emitted: list[Any] = []
            last = index + 1 == len(self._stages)
            for output in stage.finish_bundle() or ():
                if type(output) is pvalue.TaggedOutput:
                    yield self._tagged(output)  # already windowed, as it must be here
                elif last and type(output.value) is Run:
                    for element in output.value:
                        yield WindowedValue(element, output.timestamp, output.windows)
                elif last:
                    yield output
                elif type(output.value) is Run:
                    self._push_run(index + 1, output.value, emitted)
                else:
                    self._push(index + 1, output.value, emitted)
            # What later stages emitted for these outputs came from process(): window it.
            for output in emitted:
                if type(output) is pvalue.TaggedOutput:
                    yield pvalue.TaggedOutput(
                        output.tag,
                        WindowedValue(output.value, window.max_timestamp(), (window,)),
                    )
                else:
                    yield WindowedValue(output, window.max_timestamp(), (window,))

    def teardown(self) -> None:
        # Every stage is torn down even if one fails; the first failure is raised.
        failure: BaseException | None = None
        for stage in reversed(self._stages):
            try:
                stage.teardown()
            except Exception as exc:
                failure = failure or exc
        if failure is not None:
            raise failure


class Fused(beam.PTransform):
    """Apply ``stages`` (DoFns taken from composites) as one ``ParDo``.

    Guarantees: each stage's main outputs are the next stage's input and the last stage's
    are the main output (``main``); every tagged output of every stage leaves under its
    tag, which must be in ``tags``; every stage's setup, bundles and teardown run in order.
    Only for the global window (bounded runs). ``side_inputs`` (name to ``AsDict`` or
    another side-input view) reach the stages whose ``process`` has a parameter of that
    name. The output is the ``ParDo``'s tagged outputs.
    """

    def __init__(
        self,
        stages: Sequence[beam.DoFn],
        tags: Sequence[str] = (),
        side_inputs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not stages or not all(isinstance(stage, beam.DoFn) for stage in stages):
            msg = "Fused needs one or more DoFns"
            raise ValueError(msg)
        self._side_inputs = dict(side_inputs or {})
        self._tags = tuple(tags)
        self._fn = _ChainFn(stages, self._side_inputs, self._tags)
        unused = set(self._side_inputs) - {name for t in self._fn._takes for name in t}
        if unused:
            msg = f"no stage takes the side inputs {sorted(unused)}"
            raise ValueError(msg)
        for stage in stages:
            # Every parameter after the element without a default must be a side input
            # given here: the runner fills nothing else in (no window, timestamp or state).
            params = list(inspect.signature(stage.process).parameters.values())[1:]
            missing = [
                p.name
                for p in params
                if p.default is inspect.Parameter.empty
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                and p.name not in self._side_inputs
            ]
            defaults = [p.name for p in params if isinstance(p.default, _BEAM_PARAM)]
            if missing or defaults:
                msg = (
                    f"{type(stage).__name__}.process needs {missing + defaults}, "
                    "which Fused does not give"
                )
                raise ValueError(msg)

    def expand(self, pcoll: beam.PCollection) -> pvalue.DoOutputsTuple:
        return pcoll | beam.ParDo(self._fn, **self._side_inputs).with_outputs(
            *self._tags, main="main"
        )
