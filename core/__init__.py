"""gptchat's engine: GPT-2 model, checkpoints, tokenizer, sampling and generation.

Nothing in this package imports Textual, Typer or Rich; heavy modules (torch) are imported
by the submodules that need them, so ``import gptchat.core`` itself is cheap.
"""
