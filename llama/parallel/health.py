"""Liveness of a tensor-parallel run: heartbeats, error reports, and who to blame.

Every rank runs a daemon thread that publishes `count|phase|collectives` under
`hb/<rank>` in the run's TCPStore (the one torchrun's MASTER_ADDR:MASTER_PORT names) every
`interval_s`. A worker that fails writes `err/<rank>` ("fault" or "comm", and the message)
before it exits. Rank 0's thread watches the workers; the workers' threads watch rank 0 and the
`abort` key. Counts are compared on the watcher's own clock, so host clocks need not agree.

When a collective fails on rank 0, `diagnose` names the culprit, in this order: a rank whose
process is gone (same host) or whose heartbeat stopped for `timeout_s`; a rank that reported a
fault of its own; a rank that had entered fewer collectives than rank 0 (it hangs inside a
step while its heartbeat thread still runs); a rank that reported a communication error.

Bounded exit: a worker whose rank 0 vanished, or that sees `abort`, exits at once (status 1).
Rank 0, once it knows of a failure, reports it on stderr, sets `abort`, and exits (status 1)
if its main thread is still stuck in a collective `grace_s` later (NCCL may never return), or
at once after `grace_s` when `exit_on_failure` is set (an app whose model cannot run anymore).

Collective timeouts: with gloo a collective raises after the data group's timeout, and
`diagnose` runs. NCCL collectives never raise on the host (the host waits at the next sync),
so rank 0's thread also blames on its own clock: busy with no new collective for
`collective_timeout_s` (LLAMA_TP_TIMEOUT) -> the same diagnosis, then the bounded exit.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist


class DistributedError(RuntimeError):
    """A tensor-parallel run could not start or cannot go on."""


class RankFailure(DistributedError):
    """A rank died, hung or failed; `rank` is the culprit (None when it could not be told)."""

    def __init__(self, rank: int | None, world_size: int, reason: str, *,
                 stopped: bool = False) -> None:
        who = f"rank {rank} of {world_size}" if rank is not None else f"a rank of {world_size}"
        text = (f"tensor-parallel run of {world_size} ranks stopped: {reason}" if stopped
                else f"tensor-parallel {who} failed: {reason}")
        super().__init__(text)
        self.rank, self.reason = rank, reason


# The reason given to a worker whose process is gone without saying why.
EXITED = "its process"
# The reason given to a rank that did not reach a collective its peers waited in.
HANGS = "it never joined the collective the other ranks waited in"
_COMM_MARKERS = ("gloo", "nccl", "connection closed", "connection reset", "timed out",
                 "broken pipe", "socket")


def is_comm_error(exc: BaseException) -> bool:
    """Whether `exc` came from talking to peers (a symptom) rather than from this rank's work."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(m in text for m in _COMM_MARKERS)


