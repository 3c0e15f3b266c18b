"""Linear algebra with no network in sight: least squares with an honest rank, sparse factorisations, memory."""
