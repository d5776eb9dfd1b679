"""Run folders: naming, the one-writer lock, atomic checkpoints, and the list `gptchat runs` shows.

A run folder (``get_paths().runs/NAME``)::

    run.json        settings and resolved numbers (what --resume uses)
    status.json     state, pid, step, best val loss (see events.py)
    events.jsonl    the event stream
    ckpt-00000500/  a complete checkpoint: HF files + gptchat.json + trainer.pt + DONE
    last -> ckpt-00000500     symlinks, swapped atomically with os.replace
    best -> ckpt-00000400

A checkpoint is written into ``.ckpt-N.tmp/``, every file fsynced, DONE written last, and the folder
renamed into place; only then does the ``last``/``best`` link move. A kill at any moment leaves the
previous links pointing at complete checkpoints; leftovers are removed by the next save.

A run folder appears only once the run is known to start (base model loaded, data read, plan
checked): it is built as ``.NAME.new-PID/`` beside it, run.json written and the lock taken there, and
renamed into place. A folder without run.json (left by an older version, or by hand) never blocks
the name: the next run of that name replaces it, saying so.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

from gptchat.core.errors import TrainError
from gptchat.core.paths import private_dir
from gptchat.core.train.events import read_events, write_json

CKPT_RE = re.compile(r"^ckpt-(\d{8})$")


def runs_root() -> Path:
    from gptchat.core.paths import get_paths

    return get_paths().runs


def default_name(data: list[str]) -> str:
    stem = Path(data[0]).expanduser().resolve().stem if data else "run"
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.") or "run"
    root = runs_root()
    name, n = stem[:48], 2
    while (root / name).exists() and not is_leftover(root / name):
        name, n = f"{stem[:48]}-{n}", n + 1
    return name


def is_leftover(folder: Path) -> bool:
    """A folder no run owns: no run.json, no checkpoint, no trainer holding its lock (a failed start)."""
    return (folder.is_dir() and not (folder / "run.json").exists() and link_target(folder, "last") is None
            and not is_locked(folder))


def _exists_error(name: str) -> TrainError:
    return TrainError(f"a run named {name!r} exists already; continue it with --resume {name} or pick another --name")


def check_free(name: str) -> bool:
    """Refuse a name a run already has; True when a leftover folder will be replaced."""
    folder = runs_root() / name
    if not (folder.exists() or folder.is_symlink()):
        return False
    if is_leftover(folder):
        return True
    raise _exists_error(name)


def create_run(name: str, run_json: dict) -> tuple[Path, "RunLock"]:
    """The run folder with its run.json, locked, appearing at once (built beside it, then renamed)."""
    root = private_dir(runs_root())
    folder = root / name
    tmp = root / f".{name}.new-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o700)
    lock = None
    try:
        save_run_json(tmp, run_json)
        lock = RunLock(tmp).acquire()
        if check_free(name):
            shutil.rmtree(folder)
        try:
            os.rename(tmp, folder)  # fails on a folder that is not empty: another run took the name
        except OSError:
            raise _exists_error(name) from None
    except BaseException:
        if lock is not None:
            lock.release()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    lock.path = folder / ".lock"  # the flock stays on the file; only its path changed
    return folder, lock


def find_run(name: str) -> Path:
    folder = runs_root() / name
    if not (folder / "run.json").is_file():
        raise TrainError(f"no run named {name!r} in {runs_root()}; `gptchat runs` lists the runs")
    return folder


class RunLock:
    """An exclusive flock on ``.lock`` held for the whole run: one trainer per run folder."""

    def __init__(self, folder: Path):
        self.path = folder / ".lock"
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            pid = _status(self.path.parent).get("pid", "?")
            raise TrainError(f"run {self.path.parent.name!r} is already running (pid {pid})") from None
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def is_locked(folder: Path) -> bool:
    import fcntl

    try:
        fd = os.open(folder / ".lock", os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


# -- checkpoints -------------------------------------------------------------------------------


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(run: Path, step: int, write_files, links: list[str]) -> Path:
    """Write a checkpoint for ``step`` with ``write_files(folder)`` and point ``links`` at it."""
    final = run / f"ckpt-{step:08d}"
    if not (final / "DONE").exists():
        tmp = run / f".ckpt-{step:08d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)  # a folder without DONE is garbage by definition
        tmp.mkdir()
        write_files(tmp)
        delay = float(os.environ.get("GPTCHAT_TRAIN_SAVE_DELAY", "0") or 0)  # tests: widen the kill window
        if delay:
            time.sleep(delay)
        for f in tmp.iterdir():
            _fsync(f)
        (tmp / "DONE").write_text(f"{step}\n")
        _fsync(tmp / "DONE")
        _fsync(tmp)
        os.rename(tmp, final)
        _fsync(run)
    for link in links:
        tmp_link = run / f".{link}.tmp"
        if tmp_link.is_symlink() or tmp_link.exists():
            tmp_link.unlink()
        os.symlink(final.name, tmp_link)
        os.replace(tmp_link, run / link)
    _fsync(run)
    prune(run)
    return final


def link_target(run: Path, link: str) -> Path | None:
    p = run / link
    if not p.is_symlink():
        return None
    target = run / os.readlink(p)
    return target if (target / "DONE").exists() else None


def prune(run: Path) -> None:
    """Remove checkpoints no link points to and leftovers of interrupted writes."""
    keep = {t.name for t in (link_target(run, "last"), link_target(run, "best")) if t is not None}
    for p in run.iterdir():
        if (CKPT_RE.match(p.name) and p.name not in keep) or (p.name.startswith(".ckpt-") and p.name.endswith(".tmp")):
            shutil.rmtree(p, ignore_errors=True)
    last, best = link_target(run, "last"), link_target(run, "best")
    if best is not None and last is not None and best != last and (best / "trainer.pt").exists():
        (best / "trainer.pt").unlink()  # resume reads last; best only needs the model


# -- listing -----------------------------------------------------------------------------------


def _status(folder: Path) -> dict:
    """status.json as a dict; a missing one is a new run, a corrupt one (not a JSON object) is listed as unreadable."""
    try:
        st = json.loads((folder / "status.json").read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        st = None
    return st if isinstance(st, dict) else {"state": "unreadable"}


def last_step(folder: Path) -> int:
    """The step a resume continues from: the ``last`` checkpoint's (0 when there is none)."""
    last = link_target(folder, "last")
    try:
        return int((last / "DONE").read_text()) if last is not None else 0
    except (OSError, ValueError):
        return 0


