"""Writing files the user names (``-o out.jsonl``) without ever losing what they held.

Three rules, one home (every command that writes a user-named file uses them):

- ``check_target``: refuse, before anything loads, a target that can never be written: a folder, a
  path under a file, a path under /proc or another read-only place, or one of the command's own
  input files (compared by inode, so a symlink or a relative spelling of the input is caught too).
- ``OutputLock``: one writer per output at a time. A lock file beside the target (``NAME.lock``) is
  held with an advisory lock for the whole job; a second writer is refused in one line, and a
  writer that dies releases it with its process, so a stale file never blocks anyone.
- ``replace_atomic``: the new content goes to a temporary name beside the target, is synced, and
  replaces the target with ``os.replace`` in one step, so the target holds either its old bytes or
  the whole new content, never a truncated mix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

from gptchat.core.errors import OutputError, UsageError

try:  # POSIX advisory locks; Windows locks a byte of the file instead
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None
    import msvcrt


def check_target(path: str | os.PathLike, *, inputs: Iterable[str | os.PathLike | None] = (), flag: str = "-o") -> Path:
    """The path to write (a symlink's target) if a file can be written there, else UsageError in one line."""
    path = Path(path).expanduser()
    if str(path) in ("", "-"):
        raise UsageError(f"{flag}: give a file name (leave {flag} out to write to stdout)")
    if path.is_dir():
        raise UsageError(f"{flag} {path}: is a folder; give a file name inside it")
    for src in inputs:
        if src is not None and str(src) != "-" and _same_file(path, Path(src).expanduser()):
            raise UsageError(f"{flag} {path} is the input file {src}; the results would replace it: "
                             f"write them to another file")
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UsageError(f"{flag} {path}: {blocker} is a file, not a folder")
    folder = next(p for p in (*path.parents, Path(".")) if p.exists())
    if not os.access(folder, os.W_OK | os.X_OK) or _virtual(folder):
        raise UsageError(f"{flag} {path}: cannot write in {folder} (no permission or a read-only place)")
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"{flag} {path}: the file is read-only")
    return _followed(path)


def _followed(path: Path) -> Path:
    """A symlink's target: the new content must land where the link points, not replace the link."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _virtual(folder: Path) -> bool:
    """/proc and /sys take no new files even for root, whatever os.access says."""
    real = folder.resolve()
    return any(real == Path(v) or Path(v) in real.parents for v in ("/proc", "/sys"))


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


class OutputLock:
    """Hold ``NAME.lock`` beside ``path`` for as long as the job writes ``path`` (a context manager).

    Refuses (OutputError) when another process holds it. The file is removed on release; a process
    that got the lock on a file removed meanwhile takes it again on the new file (the usual
    lock-then-check-inode dance), so two writers can never both hold it.
    """

    def __init__(self, path: str | os.PathLike, what: str = "gptchat"):
        self.path = Path(path)
        self.file = lock_path(self.path)
        self.what = what
        self.fd: int | None = None

    def __enter__(self) -> "OutputLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            while self.fd is None:
                fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
                if not _try_lock(fd):
                    holder = _read_pid(fd)
                    os.close(fd)
                    raise OutputError(
                        f"{self.path} is being written by another {self.what}{holder}; wait for it to end or "
                        f"choose another output file (if no such process runs, delete {self.file})")
                if _same_inode(fd, self.file):
                    self.fd = fd
                else:  # released and removed by its last holder between our open and our lock
                    os.close(fd)
            os.ftruncate(self.fd, 0)
            os.write(self.fd, f"{os.getpid()}\n".encode())
        except OSError as e:
            self._close()
            raise OutputError(f"cannot write {self.path}: {e.strerror or e}") from None
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            try:
                self.file.unlink(missing_ok=True)  # before the unlock: no one can lock a file on its way out
            except OSError:
                pass
        self._close()

    def _close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the lock
            self.fd = None


def _try_lock(fd: int) -> bool:
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:  # pragma: no cover - Windows
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return True
    except OSError:
        return False


def _same_inode(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _read_pid(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode().strip() if hasattr(os, "pread") else ""
    except (OSError, UnicodeDecodeError):
        pid = ""
    return f" (pid {pid})" if pid.isdigit() else ""


def replace_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Give ``path`` the bytes ``write(f)`` writes, in one step; on any failure ``path`` is untouched.

    A new file gets the usual permissions (the umask's); an existing one keeps its own.
    """
    path = _followed(Path(path))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        mode = os.stat(path).st_mode & 0o777 if path.exists() else None
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
