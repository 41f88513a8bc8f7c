"""Every `Checkpointer` backend (memory, Redis, Arrow, tiered) runs the conformance suite."""

from __future__ import annotations

from conformance import CheckpointerConformance


class TestCheckpointer(CheckpointerConformance):
    """The suite over the `backend` fixture's params (see conftest.py)."""
