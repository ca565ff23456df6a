"""hydralm config tree (a package so Hydra finds it wherever hydralm is installed)."""
