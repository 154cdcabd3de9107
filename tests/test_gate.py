"""The champion gate as pure functions: one decision, a run of registrations resolved in version
order, and the alias history's records and table."""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict

import pytest

from dltrain.registry import history
from dltrain.registry.gate import CHALLENGER, CHAMPION, Member, Score, decide, resolve
from dltrain.registry.promotion import previous_champion

SHA = "a" * 64


@pytest.mark.parametrize(("accuracy", "champion", "min_improvement", "promote", "why"), [
    (0.90, None, 0.0, True, "no champion yet"),
    (0.91, Score(1, 0.90), 0.0, True, "beats champion version 1 (0.9000)"),
    (0.90, Score(1, 0.90), 0.0, True, "beats"),  # a tie is not worse
    (0.89, Score(1, 0.90), 0.0, False, "does not beat champion version 1"),
    (0.905, Score(1, 0.90), 0.01, False, "does not beat"),
    (0.91, Score(1, 0.90), 0.01, True, "beats"),
    # The champion re-scored on the candidate's test set: that score decides, not its own.
    (0.50, Score(1, 0.95, rescored=True, own_accuracy=0.99), 0.0, False,
     "0.9500, re-scored on the current test set; 0.9900 on its own"),
    (0.96, Score(1, 0.95, rescored=True, own_accuracy=0.99), 0.0, True, "re-scored"),
    # A champion that could not be scored blocks the promotion: never a silent one.
    (0.99, Score(1, None, rescored=True, error="model.safetensors not found"), 0.0, False,
     "could not be scored on this version's test set (model.safetensors not found): challenger"),
])
def test_decide(accuracy: float, champion: Score | None, min_improvement: float, promote: bool,
                why: str) -> None:
    decision = decide(accuracy, champion, min_improvement)
    assert decision.promote is promote
    assert why in decision.reason


def test_an_unscorable_champion_is_replaced_only_when_asked_and_it_says_so() -> None:
    gone = Score(3, None, rescored=True, error="version 3 no longer exists")
    decision = decide(0.5, gone, 0.0, promote_unloadable=True)
    assert decision.promote
    assert "version 3 no longer exists" in decision.reason
    assert "--if-champion-unloadable promote" in decision.reason


def _member(version: int, accuracy: float, base: int | None = None,
            base_accuracy: float | None = None, weights: str | None = None,
            min_improvement: float = 0.0) -> Member:
    base_score = None if base is None else Score(base, base_accuracy)
    return Member(version, accuracy, SHA, weights or f"w{version}", min_improvement, base,
                  base_score)


def _recorded(scores: dict[int, float]):
    """The scorer callback over fixed scores, counting its calls."""
    calls: list[tuple[int, int]] = []

    def score(champion: int, member: Member) -> Score:
        calls.append((champion, member.version))
        return Score(champion, scores[champion])

    return score, calls


def test_two_registrations_against_no_champion_end_the_same_in_either_order() -> None:
    """Both read "no champion" (they raced): the better one is champion, the other challenger,
    whichever got the lower version number."""
    for better, worse in ((1, 2), (2, 1)):
        accuracy = {better: 0.801, worse: 0.757}
        score, _ = _recorded(accuracy)
        members = [_member(n, accuracy[n]) for n in (1, 2)]
        result = resolve(None, None, members, score)
        assert (result.champion, result.challenger) == (better, worse)


def test_a_member_gated_against_another_champion_is_compared_with_the_fold_s() -> None:
    """Version 3 was gated against champion 1, but version 2 (a racing registration) beat 1
    first: 3 is compared with 2, through the scorer, and its recorded base is not used."""
    score, calls = _recorded({1: 0.80, 2: 0.90})
    members = [_member(2, 0.90, base=1, base_accuracy=0.80),
               _member(3, 0.85, base=1, base_accuracy=0.80)]
    result = resolve(1, None, members, score)
    assert (result.champion, result.challenger) == (2, 3)
    assert calls == [(2, 3)]  # the recorded score of 1 served version 2
    assert result.step_for(3).champion == Score(2, 0.90)
    assert "does not beat champion version 2" in result.step_for(3).reason


def test_the_order_of_the_listing_does_not_matter() -> None:
    accuracy = {4: 0.82, 5: 0.70, 6: 0.88, 7: 0.86}
    members = [_member(n, a, base=3, base_accuracy=0.80) for n, a in accuracy.items()]
    results = set()
    for order in itertools.permutations(members):
        score, _ = _recorded({3: 0.80, **accuracy})
        result = resolve(3, None, order, score)
        results.add((result.champion, result.challenger))
    assert results == {(6, 7)}


