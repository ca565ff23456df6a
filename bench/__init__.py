"""hydralm benchmarks: scripts that print their figures and end with ratio lines (see bench/README.md)."""
