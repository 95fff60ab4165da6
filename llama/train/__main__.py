"""`python -m llama.train ...`: the training loop (llama/train/loop.py)."""

from llama.train.loop import main

main()
