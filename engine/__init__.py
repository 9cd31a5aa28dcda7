"""engine: pure PyTorch + transformers, no Kafka, no Faust.

What lives here, one concept per module:
- text_ops: doc-edit/v1 character ops applied to text; base_model: the bundled encoder, offline;
- minilm: MiniLM/BERT written out with explicit tensors (the dense ORIGINAL model, float32);
- codebooks, calibrate: per-layer, per-head codebooks on attention contexts and their k-means
  calibration (shipped in bundles/calibrated-minilm, never made at run time);
- vq_model: the VQ model and its dense forward, THE REFERENCE (float64); head: pooling + head;
- incremental_attention: the exact incremental update of one block;
- chunks: content-defined chunking of long documents (canonical positions per chunk);
- edit_tokenizer: character edits -> minimal token edits by windowed re-tokenization;
- session: a document's incremental inference state; macs: the one MAC counter;
- bench: `incstream bench engine`; device: CUDA when available, CPU otherwise;
- labelled_datasets, train, evaluate, model_bundle: the trained VQ classifiers and their bundles.
Nothing in engine imports state or pipeline.
"""
