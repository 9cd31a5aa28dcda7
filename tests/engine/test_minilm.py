"""Our nanoGPT-style MiniLM equals transformers' BertModel; MAC counting is consistent."""

from __future__ import annotations

import torch

from incstream.engine.model.base_model import base_model_path
from incstream.engine.model.macs import MacCounter, dense_chunk_macs
from incstream.engine.model.minilm import forward_dense


def test_dense_original_matches_transformers(model, tokenizer):
    from transformers import BertModel

    hf = BertModel.from_pretrained(str(base_model_path()), local_files_only=True).eval()
    text = "Incremental inference keeps a classifier current while a PEP is being edited."
    enc = tokenizer(text, return_tensors="pt")
    ids = enc["input_ids"][0]
    with torch.no_grad():
        ref = hf(**enc).last_hidden_state[0]
    ours = forward_dense(model.original, ids, torch.arange(len(ids)))
    assert torch.allclose(ours, ref, atol=1e-4), float((ours - ref).abs().max())
    # Non-canonical position ids are honoured the same way.
    pos = torch.arange(len(ids))
    pos[2] = 1  # a duplicate id
    pos[5:] += 3  # and a gap, as stable positions produce
    with torch.no_grad():
        ref_pos = hf(input_ids=enc["input_ids"], position_ids=pos[None]).last_hidden_state[0]
    assert torch.allclose(forward_dense(model.original, ids, pos), ref_pos, atol=1e-4)


def test_vq_forward_is_close_to_original_in_float64(model, tokenizer):
    """Sanity: the VQ model is a perturbation of the original (PTQ codebooks: not equal)."""
    ids = torch.tensor(tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"])
    pos = torch.arange(len(ids))
    vq = model.forward(ids, pos).pooled
    dense = forward_dense(model.original, ids, pos).mean(0).double()
    assert torch.nn.functional.cosine_similarity(vq, dense, dim=0) > 0.5


def test_mac_counter_matches_analytic_formula(model):
    ids = torch.randint(1000, 2000, (37,))
    pos = torch.arange(37)
    dense = MacCounter()
    forward_dense(model.original, ids, pos, dense)
    assert dense.total == dense_chunk_macs(37)
    vq = MacCounter()
    model.forward(ids, pos, vq)
    assert vq.total == dense_chunk_macs(37, codes=model.k)
    assert vq.adds == 6 * 37 * 12 * 384  # lookup rows summed, reported as adds, not MACs
