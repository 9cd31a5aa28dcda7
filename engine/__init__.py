"""engine: pure PyTorch + transformers, no Kafka, no Faust.

What lives here: applying character-level edit ops to text (`text_ops`), loading the bundled
base model and its tokenizer offline (`base_model`), and (see the modules beside these) the
vector-quantized transformer, incremental inference, edit tokenization and MAC counting.
Nothing in engine imports state or pipeline.
"""
