"""Task functions: each receives the composed config (see conf/task/)."""
