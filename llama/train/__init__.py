"""Training the shipped tinychat model from scratch (not needed to run the playground).

loop.py (`python -m llama.train`: AdamW, schedule, evaluation, export), state.py (resumable
checkpoints), plot.py (loss curves), data.py (corpus reading and the token streams),
tokenizer.py (`python -m llama.train.tokenizer`: SentencePiece training), teacher.py
(`python -m llama.train.teacher`: stories sampled from a teacher model).
"""
