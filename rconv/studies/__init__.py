"""The experiments: loops that make the tidy tables, the baselines, the mini-batch study, where tasks run."""
