"""Atomic writes: a file or a directory either appears complete or not at all.

Everything nanorl writes to disk (the HF-format policy, the training state, metrics summaries) goes
through these helpers, so a crash, a kill -9 or a full disk never leaves a half-written file that a
later run would mistake for a good one. The trick is the usual one: write into a temporary sibling in
the same directory (same filesystem), fsync, then `os.replace` it into place, which POSIX makes atomic.
"""

import contextlib
import os
import shutil
import tempfile


def _fsync_dir(path):
    # the rename itself lives in the parent directory's metadata: flush it too
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path, mode="w"):
    """Open a temporary file next to `path`; on clean exit it replaces `path` atomically."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path):
    """Yield a temporary directory next to `path`; on clean exit it becomes `path`.

    An existing `path` is replaced. Directories cannot be renamed over non-empty ones, so the old
    one is first moved aside and deleted after the new one is in place; readers that must never see
    `path` missing (checkpoints) use versioned names instead, see `TrainState`.
    """
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
    try:
        yield tmp
        for name in os.listdir(tmp):  # make the contents durable before they become visible
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=".old-" + os.path.basename(path) + "-", dir=parent)
            os.replace(path, os.path.join(old, "x"))
        os.replace(tmp, path)
        _fsync_dir(parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