def run_info(folder: Path) -> dict:
    st = _status(folder)
    broken = False
    try:
        meta = json.loads((folder / "run.json").read_text())
    except OSError:
        meta = {}
    except ValueError:  # hand-edited or damaged: --resume refuses it, so the listing says so
        meta, broken = {}, True
    if not isinstance(meta, dict):
        meta, broken = {}, True
    state = st.get("state", "new")
    if state == "running" and not is_locked(folder):
        state = "dead"  # the trainer process is gone without writing its final state
    if broken and state != "running":
        state = "broken"
    best = link_target(folder, "best")
    last = link_target(folder, "last")
    settings = meta.get("settings", {})
    saved = last_step(folder)
    return {
        "name": folder.name,
        "state": state,
        # a live run shows where it is; any other the step --resume continues from (its last checkpoint)
        "step": st.get("step") if state == "running" else saved,
        "saved_step": saved,
        "steps": st.get("steps") or meta.get("resolved", {}).get("steps"),
        "best_val_loss": st.get("best_val_loss"),
        "base": "?" if broken else "scratch:" + (settings.get("arch") or "tiny") if settings.get("from_scratch")
        else (settings.get("model") or "gpt2"),
        "lora": bool(settings.get("lora")),
        "pid": st.get("pid"),
        "updated": st.get("updated"),
        "path": str(folder),
        "best": str(best) if best else None,
        "last": str(last) if last else None,
    }


def list_runs() -> list[dict]:
    root = runs_root()
    if not root.is_dir():
        return []
    out = [run_info(p) for p in sorted(root.iterdir())
           if p.is_dir() and not p.name.startswith(".") and (p / "run.json").is_file()]
    out.sort(key=lambda r: r.get("updated") or 0, reverse=True)
    return out


def save_run_json(folder: Path, obj: dict) -> None:
    write_json(folder / "run.json", obj)


def load_run_json(folder: Path) -> dict:
    try:
        return json.loads((folder / "run.json").read_text())
    except (OSError, ValueError) as e:
        raise TrainError(f"{folder / 'run.json'} is unreadable ({e}); the run cannot be resumed") from None


__all__ = ["read_events", "create_run", "check_free", "last_step", "find_run", "RunLock", "write_checkpoint", "link_target", "list_runs", "run_info"]
