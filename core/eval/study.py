"""A study's folder, read and written without torch: its spec, rows, cells and state.

experiment.py runs studies; this module knows their layout, ``<data>/experiments/NAME/``: ``spec.json``,
``train.txt``, ``heldout.txt``, ``cells/ROW.json`` and ``state.json``, each written whole or not at all.
The chat app's Experiment screen reads studies through it alone, so it draws them before torch is loaded.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from gptchat.core.errors import UsageError
from gptchat.core.model.config import PRESETS
from gptchat.core.outputs import replace_atomic
from gptchat.core.paths import get_paths
from gptchat.core.train.settings import NAME_RE, Settings

STATES = ("running", "finished", "stopped", "failed", "killed")


@dataclass
class Spec:
    name: str
    data: list[str]
    models: list[str] = field(default_factory=lambda: ["gpt2"])
    shots: list[int] = field(default_factory=lambda: [0])
    finetune_steps: int = 0  # 0: no finetuned rows
    lora: bool = False
    from_scratch: str | None = None  # a preset arch for a from-scratch row
    heldout: str | None = None  # a held-out file instead of the split
    heldout_fraction: float = 0.1
    seed: int = 0
    train: dict = field(default_factory=dict)  # more Settings fields for the finetunes (lr, block_size ...)
    device: str | None = None
    dtype: str | None = None

    def check(self) -> None:
        if not NAME_RE.match(self.name):
            raise UsageError(f"--name {self.name!r}: use letters, digits, '.', '_' and '-' (at most 64)")
        if not self.models and not self.from_scratch:
            raise UsageError("nothing to compare: give --models, or --from-scratch ARCH")
        if any(k < 0 for k in self.shots) or self.finetune_steps < 0:
            raise UsageError("--shots and --finetune-steps must be 0 or more")
        if self.from_scratch and self.from_scratch not in PRESETS:
            raise UsageError(f"--from-scratch {self.from_scratch!r}: not an architecture; use one of {', '.join(PRESETS)}")
        if self.from_scratch and not self.finetune_steps:
            raise UsageError("--from-scratch needs --finetune-steps N (the steps to train it for)")
        if not 0 < self.heldout_fraction < 1:
            raise UsageError(f"--heldout-fraction must be between 0 and 1, not {self.heldout_fraction}")
        if self.train:  # the finetunes' settings, checked as `gptchat finetune` would before any folder is made
            Settings(data=["train.txt"], steps=max(self.finetune_steps, 1), **self.train).check()


@dataclass(frozen=True)
class Row:
    id: str  # file-safe: the cell's name
    kind: str  # base | shots | finetuned | scratch
    model: str
    shots: int = 0

    @property
    def label(self) -> str:
        return {"base": self.model, "shots": f"{self.model} +{self.shots} shots",
                "finetuned": f"{self.model} finetuned", "scratch": f"{self.model} from scratch"}[self.kind]


def rows(spec: Spec) -> list[Row]:
    out = []
    for m in spec.models:
        slug = _slug(m)
        out += [Row(f"base-{slug}", "base", m)]
        out += [Row(f"shots{k}-{slug}", "shots", m, k) for k in spec.shots if k > 0]
        if spec.finetune_steps:
            out.append(Row(f"finetuned-{slug}", "finetuned", m))
    if spec.from_scratch:
        out.append(Row(f"scratch-{spec.from_scratch}", "scratch", spec.from_scratch))
    return out


def _slug(spec: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in spec.rstrip("/").split("/")[-1])[:48] or "model"


# -- the folder ---------------------------------------------------------------------------------------


def folder(name: str) -> Path:
    return get_paths().data / "experiments" / name


def write(path: Path, text: str) -> None:
    """Atomically (outputs.replace_atomic): a cell is there whole or not at all, even after a SIGKILL."""
    replace_atomic(path, lambda f: f.write(text.encode("utf-8")))


def split_rule(spec: Spec) -> str:
    if spec.heldout:
        return f"held-out: {spec.heldout}; training: all of {', '.join(spec.data)}"
    return (f"documents shuffled with seed {spec.seed}, the first {spec.heldout_fraction:.0%} held out "
            f"(a single document: its last {spec.heldout_fraction:.0%} of lines instead)")


def load_spec(name: str) -> Spec:
    path = folder(name) / "spec.json"
    if not path.exists():
        raise UsageError(f"no experiment named {name!r} in {path.parent.parent}")
    return Spec(**json.loads(path.read_text()))


def load_cells(root: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((root / "cells").glob("*.json"))}


def set_state(root: Path, state: str, **more) -> None:
    write(root / "state.json", json.dumps({"state": state, "pid": os.getpid(), "t": time.time(), **more}))


def study_state(name: str) -> dict:
    """The study's state.json ({"state": ..., "pid": ..., "row": ...}); "running" whose process is gone
    reads as "killed"; a study without one (never started here) as "unknown"."""
    try:
        st = json.loads((folder(name) / "state.json").read_text())
    except (OSError, ValueError):
        return {"state": "unknown"}
    if st.get("state") == "running" and not _alive(st.get("pid")):
        st["state"] = "killed"
    return st


def _alive(pid) -> bool:
    """Whether process ``pid`` runs (an exited child not yet waited for, a zombie, does not)."""
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, TypeError, ValueError):
        return False
    except PermissionError:  # someone else's
        return True
    stat = Path(f"/proc/{int(pid)}/stat")
    return not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[:1] != ["Z"]


def best(cells: dict[str, dict]) -> str | None:
    return min(cells, key=lambda k: cells[k]["loss"]) if cells else None
