"""One consumer GPU's serving engine: iteration-level batching driven by a scheduling policy.

Note [Turns in a batch]
The real :class:`~aqua_offload.TimeSlicer` lets one slice hold the device at a time. An LLM
engine runs a *batch*: here up to ``max_batch`` requests hold a turn at once, limited by KV
memory (a request reserves (prompt + output) x kv_bytes_per_token when granted, as an engine
with admission control does). Each holder is a TimeSlicer slice, and the policy is driven the
way the slicer drives it, at every iteration boundary (the yield point of every running
request):

1. finished requests leave (``policy.remove``);
2. for each running request ``should_yield(now - turn_start, quantum)``; if so it is charged
   (``charge``), ``requeue``-d, and if ``peek()`` still names it, it is ``pick``-ed again and
   keeps running with a fresh turn; otherwise it is preempted: its state (prompt + generated
   tokens of KV) is paged out to the tier (its memory is free once that copy completed) and
   its turn passes at once to ``pick()``, which waits for memory if it must (the slicer also
   grants the next slice right after issuing the page-out);
3. free turns are granted in ``pick`` order while the head's reservation fits (head-of-line:
   the policy's order is kept, nobody jumps the queue); a preempted request pages back in
   before it runs again; the next in line is prefetched when its reservation fits (as the
   slicer prefetches the next slice). Unlike here, the real slicer's prefetch reserves no
   memory: it only issues the page-in early. A prefetched request keeps its reservation
   while it waits, so if another request gets ahead of it (a newcomer under ``fair``), the
   new head may not fit; when nothing else holds memory that will be freed (no running
   holder, no page-out in flight) the stale prefetches are paged out again (their bytes
   count as page-outs, their memory is free once the copy completed) so the head can run.
   Without that the engine would wait forever.

An arrival charges the running requests (those in the current iteration) up to now and is
``add``-ed with ``running=`` the joined request of least virtual runtime (CFS's min_vruntime
over a runqueue). A request that holds a turn but waits in the prefill queue for the prefill
token budget is not running: it is charged from the iteration it joins, as the slicer
charges only a running slice. With
``max_batch = 1`` this is exactly the slicer's sequence of calls, which the tests check.

``policy="admission"`` is the baseline engine: FCFS admission when the reservation fits, run
to completion, nothing paged (a queue of its own, not the policy classes, so that its
agreement with ``fcfs``, which never preempts, is a real cross-check).
"""

from __future__ import annotations

from collections import deque
from typing import Any

from ..errors import InvalidArgumentError
from ..policies import make_policy
from .engine import EventEngine
from .roofline import ModelSpec, StepModel
from .scenario import GPUConfig
from .server import Placement, Server

__all__ = ["Request", "ServingEngine"]


class Request:
    """A request as the engine tracks it (hashable by identity: a policy task)."""

    __slots__ = ("id", "arrival_s", "prompt", "output", "weight", "generated", "first_token_s",
                 "done_s", "placement", "staged", "paging_in", "join_on_page_in", "reserved",
                 "turn_start", "charged_at", "granted_at", "preemptions", "stall_s", "gpu")

    def __init__(self, id: Any, arrival_s: float, prompt: int, output: int,
                 weight: float = 1.0) -> None:
        self.id = id
        self.arrival_s = arrival_s
        self.prompt = prompt
        self.output = output
        self.weight = weight
        self.generated = 0
        self.first_token_s: float | None = None
        self.done_s: float | None = None
        self.placement: Placement | None = None
        self.staged = False           # prefetched: memory reserved before its turn
        self.paging_in = False
        self.join_on_page_in = False  # holds a turn and waits for its page-in
        self.reserved = 0
        self.turn_start = self.charged_at = self.granted_at = 0.0
        self.preemptions = 0
        self.stall_s = 0.0            # see ServingEngine: resumed, grant to joining a batch
        self.gpu = -1

    @property
    def ttft_s(self) -> float | None:
        """Arrival to the first token (the end of its prefill iteration)."""
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    def __repr__(self) -> str:
        return f"<Request {self.id} {self.generated}/{self.output}>"


