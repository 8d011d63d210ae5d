"""Training: the loop, the distributed engine under it, resumable states and the data order."""
