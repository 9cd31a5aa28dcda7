"""The model: MiniLM written out with explicit tensors, per-head codebooks on the attention
context, the VQ model (the reference every incremental path must equal), the classification head,
model bundles, and the one MAC counter."""
