"""The simulator's waiting groups and their views, kept up to date from what changed.

The simulator's counterpart of controller/waiting_view.py (issue 13): a tick hands
`build_snapshot` the views of every group with requests waiting, in the order the groups
opened, and at 60,000 waiting (~5,000 groups) rebuilding or even re-checking every group
each tick cost more than the rest of the tick. Here only the groups that changed since
the last tick (a request joined, left or came back) are looked at; the others keep
their view object, so controller/cluster_view.py's StateCache keeps their states too.

The rules are the ones the simulator always had: a request joins its (model, class,
length band)'s open group by controller/grouping.py's `choose_group`; a group with
nothing waiting is forgotten at the next snapshot once it is no longer open (a request
requeued to it later opens it again, at the end of the order).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from qlmserve.controller.cluster_view import GroupView, RequestView
from qlmserve.controller.grouping import OpenGroup, choose_group
from qlmserve.controller.policy import PolicyConfig
from qlmserve.sim.request import SimRequest, SimStatus


@dataclass(eq=False)
class SimGroup:
    group_id: str
    model: str
    slo_class: str
    created_at: float
    seq: int  # its place in the order groups opened (a reopened group: a new, later one)
    length_band: int = 0
    joined: int = 0  # requests that ever joined (the grouping rule's size)
    waiting: list[SimRequest] = field(default_factory=list)  # by arrival, requeued ones ahead
    arrivals: list[float] = field(default_factory=list)  # parallel to waiting (for bisect)
    view: GroupView | None = None

    def add(self, r: SimRequest, head: bool = False) -> None:
        """By arrival; at the head when `head` (a requeued request goes ahead of those
        waiting, as the controller's REQUEUE script puts it). Arrivals join after every
        request waiting, so the bisect finds the end whatever a requeue put at the head."""
        i = 0 if head else bisect.bisect_right(self.arrivals, r.arrival)
        self.arrivals.insert(i, r.arrival)
        self.waiting.insert(i, r)

    def remove(self, r: SimRequest) -> None:
        i = self.waiting.index(r)
        del self.waiting[i]
        del self.arrivals[i]


class WaitingGroups:
    """Groups by id, the open group of each (model, class), and the views of the groups
    with requests waiting, in opening order (what a snapshot reads)."""

    def __init__(self, cfg: PolicyConfig) -> None:
        self.cfg = cfg
        self.groups: dict[str, SimGroup] = {}  # every group not yet forgotten, in opening order
        self.open_groups: dict[tuple[str, str, int], SimGroup] = {}  # by (model, class, length band)
        self._opened = 0  # groups opened by arrivals (their ids)
        self._seq = 0  # groups put in `groups` so far, reopened ones too (their order)
        self._changed: set[SimGroup] = set()  # since the last `views`
        self._may_go: list[SimGroup] = []  # emptied or closed since the last `views`: forgotten if both
        # The views of the groups with requests waiting, by seq (parallel lists).
        self._seqs: list[int] = []
        self._views: list[GroupView] = []

    def join(self, r: SimRequest, now: float) -> None:
        key = (r.model, r.slo_class, r.length_band)
        og = self.open_groups.get(key)
        gid = choose_group(OpenGroup(og.group_id, og.created_at, og.joined) if og else None, now, self.cfg.grouping)
        if gid is None:
            if og is not None:
                self._may_go.append(og)
            self._opened += 1
            self._seq += 1
            og = SimGroup(f"{r.model}|{r.slo_class}|{self._opened}", r.model, r.slo_class, now, self._seq,
                          r.length_band)
            self.open_groups[key] = og
            self.groups[og.group_id] = og
        og.joined += 1
        r.group_id = og.group_id
        r.status = SimStatus.WAITING
        og.add(r)
        self._changed.add(og)

    def requeue(self, r: SimRequest) -> None:
        """A request back in its group (reopened at the end of the order if forgotten)."""
        g = self.groups.get(r.group_id)
        if g is None:
            self._seq += 1
            g = SimGroup(r.group_id, r.model, r.slo_class, r.arrival, self._seq, r.length_band)
            self.groups[r.group_id] = g
        r.status = SimStatus.WAITING
        g.add(r, head=True)
        self._changed.add(g)

    def remove(self, r: SimRequest) -> None:
        """A waiting request leaves its group (dispatched, or failed)."""
        g = self.groups[r.group_id]
        g.remove(r)
        self._changed.add(g)
        if not g.waiting:
            self._may_go.append(g)

    def forget_empty(self) -> list[str]:
        """Forget the groups with nothing waiting that are no longer open; their ids."""
        gone = []
        for g in self._may_go:
            still_open = self.open_groups.get((g.model, g.slo_class, g.length_band)) is g
            if not g.waiting and self.groups.get(g.group_id) is g and not still_open:
                del self.groups[g.group_id]
                gone.append(g.group_id)
        self._may_go.clear()
        return gone

    def views(self) -> tuple[GroupView, ...]:
        """The views of the groups with requests waiting, in opening order; a changed
        group's view is built again, the others are the same objects as last time."""
        for g in self._changed:
            i = bisect.bisect_left(self._seqs, g.seq)
            here = i < len(self._seqs) and self._seqs[i] == g.seq
            if g.waiting and self.groups.get(g.group_id) is g:
                g.view = self._view(g)
                if here:
                    self._views[i] = g.view
                else:
                    self._seqs.insert(i, g.seq)
                    self._views.insert(i, g.view)
            elif here:
                del self._seqs[i]
                del self._views[i]
        self._changed.clear()
        return tuple(self._views)

    def _view(self, g: SimGroup) -> GroupView:
        slo = self.cfg.slo_classes[g.slo_class]
        return GroupView(g.group_id, g.model, g.slo_class, g.created_at, tuple(
            RequestView(r.rid, r.group_id, r.model, r.slo_class, r.arrival, r.prompt_tokens, r.max_tokens,
                        r.generated, r.first_token_at, False, slo.ttft_s, slo.latency_sensitive, r.hash_ids, r.session,
                        r.length_band)
            for r in g.waiting))
