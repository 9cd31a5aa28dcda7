"""pipeline: the streaming service around the engine.

The Faust app and its agent (`app`), event and output records (`records`), configuration
(`settings`), Prometheus metrics (`metrics`), the kafka-python producer helpers (`producer`),
the embedded tansu broker (`broker`), topic creation (`topics`), the demo (`demo`) and the
`incstream` command line (`cli`). pipeline imports state and engine, never the reverse.
"""
