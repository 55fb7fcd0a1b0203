"""The instance state machine: only legal transitions, each recorded."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.exceptions import LifecycleError
from corral.lifecycle import TRANSITIONS, Lifecycle, State, Transition


def test_happy_path_and_history() -> None:
    seen: list[Transition] = []
    life = Lifecycle("api-0", "api", seen.append)
    path = [State.PLACED, State.STARTING, State.RUNNING, State.HEALTHY, State.UNHEALTHY, State.HEALTHY,
            State.STOPPING, State.STOPPED]
    for s in path:
        life.to(s, f"to {s}")
    assert [t.new for t in seen] == path
    assert [t.old for t in seen] == [State.PENDING, *path[:-1]]
    assert seen[3].reason == "to healthy" and seen[3].instance == "api-0" and seen[3].service == "api"
    assert all(a.at <= b.at for a, b in itertools.pairwise(seen))


@pytest.mark.parametrize(("start", "bad"), [
    (State.PENDING, State.RUNNING), (State.STOPPED, State.HEALTHY), (State.STOPPING, State.RUNNING),
    (State.COMPLETED, State.HEALTHY), (State.RESTARTING, State.RUNNING),
])
def test_illegal_transitions_raise(start: State, bad: State) -> None:
    seen: list[Transition] = []
    life = Lifecycle("x-0", "x", seen.append)
    life.state = start
    with pytest.raises(LifecycleError, match=f"illegal transition {start.value} -> {bad.value}"):
        life.to(bad, "bug")
    assert life.state is start and seen == []


def test_every_state_is_reachable_from_pending_and_can_end_stopped() -> None:
    reach = {State.PENDING}
    frontier = [State.PENDING]
    while frontier:
        for nxt in TRANSITIONS[frontier.pop()]:
            if nxt not in reach:
                reach.add(nxt)
                frontier.append(nxt)
    assert reach == set(State)
    # From anywhere, stopped is reachable (down must always be possible).
    for s in State:
        seen, todo = {s}, [s]
        while todo:
            for nxt in TRANSITIONS[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        assert State.STOPPED in seen or s is State.STOPPED, s


@given(st.lists(st.sampled_from(list(State)), max_size=60))
def test_random_sequences_follow_the_table(targets: list[State]) -> None:
    log: list[Transition] = []
    life = Lifecycle("p-0", "p", log.append)
    for target in targets:
        before = life.state
        legal = target in TRANSITIONS[before]
        try:
            life.to(target)
        except LifecycleError:
            assert not legal
            assert life.state is before
        else:
            assert legal
            assert life.state is target
    # The log is a chain from pending through legal steps only.
    state = State.PENDING
    for t in log:
        assert t.old is state and t.new in TRANSITIONS[t.old]
        state = t.new
    assert state is life.state
