"""The process plumbing every stage shares: the command line's shared options (cli), one writer per output (lock),
the progress bar and console (progress), library chatter off (quiet), thread and worker counts (threads), this
process's slice of the work (shard), crash-safe checkpoints (checkpoint), per-step seeds (seeds), safetensors-only
weights (weights) and how a DataLoader worker hands a batch over (loader). Imports nothing of common but SegGenError.
"""
