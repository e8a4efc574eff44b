"""run_hybrid: on the caller's thread while operations answer now, then one worker thread."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import pytest

from keyguard.errors import StorageError
from keyguard.flows import NOT_NOW, NotNow, Op, run_async, run_hybrid, run_sync


@dataclass
class Ctx:
    """Notes the thread each operation ran on; ``gate`` holds the blocking ones."""

    threads: list[tuple[str, int]] = field(default_factory=list)
    gate: threading.Event | None = None
    entered: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class Value(Op[Ctx, Ctx, int]):
    """Answers ``value`` now when ``quick``, else only through blocking I/O."""

    value: int
    quick: bool = True
    fails: Exception | None = None

    def now(self, ctx: Ctx) -> int | NotNow:
        if not self.quick:
            return NOT_NOW
        return self._answer(ctx, "now")

    def run(self, ctx: Ctx) -> int:
        ctx.entered.set()
        if ctx.gate is not None:
            ctx.gate.wait(5)
        return self._answer(ctx, "run")

    async def arun(self, ctx: Ctx) -> int:
        return self._answer(ctx, "arun")

    def _answer(self, ctx: Ctx, how: str) -> int:
        ctx.threads.append((how, threading.get_ident()))
        if self.fails is not None:
            raise self.fails
        return self.value


Flow = Generator[Op[Ctx, Ctx, Any], Any, int]


def adding(*ops: Value) -> Flow:
    """The sum of the operations' results; a StorageError counts as -100."""
    total = 0
    for op in ops:
        try:
            total += yield op
        except StorageError:
            total -= 100
    return total


async def test_a_flow_whose_operations_all_answer_now_never_leaves_the_thread() -> None:
    ctx = Ctx()
    assert await run_hybrid(adding(Value(1), Value(2), Value(3)), ctx) == 6
    here = threading.get_ident()
    assert ctx.threads == [("now", here)] * 3


async def test_from_the_first_operation_that_cannot_answer_the_flow_runs_in_one_worker() -> None:
    ctx = Ctx()
    flow = adding(Value(1), Value(2, quick=False), Value(3), Value(4, quick=False))
    assert await run_hybrid(flow, ctx) == 10
    here = threading.get_ident()
    assert ctx.threads[0] == ("now", here)
    rest = ctx.threads[1:]
    assert [how for how, _ in rest] == ["run"] * 3, "the rest is run_sync, in the thread"
    assert len({thread for _, thread in rest}) == 1
    assert rest[0][1] != here


async def test_a_flow_with_no_operations_returns_its_value() -> None:
    assert await run_hybrid(adding(), Ctx()) == 0


@pytest.mark.parametrize("quick", [True, False], ids=["now", "in the thread"])
async def test_a_storage_error_is_thrown_into_the_flow_as_run_sync_does(quick: bool) -> None:
    def ops() -> Flow:
        return adding(Value(1), Value(2, quick=quick, fails=StorageError("down")), Value(3))

    expected = run_sync(ops(), Ctx())
    assert expected == 1 - 100 + 3
    assert await run_hybrid(ops(), Ctx()) == expected
    assert await run_async(ops(), Ctx()) == expected


@pytest.mark.parametrize("quick", [True, False], ids=["now", "in the thread"])
async def test_another_exception_propagates_as_run_sync_does(quick: bool) -> None:
    flow = adding(Value(1), Value(2, quick=quick, fails=RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        await run_hybrid(flow, Ctx())


async def test_a_flow_that_raises_in_the_thread_propagates() -> None:
    def broken() -> Flow:
        yield Value(1, quick=False)
        raise ValueError("the flow failed")

    with pytest.raises(ValueError, match="the flow failed"):
        await run_hybrid(broken(), Ctx())


async def test_the_worker_runs_in_a_copy_of_the_callers_context() -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    seen: list[str] = []

    def flow() -> Flow:
        var.set("set by the flow on the loop")
        yield Value(1, quick=False)
        seen.append(var.get())
        return 0

    await run_hybrid(flow(), Ctx())
    assert seen == ["set by the flow on the loop"]


async def test_a_cancelled_caller_waits_for_the_thread_and_hands_its_result_over() -> None:
    gate = threading.Event()
    ctx = Ctx(gate=gate)
    abandoned: list[int] = []

    async def give_back(result: int) -> None:
        abandoned.append(result)

    flow = adding(Value(1), Value(2, quick=False))
    task = asyncio.ensure_future(run_hybrid(flow, ctx, abandoned=give_back))
    assert await asyncio.to_thread(ctx.entered.wait, 5)
    task.cancel()
    await asyncio.sleep(0)
    assert not task.done(), "the task waits for the work it started"
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert abandoned == [3]
