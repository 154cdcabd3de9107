"""The champion gate as pure functions of recorded scores: which alias a registered version earns,
and how a run of registrations resolves. No MLflow here (dltrain.registry.promotion applies it).

The rule, for a version whose test accuracy is `a`, measured on test set T:
- no champion yet: it becomes `champion`;
- else the champion's accuracy `b` on the same T (recorded when the champion was measured on T,
  else re-scored on T by the register stage): `champion` when a - b >= min_improvement (the
  champion it displaces becomes `challenger`), otherwise `challenger`;
- a champion that could not be scored on T blocks the promotion (`challenger`), unless the
  registration asked to promote over it (`--if-champion-unloadable promote`): never silently.

`resolve` applies the rule to versions in version-number order, starting from the champion and
challenger that were settled before them. Version numbers are handed out by the registry, so
the result depends on the set of versions and their recorded scores only, not on the order in
which concurrent registrations happened to run or write.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

CHAMPION = "champion"
CHALLENGER = "challenger"
# Accuracies are fractions of whole samples; a tolerance keeps `>=` exact in intent.
EPS = 1e-12


@dataclass(frozen=True)
class Score:
    """A champion's accuracy on a candidate's test set."""

    version: int
    accuracy: float | None  # None: it could not be scored on that test set (see `error`)
    rescored: bool = False  # measured now, on a test set other than its own
    own_accuracy: float | None = None  # as recorded on its own test set
    error: str | None = None

    def describe(self) -> str:
        """`0.9512` or `0.9512, re-scored on the current test set; 0.9630 on its own`."""
        text = f"{self.accuracy:.4f}"
        if self.rescored:
            own = "" if self.own_accuracy is None else f"; {self.own_accuracy:.4f} on its own"
            text += f", re-scored on the current test set{own}"
        return text


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def decide(accuracy: float, champion: Score | None, min_improvement: float, *,
           promote_unloadable: bool = False) -> Decision:
    """The gate for one version against the current champion (None: there is none)."""
    if champion is None:
        return Decision(True, "no champion yet: the first model that passes min_accuracy "
                              "becomes champion")
    version = champion.version
    if champion.accuracy is None:
        why = (f"champion version {version} could not be scored on this version's test set "
               f"({champion.error})")
        if promote_unloadable:
            return Decision(True, f"{why}; promoted as asked (--if-champion-unloadable promote)")
        return Decision(False, f"{why}: challenger")
    if accuracy - champion.accuracy + EPS >= min_improvement:
        return Decision(True, f"test accuracy {accuracy:.4f} beats champion version {version} "
                              f"({champion.describe()}) by >= min_improvement {min_improvement}")
    return Decision(False, f"test accuracy {accuracy:.4f} does not beat champion version "
                           f"{version} ({champion.describe()}) by min_improvement "
                           f"{min_improvement}: challenger")


@dataclass(frozen=True)
class Member:
    """A registered version as the gate sees it: its recorded score and, from its registration,
    the champion it was compared with then (`base`, None when there was none) and that
    champion's score on its test set (`base_score`)."""

    version: int
    accuracy: float
    test_sha256: str
    weights_sha256: str
    min_improvement: float
    base: int | None = None
    base_score: Score | None = None
    promote_unloadable: bool = False


@dataclass(frozen=True)
class Step:
    """What the gate made of one member: its alias (None for a duplicate of an earlier
    member's weights), why, and the champion score it was compared with."""

    member: Member
    alias: str | None
    reason: str
    champion: Score | None


@dataclass(frozen=True)
class Resolution:
    """Where the aliases end, and for each alias the step that last moved it (absent: it is
    where the settled state had it)."""

    champion: int | None
    challenger: int | None
    steps: tuple[Step, ...]
    moved_by: dict[str, Step]

    def step_for(self, version: int) -> Step | None:
        return next((s for s in self.steps if s.member.version == version), None)

    def aliases_of(self, version: int) -> list[str]:
        return [alias for alias, holder in ((CHAMPION, self.champion),
                                            (CHALLENGER, self.challenger)) if holder == version]


def resolve(champion: int | None, challenger: int | None, members: Iterable[Member],
            score: Callable[[int, Member], Score]) -> Resolution:
    """Gate `members` one by one in version order, starting from the settled `champion` and
    `challenger`. A member that wins becomes champion and the champion it displaced becomes
    challenger; a member that loses becomes challenger. So after each step the two aliases
    hold the two models of the latest comparison, and two versions registered against no
    champion (or the same one they both beat) end the same way in either order.

    `score(champion, member)` gives a champion's score on the member's test set when the
    member's registration did not record it (it was gated against another champion, which
    happens only when registrations raced or one was interrupted)."""
    steps: list[Step] = []
    moved_by: dict[str, Step] = {}
    seen: dict[str, int] = {}
    for member in sorted(members, key=lambda m: m.version):
        if member.weights_sha256 in seen:
            steps.append(Step(member, None, f"the same weights as version "
                                            f"{seen[member.weights_sha256]}: no alias", None))
            continue
        seen[member.weights_sha256] = member.version
        if champion is None:
            current = None
        elif champion == member.base and member.base_score is not None:
            current = member.base_score
        else:
            current = score(champion, member)
        decision = decide(member.accuracy, current, member.min_improvement,
                          promote_unloadable=member.promote_unloadable)
        step = Step(member, CHAMPION if decision.promote else CHALLENGER, decision.reason,
                    current)
        steps.append(step)
        if decision.promote:
            if champion is not None:
                challenger = champion
                moved_by[CHALLENGER] = step
            champion = member.version
            moved_by[CHAMPION] = step
        else:
            challenger = member.version
            moved_by[CHALLENGER] = step
    return Resolution(champion, challenger, tuple(steps), moved_by)
