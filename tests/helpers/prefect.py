"""What a flow run left in the Prefect API (the test harness's server), read back."""

from __future__ import annotations

from typing import Any


def run_artifact(key: str, flow_run_id: Any) -> Any:
    """The flow run's one artifact `key` (its `.type` and `.data`)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key]),
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    assert len(found) == 1, found
    return found[0]
