"""Near-duplicate removal: MinHash signatures, LSH banding with verification, connected components."""
