"""The model and its decoding: the fusion, the reasoners, FlyThinker, and the loops that decode it."""
