"""The threat model's cases: the networks, the images, and what a federated client shares (with its defences)."""