def _summary(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def _process_gone(pid: int) -> bool:
    """Whether a local process has exited (a zombie counts as gone)."""
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


@dataclass
class _Peer:
    value: str = ""
    changed_at: float = 0.0
    host: str = ""
    pid: int = 0
    error: str | None = None

    @property
    def phase(self) -> str:
        parts = self.value.split("|")
        return parts[1] if len(parts) > 1 else "starting"

    @property
    def collectives(self) -> int:
        parts = self.value.split("|")
        return int(parts[2]) if len(parts) > 2 else 0


class Health:
    """Heartbeat thread, error records and failure diagnosis for one rank (see module doc)."""

    def __init__(self, rank: int, world_size: int, host: str, port: int, *, prefix: str,
                 timeout_s: float = 20.0, interval_s: float = 0.5, grace_s: float = 3.0,
                 exit_on_failure: bool = False, collective_timeout_s: float | None = None,
                 ) -> None:
        self.rank, self.world_size = rank, world_size
        self.timeout_s, self.interval_s, self.grace_s = timeout_s, interval_s, grace_s
        self.collective_timeout_s = collective_timeout_s
        self._progress: tuple[int, float] = (0, 0.0)  # (collectives, when that count was seen)
        self.exit_on_failure = exit_on_failure
        client = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=30))
        self._store = dist.PrefixStore(prefix, client)
        self._lock = threading.Lock()
        self.phase = "starting"
        self.collectives = 0  # data-group collectives entered (compared across ranks)
        self.failure: RankFailure | None = None
        self.errored = False  # this rank published an error of its own
        self.leaving = False  # rank 0 is stopping on purpose: workers that go are no failure
        self._failed_at: float | None = None
        self._busy_since: float | None = None
        self._beats = 0
        self._stop = threading.Event()
        self._signals_watched = False
        self._peers: dict[int, _Peer] = {}
        self._silent_exit: dict[int, float] = {}  # rank -> when first seen gone without a word
        self._set(f"info/{rank}", f"{socket.gethostname()} {os.getpid()}")
        self._thread = threading.Thread(target=self._run, name="tp-health", daemon=True)

    # Main-thread API -----------------------------------------------------------------
    def start(self) -> None:
        self._beat()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    @contextmanager
    def busy(self, phase: str) -> Iterator[None]:
        """Mark the main thread as inside a call that talks to the other ranks."""
        self.phase, self._busy_since = phase, time.monotonic()
        try:
            yield
        finally:
            self.phase, self._busy_since = "idle", None

    def record_error(self, exc: BaseException) -> None:
        """Publish why this rank is about to stop (read by rank 0's diagnosis)."""
        self.errored = True
        kind = "comm" if is_comm_error(exc) else "fault"
        # The store may be gone with rank 0; the exit code still tells.
        with suppress(Exception):
            self._set(f"err/{self.rank}", f"{kind}|{_summary(exc)} (during {self.phase})")

    def exit_on_signals(self) -> None:
        """A worker (main thread): SIGINT/SIGTERM end this process at once (128 + signum),
        even while the main thread waits inside a collective, where a Python handler would
        not run: the signal number reaches a thread through the wakeup fd. The exit is
        published first, so rank 0 tells a rank stopped from outside (torchrun stopping every
        rank) from one that failed."""
        if self._signals_watched:
            return
        read, write = os.pipe()
        os.set_blocking(write, False)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: self._exit_signalled(signum))
        signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        threading.Thread(target=self._watch_signals, args=(read,), name="tp-signals",
                         daemon=True).start()
        self._signals_watched = True

    def _watch_signals(self, fd: int) -> None:
        while True:
            signum = os.read(fd, 1)[0]
            if signum in (signal.SIGINT, signal.SIGTERM):
                self._exit_signalled(signum)

    def _exit_signalled(self, signum: int) -> None:
        # The handler may run on the main thread while it holds the lock: never wait long.
        if self._lock.acquire(timeout=1.0):
            with suppress(Exception):
                self._store.set(f"err/{self.rank}",
                                f"signal|stopped by {signal.Signals(signum).name}")
            self._lock.release()
        os._exit(128 + signum)

    def abort(self, reason: str) -> None:
        """Tell every worker to exit now (rank 0)."""
        with suppress(Exception):
            self._set("abort", reason)

    def wait_for_all(self, name: str) -> None:
        """A barrier through the store that rank 0 can break off: mark this rank as past
        `name`, then wait for every rank. Rank 0 raises RankFailure as soon as a failure is
        known; workers are stopped by the health thread if rank 0 aborts or vanishes."""
        self._set(f"{name}/{self.rank}", "1")
        keys = [f"{name}/{r}" for r in range(self.world_size)]
        while True:
            if self.rank == 0 and self.failure is not None:
                raise self.failure
            with self._lock:
                if self._store.check(keys):
                    return
            time.sleep(0.02)

    def linger(self) -> None:
        """Rank 0 after a failure, before its exit takes the store with it (outside torchrun
        rank 0 hosts it): give the workers a few heartbeats to read `abort` and exit."""
        deadline = time.monotonic() + 4 * self.interval_s
        while time.monotonic() < deadline:
            with suppress(Exception):
                self._refresh(range(1, self.world_size))
            if all(self._gone(p) for p in self._peers.values()):
                return
            time.sleep(self.interval_s / 4)

    def gone_peers(self) -> list[int]:
        """Rank 0: the workers whose process is known to have exited (same host only)."""
        with suppress(Exception):
            self._refresh(range(1, self.world_size))
        return [r for r, p in sorted(self._peers.items()) if self._gone(p)]

    def verdict_now(self) -> RankFailure | None:
        """Rank 0, told to stop from outside (torchrun sends SIGTERM to every rank once one
        has failed): the failure already known, else a worker seen dead, hung or faulty right
        now (recorded and reported); None when none is."""
        if self.failure is None:
            with suppress(Exception):
                self._refresh(range(1, self.world_size))
                found = self._blame(None, fresh_since=None, signalled=False)
                if found is not None:
                    self._fail(found)
        return self.failure

    def diagnose(self, exc: BaseException) -> RankFailure:
        """Rank 0, after a collective raised `exc`: wait (bounded) until the culprit is known.
        While rank 0 is leaving (Ctrl-C) the workers are stopping too: nobody is blamed."""
        if self.leaving and self.failure is None:
            self.failure = RankFailure(None, self.world_size, "interrupted", stopped=True)
            self.abort(str(self.failure))
        since = time.monotonic()
        deadline = since + self.timeout_s + 2 * self.interval_s
        mine = self.collectives
        while self.failure is None and time.monotonic() < deadline:
            self._refresh(range(1, self.world_size))
            found = self._blame(mine, fresh_since=since)
            if found is not None and HANGS in found.reason:
                # A hang is told by what has not happened; a rank killed a moment ago is
                # still tearing down (not yet a zombie) while its peers' collective fails.
                # Look again once: a rank seen gone by then is the cause.
                time.sleep(self.interval_s)
                self._refresh(range(1, self.world_size))
                found = self._blame(mine, fresh_since=since) or found
            if found is not None:
                self._fail(found)
                break
            time.sleep(self.interval_s / 2)
        if self.failure is None:
            self._fail(self._blame(mine, fresh_since=None) or RankFailure(
                None, self.world_size, f"a collective failed and no rank reported why "
                f"({_summary(exc)})"))
        assert self.failure is not None
        return self.failure

    # Thread ---------------------------------------------------------------------------
    def _set(self, key: str, value: str) -> None:
        with self._lock:
            self._store.set(key, value)

    def _get(self, key: str) -> str | None:
        with self._lock:
            if not self._store.check([key]):
                return None
            return self._store.get(key).decode()

    def _beat(self) -> None:
        self._beats += 1
        self._set(f"hb/{self.rank}", f"{self._beats}|{self.phase}|{self.collectives}")

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._beat()
                self._watch()
            except Exception as exc:  # the store is gone: so is whoever hosted it
                if not self._stop.is_set():
                    self._lost_store(exc)

    def _watch(self) -> None:
        if self.rank != 0:
            self._watch_leader()
            return
        self._refresh(range(1, self.world_size))
        # Rank 0's own error is reported as is; workers that go while it leaves are expected.
        if self.failure is None and not self.errored and not self.leaving:
            # A rank stopped by a signal is left to diagnose(): the same signal may be on its
            # way here (torchrun stopping every rank), which is no failure.
            found = self._blame(None, fresh_since=None, signalled=False) or self._overdue()
            if found is not None and not self._confirmed(found):
                found = None
            if found is not None:
                self._fail(found)
        self._maybe_exit()

    def _confirmed(self, found: RankFailure) -> bool:
        """A worker gone without a word is blamed only once it has stayed so for two
        intervals: torchrun's SIGTERM reaches every rank at once, and a worker that exits
        on it may be seen gone before its "stopped by" lands, or before rank 0 gets its own
        SIGTERM (then nobody failed). Every other verdict stands at once."""
        if found.rank is None or not found.reason.startswith(EXITED):
            return True
        first = self._silent_exit.setdefault(found.rank, time.monotonic())
        return time.monotonic() - first >= 2 * self.interval_s

    def _overdue(self) -> RankFailure | None:
        """Rank 0 busy with no new collective for longer than `collective_timeout_s`.

        gloo raises when a collective times out and `diagnose` names the culprit; NCCL does
        not (its collectives are queued on the GPU and the host waits at the next sync, for
        ever or until NCCL's watchdog aborts the process), so the same diagnosis runs here.
        """
        now, limit = time.monotonic(), self.collective_timeout_s
        if self.collectives != self._progress[0]:
            self._progress = (self.collectives, now)
        if limit is None or self._busy_since is None:
            return None
        if now - max(self._busy_since, self._progress[1]) < limit:
            return None
        return self._blame(self.collectives, fresh_since=None) or RankFailure(
            None, self.world_size, f"{self.phase} has waited {limit:.0f} s for the other ranks "
            "and no rank reported why")

    def _watch_leader(self) -> None:
        reason = self._get("abort")
        if reason is None:
            self._refresh([0])
            if self._stale(self._peers[0]):
                reason = f"rank 0 stopped responding (no heartbeat for {self.timeout_s:.0f} s)"
        if reason is not None:
            self._exit(f"rank {self.rank}: stopping: {reason}")

    def _refresh(self, ranks: range | list[int]) -> None:
        now = time.monotonic()
        for r in ranks:
            peer = self._peers.setdefault(r, _Peer(changed_at=now))
            if not peer.pid and (info := self._get(f"info/{r}")):
                peer.host, pid = info.split(" ")
                peer.pid = int(pid)
            value = self._get(f"hb/{r}")
            if value is not None and value != peer.value:
                peer.value, peer.changed_at = value, now
            if peer.error is None:
                peer.error = self._get(f"err/{r}")

    def _stale(self, peer: _Peer) -> bool:
        return time.monotonic() - peer.changed_at > self.timeout_s

    def _gone(self, peer: _Peer) -> bool:
        return bool(peer.pid) and peer.host == socket.gethostname() and _process_gone(peer.pid)

    def _blame(self, mine: int | None, fresh_since: float | None,
               signalled: bool = True) -> RankFailure | None:
        """The culprit among the workers, from what `_refresh` last read; None if unknown yet.

        mine: rank 0's collective count when its collective failed (None: do not look for
        hangs). fresh_since: only trust a peer's count published after this time (None: the
        final verdict, which also accepts communication errors). signalled: blame a rank that
        was stopped by a signal when no other rank failed (False when rank 0 got one too).
        """
        n, peers = self.world_size, sorted(self._peers.items())
        for r, p in peers:
            if p.error is None and self._gone(p):  # its last word, written as it exited
                p.error = self._get(f"err/{r}")  # after the refresh that found none
            if self._gone(p) and p.error and p.error.startswith("signal|"):
                continue  # stopped from outside: blamed last, if no rank failed on its own
            if self._gone(p):
                if p.error and p.error.startswith("fault|"):
                    return RankFailure(r, n, f"{p.error.split('|', 1)[1]}; then it exited")
                return RankFailure(r, n, f"{EXITED} (pid {p.pid}) exited during {p.phase}")
            if self._stale(p):
                return RankFailure(r, n, f"no heartbeat for {self.timeout_s:.0f} s during "
                                         f"{p.phase}: the process died, hangs or is unreachable")
        for r, p in peers:
            if p.error and p.error.startswith("fault|"):
                return RankFailure(r, n, p.error.split("|", 1)[1])
        if mine is not None:
            for r, p in peers:
                if p.collectives < mine and (fresh_since is None or p.changed_at > fresh_since):
                    return RankFailure(r, n, f"it hangs during {p.phase}: {HANGS}")
        if fresh_since is None and mine is not None:
            for r, p in peers:
                if p.error:
                    return RankFailure(r, n, p.error.split("|", 1)[1])
        for r, p in peers:
            if signalled and p.error and p.error.startswith("signal|"):
                return RankFailure(r, n, f"{p.error.split('|', 1)[1]} (from outside the run)")
        return None

    def fail(self, failure: RankFailure) -> None:
        """Record a failure known on this rank (rank 0: report it and release the workers)."""
        self._fail(failure)

    def _fail(self, failure: RankFailure) -> None:
        if self.failure is not None:
            return
        self.failure, self._failed_at = failure, time.monotonic()
        print(f"[llama.parallel] {failure}", file=sys.stderr, flush=True)
        self.abort(str(failure))

    def _maybe_exit(self) -> None:
        if self._failed_at is None or time.monotonic() - self._failed_at < self.grace_s:
            return
        if self.exit_on_failure or self._busy_since is not None:
            self._exit(f"rank 0: exiting: {self.failure}")

    def _lost_store(self, exc: BaseException) -> None:
        if self.rank != 0:
            self._exit(f"rank {self.rank}: stopping: lost the run's store ({_summary(exc)})")
        if self.failure is None:
            self._fail(RankFailure(None, self.world_size,
                                   f"the run's TCPStore is unreachable ({_summary(exc)})"))
        self._maybe_exit()

    def _exit(self, message: str) -> None:
        print(f"[llama.parallel] {message}", file=sys.stderr, flush=True)
        os._exit(1)
