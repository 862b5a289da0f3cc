"""The lock-free histogram exports exactly what prometheus_client's own Histogram would."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from mcp_orchestrator.metrics import STAGE_BUCKETS, EventLoopHistogram

_values = st.lists(
    st.one_of(
        st.floats(min_value=0, max_value=100, allow_nan=False),
        st.sampled_from(STAGE_BUCKETS),  # exactly on a bound: counted in that bucket ("le")
    ),
    max_size=60,
)


def _samples(registry: CollectorRegistry) -> list[str]:
    """The exposition lines, without comments and the reference's `_created` sample."""
    return sorted(
        line
        for line in generate_latest(registry).decode().splitlines()
        if line and not line.startswith("#") and "_created" not in line
    )


@given(st.dictionaries(st.sampled_from(["rag", "inference", "stream"]), _values, max_size=3))
def test_the_export_matches_prometheus_clients_histogram(observed: dict[str, list[float]]) -> None:
    reference_registry, ours_registry = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("h_seconds", "doc", ["stage"], buckets=STAGE_BUCKETS, registry=reference_registry)
    ours = EventLoopHistogram("h_seconds", "doc", STAGE_BUCKETS, ["stage"])
    ours_registry.register(ours)
    for stage, values in observed.items():
        reference_series, our_series = reference.labels(stage), ours.labels(stage)
        for value in values:
            reference_series.observe(value)
            our_series.observe(value)
    assert _samples(ours_registry) == _samples(reference_registry)


def test_bad_buckets_and_labels_are_refused() -> None:
    with pytest.raises(ValueError, match="increasing"):
        EventLoopHistogram("h", "doc", [0.1, 0.05])
    histogram = EventLoopHistogram("h", "doc", [0.1], ["stage"])
    with pytest.raises(ValueError, match="expected labels"):
        histogram.labels()
