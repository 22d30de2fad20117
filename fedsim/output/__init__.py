"""What a run writes: the trace, the run directory and its status, checkpoints."""
