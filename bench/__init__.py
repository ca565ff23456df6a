"""hydralm benchmarks: scripts that print their figures and end with ratio lines (see README)."""
