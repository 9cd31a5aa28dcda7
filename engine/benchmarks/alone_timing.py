"""Seconds per edit of the engine and of the chunk cache, each replaying a document ALONE.

The engine bench times every edit interleaved: engine, chunk cache, full dense re-run and a
fresh float64 reference build, one after the other, so that machine noise hits them all. But
that also runs ~100 MB of other models' weights through the CPU caches between two engine
updates, and an engine update is small enough (a few rows per matmul) to be bound by reading
its weights: interleaved, it always starts cold. A worker runs one model, event after event.
This pass replays a document once more with the engine alone, then the chunk cache alone on the
same token ids and chunks, which is how each would run in a service. (The fast and exact modes
are deterministic, so edit i here is edit i of the interleaved replay.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from incstream.engine.benchmarks.peers import ChunkCacheVariant, chunk_cache_variants
from incstream.engine.incremental.chunks import ChunkPolicy
from incstream.engine.incremental.fast_mode import FastModeConfig
from incstream.engine.incremental.session import DocumentSession
from incstream.engine.model.macs import MacCounter
from incstream.engine.model.vq_model import VQModel


def time_alone(model: VQModel, tokenizer, snapshot: str, events: Sequence[dict],
               policy: ChunkPolicy, mode: str | FastModeConfig,
               peers: Sequence[ChunkCacheVariant] | None = None,
               ) -> tuple[list[float | None], list[list[float | None]]]:
    """(engine seconds per event, and per chunk cache variant its seconds per event); None
    for snapshots and edits that change no token."""
    session = DocumentSession(model, tokenizer, snapshot, policy, mode=mode)
    layouts: list[tuple[torch.Tensor, list[int]]] = [
        (torch.tensor(session.tokens.ids, dtype=torch.int32), list(session.chunk_lengths))]
    engine: list[float | None] = []
    for event in events:
        if "snapshot" in event:
            session = DocumentSession(model, tokenizer, event["snapshot"], policy, mode=mode)
            engine.append(None)
        else:
            report = session.apply_ops(event["ops"])
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            engine.append(report.seconds if report.macs["total"] else None)
        layouts.append((torch.tensor(session.tokens.ids, dtype=torch.int32),
                        list(session.chunk_lengths)))
    cache_seconds = []
    for variant in peers if peers is not None else chunk_cache_variants(model.device):
        cache = variant.cache(model, session.cls_id, session.sep_id)
        seconds: list[float | None] = []
        for i, layout in enumerate(layouts):
            ids, lengths = layout
            spent, _ = cache.update(ids.tolist(), lengths, MacCounter())
            if i:  # layouts[0] fills the cache with the snapshot's chunks
                seconds.append(spent if engine[i - 1] is not None else None)
        cache_seconds.append(seconds)
    return engine, cache_seconds
