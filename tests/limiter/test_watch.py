"""ReserveAhead: how many of a key's requests may reserve before their limit decision."""

from __future__ import annotations

from gateway.limiter import Decision, Limit, decide
from gateway.limiter.watch import ReserveAhead


def _allowed(room: int, remaining: int | None = None) -> Decision:
    own = room if remaining is None else remaining
    return Decision(True, 60, own, 1.0, 0.0 if room else 1.0, room=room)


def _refused() -> Decision:
    return Decision(False, 60, 0, 1.0, 2.0, retry_after=2.0, rejected_limit=60)


def test_a_new_key_sends_one_request_ahead_then_waits_for_its_decision() -> None:
    ahead = ReserveAhead()
    assert ahead.take("k")
    assert not ahead.take("k")  # its first decision is still out
    ahead.saw("k", _allowed(3))
    assert [ahead.take("k") for _ in range(5)] == [True, True, True, False, False]


def test_no_room_means_decide_first() -> None:
    ahead = ReserveAhead()
    ahead.saw("refused", _refused())
    ahead.saw("team_spent", _allowed(0, remaining=40))  # the key has room, its team none
    ahead.saw("last_token", _allowed(0))
    for key in ("refused", "team_spent", "last_token"):
        assert not ahead.take(key), key


def test_room_comes_back_with_a_decision_that_reports_it() -> None:
    ahead = ReserveAhead()
    ahead.saw("k", _refused())
    assert not ahead.take("k")
    ahead.saw("k", _allowed(1))
    assert ahead.take("k")
    assert not ahead.take("k")


def test_only_the_most_recently_decided_keys_are_kept() -> None:
    ahead = ReserveAhead(capacity=2)
    ahead.saw("a", _refused())
    ahead.saw("b", _refused())
    ahead.saw("a", _refused())  # a is now the most recent
    ahead.saw("c", _refused())  # b, the least recent, goes
    assert len(ahead) == 2
    assert not ahead.take("a") and not ahead.take("c")
    assert ahead.take("b")  # forgotten: seen anew, one request ahead


def test_a_team_with_less_room_than_its_key_bounds_what_goes_ahead() -> None:
    # The key may send 60 a minute, its team 100, of which 2 are left: after this
    # request one more fits, whatever the key's own bucket says.
    key = Limit("k:a", 60, 60)
    team = Limit("t:acme", 100, 100)
    now = 1000.0
    team_tat = now + team.capacity - 2 * team.interval  # two tokens left
    decision, _ = decide([key, team], [None, team_tat], now)
    assert decision.allowed and decision.remaining == 59 and decision.room == 1
    ahead = ReserveAhead()
    ahead.saw("a", decision)
    assert [ahead.take("a") for _ in range(3)] == [True, False, False]