class ServingEngine:
    """The engine of one consumer GPU (see Note [Turns in a batch]).

    A request's ``stall_s`` sums, over its resumed turns (it had generated tokens before), the
    time from the grant of the turn to the start of the first iteration it joins: waiting for
    KV memory, its page-in (0 when prefetched in time), and the rest of the iteration in
    flight when it became ready (requests join at iteration boundaries)."""

    def __init__(self, engine: EventEngine, server: Server, gpu: GPUConfig, model: ModelSpec,
                 step: StepModel, policy: str, tier: str | None, quantum_s: float,
                 prefetch: bool = True, record_turns: bool = False) -> None:
        self.policy = None if policy == "admission" else make_policy(policy)
        if self.policy is not None and self.policy.preemptive and tier not in ("host", "peer"):
            raise InvalidArgumentError(f"policy {policy!r} preempts: tier must be host or peer, "
                                       f"got {tier!r}")
        self.sim, self.server, self.gpu, self.model, self.step = engine, server, gpu, model, step
        self.tier = tier
        self.quantum_s = quantum_s
        self.prefetch = prefetch
        self.kv_capacity = gpu.memory_bytes - model.weights_bytes - gpu.reserved_bytes \
            - gpu.lends_bytes
        self.kv_free = self.kv_capacity
        self.queue: deque[Request] = deque()        # admission only
        self.mem_wait: deque[Request] = deque()     # granted, waiting for KV memory
        self.ready: deque[Request] = deque()        # granted and resident: join next iteration
        self.prefill: deque[Request] = deque()      # joined, prompt not processed yet
        self.decoding: dict[Request, None] = {}     # joined, generating (ordered)
        self.prefilling: list[Request] = []         # in the current iteration's prefill
        self.holders = 0                            # requests holding a turn
        self.staged: dict[Request, None] = {}       # prefetched: reserved, no turn yet
        self.outstanding = 0                        # page-outs whose memory is not free yet
        self.busy = False
        self.requests: list[Request] = []
        self.turns: list[Any] | None = [] if record_turns else None
        self.iterations = 0

    # -- arrivals ------------------------------------------------------------------------------
    def need(self, r: Request) -> int:
        """KV bytes ``r`` reserves while it holds a turn."""
        return self.model.request_bytes(r.prompt + r.output)

    def arrive(self, r: Request) -> None:
        if self.need(r) > self.kv_capacity:
            raise InvalidArgumentError(
                f"request {r.id} needs {self.need(r)} B of KV, GPU {self.gpu.index} has "
                f"{self.kv_capacity} B for KV in all")
        r.gpu = self.gpu.index
        self.requests.append(r)
        if self.policy is None:
            self.queue.append(r)
        else:
            running = self.prefilling + list(self.decoding)
            for x in running:  # charged up to now: the newcomer starts level
                self._charge(x)
            joined = running + list(self.prefill)
            least = min(joined, key=self.policy.vruntime) if joined else None
            self.policy.add(r, r.weight, running=least)
        self._fill()
        self._kick()

    def _charge(self, r: Request) -> None:
        now = self.sim.now
        assert self.policy is not None
        self.policy.charge(r, max(0.0, now - r.charged_at))
        r.charged_at = now

    # -- iterations ----------------------------------------------------------------------------
    def _kick(self) -> None:
        if not self.busy:
            self._start_iteration()

    def _start_iteration(self) -> None:
        now = self.sim.now
        while self.ready:
            r = self.ready.popleft()
            r.turn_start = r.charged_at = now
            if r.generated:  # resumed: the time its turn waited for memory and page-in
                r.stall_s += now - r.granted_at
            if r.generated == 0:
                self.prefill.append(r)
            else:
                self.decoding[r] = None
        batch_prefill: list[Request] = []
        tokens = 0
        while self.prefill and (not batch_prefill or
                                tokens + self.prefill[0].prompt <= self.gpu.max_prefill_tokens):
            r = self.prefill.popleft()
            r.charged_at = now  # running from now (not while it waited for the budget)
            batch_prefill.append(r)
            tokens += r.prompt
        batch_decode = list(self.decoding)
        if not batch_prefill and not batch_decode:
            self.busy = False
            return
        ctx = sum(r.prompt + r.generated for r in batch_decode)
        dt = self.step.iteration_s(tokens, len(batch_decode), ctx * self.model.kv_bytes_per_token)
        if self.turns is not None:
            self.turns.extend(r.id for r in batch_prefill + batch_decode)
        self.prefilling = batch_prefill
        self.busy = True
        self.iterations += 1
        self.sim.schedule(dt, self._end_iteration, batch_prefill, batch_decode)
        self._prefetch()

    def _end_iteration(self, batch_prefill: list[Request], batch_decode: list[Request]) -> None:
        now = self.sim.now
        self.prefilling = []
        for r in batch_prefill:
            r.generated = 1
            r.first_token_s = now
            self.decoding[r] = None
        for r in batch_decode:
            r.generated += 1
        for r in batch_prefill + batch_decode:
            if r.generated >= r.output:
                self._finish(r)
        self._yield_points()
        self._fill()
        self.busy = False
        self._start_iteration()

    def _finish(self, r: Request) -> None:
        del self.decoding[r]
        self.holders -= 1
        self.kv_free += r.reserved
        r.reserved = 0
        r.done_s = self.sim.now
        if self.policy is not None:
            self.policy.remove(r)

    # -- preemption and grants -----------------------------------------------------------------
    def _yield_points(self) -> None:
        p = self.policy
        if p is None or not p.preemptive:
            return
        now = self.sim.now
        for r in list(self.decoding):
            if not p.should_yield(now - r.turn_start, self.quantum_s):
                continue
            self._charge(r)
            p.requeue(r)
            if p.peek() is r:  # still first in line: a fresh turn
                p.pick()
                r.turn_start = now
                continue
            self._preempt(r)

    def _preempt(self, r: Request) -> None:
        del self.decoding[r]
        self.holders -= 1
        r.preemptions += 1
        self._page_out(r)
        assert self.policy is not None
        nxt = self.policy.pick()  # the turn passes on now, as in the slicer
        if nxt is not None:
            self._grant(nxt)

    def _page_out(self, r: Request) -> None:
        """Copy ``r``'s state (prompt + generated tokens of KV) to the tier; its reservation is
        free once the copy has read it."""
        reserved, r.reserved = r.reserved, 0
        self.outstanding += 1

        def freed() -> None:  # the GPU memory is reusable once the copy has read it
            self.outstanding -= 1
            self.kv_free += reserved
            self._fill()
            self._kick()
        assert self.tier is not None
        r.placement = self.server.page_out(self.gpu.index,
                                           self.model.request_bytes(r.prompt + r.generated),
                                           self.tier, freed)

    def _fill(self) -> None:
        """Start the turns that wait for memory, then grant free turns (head-of-line)."""
        while self.mem_wait and self.need(self.mem_wait[0]) <= self.kv_free:
            r = self.mem_wait.popleft()
            self._reserve(r)
            self._start_turn(r)
        if self.mem_wait:
            self._unblock()
            return
        if self.policy is None:
            while self.queue and self.holders < self.gpu.max_batch \
                    and self.need(self.queue[0]) <= self.kv_free:
                self._grant(self.queue.popleft())
            return
        while self.holders < self.gpu.max_batch:
            nxt = self.policy.peek()
            if nxt is None or (not nxt.staged and self.need(nxt) > self.kv_free):
                break  # head-of-line: keep the policy's order
            self.policy.pick()
            self._grant(nxt)
        self._prefetch()
        self._unblock()

    def _unblock(self) -> None:
        """If the head (waiting for memory with a turn, or first in line) does not fit and
        only stale prefetches hold memory (nothing running will free any), page those out
        again (Note [Turns in a batch])."""
        if not self.staged or self.outstanding:
            return
        assert self.policy is not None
        head = self.mem_wait[0] if self.mem_wait else self.policy.peek()
        if head is None or head.staged or self.need(head) <= self.kv_free:
            return
        if self.kv_free + sum(r.reserved for r in self.staged) < self.kv_capacity:
            return  # a holder will free memory (it finishes or is preempted)
        for r in list(self.staged):
            if not r.paging_in:  # one still paging in is paged out when it has landed
                self._unstage(r)

    def _unstage(self, r: Request) -> None:
        del self.staged[r]
        r.staged = False
        self._page_out(r)

    def _grant(self, r: Request) -> None:
        """``r`` holds a turn from now; it runs once its memory is reserved and its state is
        back (it waits in ``mem_wait`` while the memory is not free yet)."""
        self.holders += 1
        r.granted_at = self.sim.now
        if r.staged:
            r.staged = False
            del self.staged[r]
        elif not self.mem_wait and self.need(r) <= self.kv_free:
            self._reserve(r)
        else:
            self.mem_wait.append(r)
            return
        self._start_turn(r)

    def _reserve(self, r: Request) -> None:
        r.reserved = self.need(r)
        self.kv_free -= r.reserved

    def _start_turn(self, r: Request) -> None:
        if r.placement is not None and not r.paging_in:
            self._page_in(r)
        if r.paging_in:
            r.join_on_page_in = True
        else:
            self.ready.append(r)

    def _page_in(self, r: Request) -> None:
        assert r.placement is not None
        r.paging_in = True
        self.server.page_in(r.placement, self.gpu.index, lambda: self._paged_in(r))

    def _paged_in(self, r: Request) -> None:
        r.paging_in = False
        r.placement = None
        if r.join_on_page_in:
            r.join_on_page_in = False
            self.ready.append(r)
            self._kick()
        elif r.staged and self.policy is not None:
            self._unblock()  # a stale prefetch may have to go again

    def _prefetch(self) -> None:
        if not self.prefetch or self.policy is None:
            return
        nxt = self.policy.peek()
        if nxt is not None and nxt.placement is not None and not nxt.paging_in \
                and not nxt.staged and not self.mem_wait and self.need(nxt) <= self.kv_free:
            nxt.staged = True
            self.staged[nxt] = None
            self._reserve(nxt)
            self._page_in(nxt)
