"""The process plumbing every stage shares: the command line's shared options (cli), one writer per output (lock),
the progress bar and console (progress), library chatter off (quiet), thread and worker counts (threads), a
task's share of the work (shard), crash-safe checkpoints (checkpoint), per-step seeds (seeds), safetensors-only
weights (weights), how a DataLoader worker hands a batch over (loader), a run's records and the resume comparison
(record), what a cluster asks of a trainer: global batch, SIGTERM, process-group timeout (cluster), and the
trackers (tracking). Imports nothing of common but SegGenError.
"""
