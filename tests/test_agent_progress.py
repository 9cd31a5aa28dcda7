"""AgentProgress: what /live says about the agent (pipeline.web_surface)."""

from __future__ import annotations

import time

from incstream.pipeline.web_surface import AgentProgress

STALL_S = 0.2


def test_an_event_held_too_long_is_a_stall_and_finishing_it_clears_it():
    progress = AgentProgress(STALL_S)
    progress.took_event()
    assert progress.stall(ready=True) is None
    time.sleep(STALL_S * 1.5)
    assert "one event in hand" in progress.stall(ready=True)
    assert "one event in hand" in progress.stall(ready=False)  # also while rebalancing
    progress.finished_event()
    assert progress.stall(ready=True) is None


def test_waiting_events_none_taken_is_a_stall_only_when_ready():
    progress = AgentProgress(STALL_S)
    time.sleep(STALL_S * 1.5)
    assert progress.stall(ready=True) is None  # idle with nothing waiting: fine
    progress.events_waiting = True
    assert "events wait" in progress.stall(ready=True)
    assert progress.stall(ready=False) is None  # recovering: not the agent's fault
    progress.became_ready()
    assert progress.stall(ready=True) is None
    time.sleep(STALL_S * 1.5)
    assert "events wait" in progress.stall(ready=True)
