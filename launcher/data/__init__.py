"""Data: raw sources, formats and chat rendering, preprocessing and its cache, mixtures, packing, preference pairs, loaders."""
