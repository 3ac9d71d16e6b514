"""Building blocks shared by every family: norms, rotary embeddings, MLPs."""
