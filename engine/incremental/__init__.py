"""Incremental inference: a document session (text -> tokens -> content-defined chunks ->
activations), the edit tokenizer, exact incremental attention, and the fast mode (stable ids,
held codes and contexts, refresh budgets)."""