def test_the_same_weights_twice_get_one_alias() -> None:
    score, _ = _recorded({})
    members = [_member(1, 0.9, weights="same"), _member(2, 0.9, weights="same")]
    result = resolve(None, None, members, score)
    assert (result.champion, result.challenger) == (1, None)
    assert result.step_for(2).alias is None and "same weights as version 1" in \
        result.step_for(2).reason


def test_min_improvement_is_each_member_s_own() -> None:
    score, _ = _recorded({1: 0.90})
    strict = _member(2, 0.905, base=1, base_accuracy=0.90, min_improvement=0.01)
    lax = _member(3, 0.905, base=1, base_accuracy=0.90, min_improvement=0.0)
    assert resolve(1, None, [strict], score).champion == 1
    assert resolve(1, None, [lax], score).champion == 3


def test_history_entries_round_trip_and_sort_by_time(monkeypatch) -> None:
    monkeypatch.setenv(history.FLOW_RUN_ID_ENV, "0f1e2d3c-flow")
    written: dict[str, dict[str, str]] = {}  # version -> its tags

    class Client:
        def set_model_version_tag(self, name, version, key, value):
            written.setdefault(version, {})[key] = value

        def delete_model_version_tag(self, name, version, key):
            del written[version][key]

    first = history.Entry.now(alias=CHAMPION, from_version=None, to_version=1,
                              action="register", reason="no champion yet",
                              candidate_accuracy=0.9)
    second = history.Entry.now(alias=CHALLENGER, from_version=None, to_version=2,
                               action="register", reason="does not beat", candidate_accuracy=0.8,
                               champion_accuracy=0.9, test_sha256=SHA, git_commit="abc")
    removed = history.Entry.now(alias=CHALLENGER, from_version=2, to_version=None,
                                action="reconcile", reason="settled")
    keys = [history.record(Client(), "m", entry) for entry in (first, second, removed)]
    # Each on the version it concerns: moved to, or left when the alias goes.
    assert sorted(written) == ["1", "2"] and len(written["2"]) == 2
    assert all(k.startswith(history.HISTORY_PREFIX) for tags in written.values() for k in tags)

    class Version:
        def __init__(self, number: str, tags: dict[str, str]) -> None:
            self.version, self.tags = number, tags

    versions = [Version(n, {**tags, "other": "x"}) for n, tags in sorted(written.items())]
    assert history.entries({}, versions) == [first, second, removed]
    assert json.loads(written["1"][keys[0]])["flow_run_id"] == "0f1e2d3c-flow"
    # An older registry's entries (registered-model tags) interleave by time with the versions'.
    legacy = history.Entry("2000-01-01T00:00:00.000Z", CHAMPION, None, 7, "register", "old")
    older = {f"{history.HISTORY_PREFIX}{1:019d}.00000000": json.dumps(asdict(legacy)),
             history.HISTORY_PREFIX + "x": "not json", "other": "y"}
    found, unreadable = history.read(older, versions)
    assert found == [legacy, first, second, removed]
    assert [(u.key, u.version) for u in unreadable] == [(history.HISTORY_PREFIX + "x", None)]
    history.erase(Client(), "m", removed, keys[2])
    assert keys[2] not in written["2"] and keys[1] in written["2"]
    with pytest.raises(ValueError, match="not a move"):
        history.version_of(history.Entry("t", CHAMPION, None, None, "register", "r"))
    assert asdict(first)["time"].endswith("Z")

    lines = history.table([first, second]).splitlines()
    assert lines[0].split()[:4] == ["time", "alias", "move", "action"]
    assert "- -> 1" in lines[1] and lines[1].endswith("no champion yet")
    assert "0.8000" in lines[2] and "0.9000" in lines[2] and "0f1e2d3c" in lines[2]


def test_previous_champion_is_the_one_the_current_replaced_last() -> None:
    def entry(alias, before, after, action="register"):
        return history.Entry("t", alias, before, after, action, "r")

    entries = [entry(CHAMPION, None, 1), entry(CHAMPION, 1, 2), entry(CHALLENGER, None, 1),
               entry(CHAMPION, 2, 3), entry(CHAMPION, 3, 2, "rollback")]
    assert previous_champion(entries, 2) == 3  # a second rollback undoes the first
    assert previous_champion(entries, 3) == 2
    assert previous_champion(entries, 1) is None  # the first champion replaced none
    # A version made champion only by a rollback goes back to the one it replaced.
    assert previous_champion([*entries, entry(CHAMPION, 2, 1, "rollback")], 1) == 2
