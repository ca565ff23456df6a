"""The command line: the entry point, what it prints, the checks before any work, reports of runs and sweeps, SLURM checks."""
