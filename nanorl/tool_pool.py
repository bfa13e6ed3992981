"""Environment steps and tool calls, run concurrently and contained, so one slow or broken one stops nothing.

    run_contained([f, g, ...], timeout) -> [(value, status), ...]   each f() in its own thread, all at once
    pool = ToolPool(dispatch, workers=16, timeout=5.0, limits={"memory_mb": 1024, "cpu_s": 10}, sticky=False)
    pool.call(episode, args) -> (value, status)                     dispatch(*args) in a forked worker

status is "ok", "error" (value: "ExceptionName: message") or "timeout". The rollout steps the environments of
all rows that end a turn at the same decode step through run_contained: a user's `step` that raises or runs
past --env-timeout ends its episode ("env_error") instead of the run. Threads overlap waiting (tool calls,
I/O, a remote environment); a step that computes in Python still takes turns under the GIL. A thread cannot be
killed: one that hangs is left behind (a daemon thread, its environment dropped) and the run goes on without it.

Tools run in a pool of worker processes forked from the trainer (rewards._Worker, the reward sandbox's worker):
up to `workers` calls at once, each with its timeout; a call that runs past it kills its worker and a fresh one
is forked for the next call. Each worker runs under resource limits (resource.setrlimit in the worker: an
address-space cap on top of what the fork maps, a CPU-time cap per call), so a tool that allocates without
bound gets a MemoryError and one that spins is killed by SIGXCPU; both come back as errors. `sticky` routes an
episode's calls to one worker (episode % workers), where its per-episode state lives (env.Tools).

The pool forks its workers from the thread that calls `ensure` (the rollout's, before it starts the step
threads: forking from a thread while others run is what Python warns about); a worker replaced after a
timeout is forked where the call ran.
"""

import queue
import signal
import threading
import time

from nanorl.rewards import _Worker


def run_contained(fns, timeout=None):
    """[(value, status)] of each fn(), run concurrently in daemon threads; timeout: seconds for all of them."""
    out = [(None, "timeout")] * len(fns)
    if len(fns) == 1 and timeout is None:  # nothing to overlap, nothing to bound
        _run_one(fns[0], out, 0)
        return out
    threads = [threading.Thread(target=_run_one, args=(f, out, i), daemon=True) for i, f in enumerate(fns)]
    for t in threads:
        t.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    for t in threads:
        t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
    return list(out)


def _run_one(fn, out, i):
    try:
        out[i] = (fn(), "ok")
    except Exception as e:  # noqa: BLE001  (a user's environment: anything may come out)
        out[i] = (f"{type(e).__name__}: {e}", "error")


class ToolPool:
    """Up to `workers` forked processes running dispatch(*args), one call each at a time (see the module docstring)."""

    def __init__(self, dispatch, workers=16, timeout=5.0, limits=None, sticky=False):
        self.dispatch, self.n, self.timeout = dispatch, max(1, workers), timeout
        self.limits, self.sticky = limits, sticky
        self.workers = [None] * self.n
        self.locks = [threading.Lock() for _ in range(self.n)]
        # last in, first out: calls one after another reuse one worker. A fork keeps the trainer's memory as it
        # was at that moment (copy-on-write), so workers forked at many different training steps would each
        # keep their own copy of the weights and optimizer state (a CPU run ran out of memory that way)
        self.free = queue.LifoQueue()
        for i in reversed(range(self.n)):
            self.free.put(i)

    def ensure(self, k):
        """Fork (now, in this thread) the workers that up to k concurrent calls will need."""
        for i in range(min(k, self.n)):
            self._worker(i)

    def _worker(self, i):
        w = self.workers[i]
        if w is None or not w.proc.is_alive():
            if w is not None:
                w.close()
            w = self.workers[i] = _Worker(self.dispatch, self.limits)
        return w

    def call(self, episode, args, timeout=None):
        """(value, status) of dispatch(*args) in a worker: episode's own one when sticky, else any free one."""
        i = episode % self.n if self.sticky else self.free.get()
        try:
            with self.locks[i]:
                return self._call(i, args, self.timeout if timeout is None else timeout)
        finally:
            if not self.sticky:
                self.free.put(i)

    def _call(self, i, args, timeout):
        w = self._worker(i)
        w.conn.send([(0, args)])
        if w.conn.poll(timeout):
            try:
                _, value, ok = w.conn.recv()
                return value, "ok" if ok else "error"
            except (EOFError, OSError):  # the worker died: a crash, or killed at a resource limit
                w.proc.join(1.0)
                why = {-signal.SIGXCPU: "the CPU-time limit", -signal.SIGKILL: "SIGKILL (out of memory?)"}
                code = w.proc.exitcode
                self.workers[i] = None
                return f"WorkerDied: the process exited ({why.get(code, f'exit code {code}')})", "error"
        w.close()
        self.workers[i] = None
        return None, "timeout"

    def close(self):
        for i, w in enumerate(self.workers):
            if w is not None:
                w.close()
                self.workers[i] = None
