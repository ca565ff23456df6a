"""The run skeleton and what it drives: the step loop, optimizer and schedules, checkpoints, export, metrics, loggers, stop signals."""
