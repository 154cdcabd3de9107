"""A scaling policy for fixed-size clusters, unpickled by the Ray Train controller (so a module
without torch, like dltrain.rayenv)."""

from __future__ import annotations

from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy


# Ray 2.60's FixedScalingPolicy sends each run's resource request to an autoscaling coordinator
# actor, started on demand and waited for (up to 5 s) before the workers may start. Only a
# cluster autoscaler reads those requests; on the local Ray a stage starts for itself there is
# none, so this policy, otherwise the same, sends none and that actor is never started.
class StaticScalingPolicy(FixedScalingPolicy):
    """A FixedScalingPolicy that never talks to the autoscaling coordinator."""

    def after_controller_start(self, train_run_context) -> None:
        self._requester_id = f"train-{train_run_context.run_id}"

    def _maybe_send_resource_request(self) -> None:
        pass

    def _send_resource_request(self) -> None:
        pass

    def _cancel_resource_request(self) -> None:
        pass
