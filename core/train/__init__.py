"""Finetuning and pretraining GPT-2: data, loop, evaluation, checkpoints, LoRA, DDP/FSDP, events.

The CLI (``gptchat finetune``) and the TUI drive ``train``; a run lives in a folder under
``get_paths().runs`` and reports through its ``events.jsonl`` (see events.py).
"""

from gptchat.core.train.settings import Settings

__all__ = ["Settings", "train", "list_runs"]


def train(*args, **kwargs):
    from gptchat.core.train.loop import train as _train

    return _train(*args, **kwargs)


def list_runs():
    from gptchat.core.train.runs import list_runs as _list

    return _list()
