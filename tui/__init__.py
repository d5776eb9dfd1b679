"""gptchat's front ends: the Typer CLI (``cli.py``) and the Textual app."""
