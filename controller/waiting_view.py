"""The controller's view of the waiting groups, kept up to date from what changed.

The choice (issue 13): a Redis stream of changes (Keys.changes). Every Lua script that
changes a group's queue (SUBMIT, ASSIGN, REQUEUE, FINISH_EARLY in qlmserve/redis_scripts.py)
appends (op, group, request) in the same atomic step, under ids 0-1, 0-2, ... with no
gaps. A tick reads only the entries after its cursor, so its cost follows what changed,
not how many requests wait; and it sees every writer (a standby controller accepting
submissions, a cancel through another controller).

A full read of the groups (`RedisStore.groups`) happens only
  - at start-up and when this controller takes the lead (`reset`),
  - when the stream no longer holds the entries after the cursor (trimmed while the
    reader was away, or Redis lost its data: the ids are not contiguous), and
  - as a periodic consistency check (every CHECK_EVERY_S), which logs and counts any
    difference and then adopts what Redis holds.

Entries replayed over a full read taken after the cursor change nothing: each says where
a request ends up (at the tail, at the head, gone), and one whose request is already
there is skipped, so the replay ends in the state Redis holds.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from qlmserve.controller.store import GroupRecord, RedisStore

log = logging.getLogger("qlm.controller")

# Seconds between consistency checks against a full read. A full read costs what waits
# (~1 s at 100,000 waiting on the 2-core machine): rare enough to stay out of the tick p99.
CHECK_EVERY_S = 600.0
# Changes read per round trip.
READ_BATCH = 20_000
# The leader trims the changes it has applied (issue 11: Redis memory flat under a steady
# overload; the stream's MAXLEN alone let it grow for the ~100 minutes a 200,000-entry
# stream takes to fill at 30 changes/s). It keeps the last KEEP_CHANGES behind its cursor
# (~50 KB) and trims once every TRIM_EVERY applied entries, one XTRIM per ~second at
# 1,000 changes/s. A reader further behind (a paused old leader) sees the gap and reads
# everything, as after any trim.
KEEP_CHANGES = 1_000
TRIM_EVERY = 1_000


@dataclass
class WaitingGroup:
    group_id: str
    model: str
    slo_class: str
    created_at: float
    waiting: list[str] = field(default_factory=list)  # request ids, oldest first (requeued ones ahead)


class WaitingView:
    """Groups with requests waiting, as Redis holds them, updated from the changes stream."""

    def __init__(self, check_every_s: float = CHECK_EVERY_S) -> None:
        self.groups: dict[str, WaitingGroup] = {}
        self.cursor: int | None = None  # last change applied; None: read everything next
        self.check_every_s = check_every_s
        self.checked_at = 0.0
        self.full_reads = 0
        self.mismatches = 0  # consistency checks that found the view different from Redis
        self._order: list[str] | None = None  # group ids by (created_at, id), None: re-sort
        self._resets = 0  # reset() calls so far: a refresh that awaited across one gives up
        self._trimmed_at = 0  # the cursor at the last trim

    def reset(self) -> None:
        """Read everything again at the next refresh (start-up, a new lead). It may come while
        a refresh awaits Redis (the lease task runs beside the tick): that refresh then stops
        and reads everything, rather than apply changes after a cursor that is gone."""
        self.cursor = None
        self._resets += 1

    def ordered(self) -> list[WaitingGroup]:
        """Groups by creation time, as the groups set orders them."""
        if self._order is None:
            self._order = sorted(self.groups, key=lambda gid: (self.groups[gid].created_at, gid))
        return [self.groups[gid] for gid in self._order]

    async def refresh(self, store: RedisStore) -> tuple[set[str], set[str], bool]:
        """Bring the view up to date. Returns (groups that changed or left, request ids that
        left the queues, whether this was a full read: then every group counts as changed)."""
        if self.cursor is None:
            return await self._full_read(store)
        if time.monotonic() - self.checked_at >= self.check_every_s:
            return await self._check(store)
        changed: set[str] = set()
        left: set[str] = set()
        if not await self._catch_up(store, changed, left):
            return await self._full_read(store)
        await self._trim(store)
        return changed, left, False

    async def _trim(self, store: RedisStore) -> None:
        if self.cursor is not None and self.cursor - self._trimmed_at >= TRIM_EVERY:
            self._trimmed_at = self.cursor
            await store.trim_changes(self.cursor - KEEP_CHANGES)

    async def _catch_up(self, store: RedisStore, changed: set[str], left: set[str], upto: int | None = None) -> bool:
        """Apply the changes after the cursor (up to `upto`); False when the stream no
        longer holds them all (a full read must follow)."""
        assert self.cursor is not None
        resets = self._resets
        while upto is None or self.cursor < upto:
            batch = await store.read_changes(self.cursor, READ_BATCH)
            if self._resets != resets:
                return False
            if upto is not None:
                batch = [e for e in batch if e[0] <= upto]
            if batch and batch[0][0] != self.cursor + 1:
                log.warning("changes stream lost entries after %d (next is %d): reading all groups",
                            self.cursor, batch[0][0])
                return False
            if not batch:
                if await store.last_change() < self.cursor:  # the stream started over (Redis lost it)
                    log.warning("changes stream restarted: reading all groups")
                    return False
                return True
            if not await self._apply(store, batch, changed, left, resets):
                return False
            if len(batch) < READ_BATCH:
                return True
        return True

    async def _apply(self, store: RedisStore, batch: list[tuple[int, str, str, str]], changed: set[str],
                     left: set[str], resets: int) -> bool:
        """Apply a batch of changes; False (nothing applied) when a reset came meanwhile."""
        unknown = [gid for _seq, op, gid, _rid in batch if op != "x" and gid not in self.groups]
        headers = await store.group_headers(list(dict.fromkeys(unknown)))
        if self._resets != resets:
            return False
        emptied: set[str] = set()  # removed at the end: a later entry of the batch may refill one
        for seq, op, gid, rid in batch:
            self.cursor = seq
            g = self.groups.get(gid)
            if op == "x":
                if g is not None and rid in g.waiting:
                    g.waiting.remove(rid)
                    changed.add(gid)
                    if not g.waiting:
                        emptied.add(gid)
                left.add(rid)
                continue
            if g is None:
                h = headers.get(gid)
                if h is None:  # its hash is gone: the request left since (a later entry says so)
                    continue
                g = self.groups[gid] = WaitingGroup(gid, h[0], h[1], h[2])
                self._order = None
            if rid in g.waiting:
                continue
            if op == "r":
                g.waiting.insert(0, rid)
            else:
                g.waiting.append(rid)
            left.discard(rid)
            changed.add(gid)
        for gid in emptied:
            if not self.groups[gid].waiting:
                del self.groups[gid]
                self._order = None
        return True

    async def _full_read(self, store: RedisStore) -> tuple[set[str], set[str], bool]:
        """Everything from Redis: the groups set and every group's queue."""
        was = {rid for g in self.groups.values() for rid in g.waiting}
        changed = set(self.groups)
        self.cursor = await store.last_change()  # before the read: later entries replay over it
        records = await store.groups()
        await store.drop_empty_groups(records)
        self.groups = {g.group_id: WaitingGroup(g.group_id, g.model, g.slo_class, g.created_at, list(g.waiting))
                       for g in records if g.waiting}
        self._order = None
        left: set[str] = set()
        # Entries written between the cursor and the read: replaying them changes nothing the
        # read already shows, and brings in what it missed. (The stream cannot have lost
        # them in these few milliseconds.)
        if self.cursor is not None:  # else a reset came meanwhile: the next refresh reads all again
            await self._catch_up(store, changed, left)
        changed |= set(self.groups)
        self.full_reads += 1
        self.checked_at = time.monotonic()
        left = was - {rid for g in self.groups.values() for rid in g.waiting}
        return changed, left, True

    async def _check(self, store: RedisStore) -> tuple[set[str], set[str], bool]:
        """A full read, compared with this view brought up to the same change."""
        inc = WaitingView(self.check_every_s)
        inc.groups = {gid: WaitingGroup(g.group_id, g.model, g.slo_class, g.created_at, list(g.waiting))
                      for gid, g in self.groups.items()}
        inc.cursor = self.cursor
        out = await self._full_read(store)
        if await inc._catch_up(store, set(), set(), upto=self.cursor):
            mine = {gid: g.waiting for gid, g in inc.groups.items()}
            truth = {gid: g.waiting for gid, g in self.groups.items()}
            if mine != truth:
                self.mismatches += 1
                diff = sorted(gid for gid in set(mine) | set(truth) if mine.get(gid) != truth.get(gid))
                log.warning("waiting view differed from Redis in %d groups (e.g. %s): adopted Redis",
                            len(diff), diff[:3])
        return out

    def records(self) -> list[GroupRecord]:
        """The view as the store's group records (for comparison with `RedisStore.groups`)."""
        return [GroupRecord(g.group_id, g.model, g.slo_class, g.created_at, tuple(g.waiting)) for g in self.ordered()]
