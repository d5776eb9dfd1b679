"""`gptchat paths`."""

from __future__ import annotations

from gptchat.tui.cli.common import JsonOpt, print_json


def paths(json_out: JsonOpt = False) -> None:
    """Print where gptchat keeps its config, data, history and caches.

    GPTCHAT_HOME moves all of them; HF_HOME / HF_HUB_CACHE move the Hugging Face cache.
    """
    from gptchat.core.paths import get_paths

    d = get_paths().as_dict()
    if json_out:
        print_json(d)
        return
    width = max(map(len, d))
    for k, v in d.items():
        print(f"{k:<{width}}  {v}")
