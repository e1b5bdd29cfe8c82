"""Champion history: which recorded moves really happened, the champion stack they replay into, and
what a rollback goes back to (errors checked against a real temporary MLflow registry)."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from tuneflow.history import HISTORY_TAG, Move, applied_moves, champion_stack, read_history, rollback_target
from tuneflow.registry import decide
from tuneflow.registry_base import RegistryError

NAME = "hist-clf"


def move(seq: int, action: str, src: str | None, dst: str) -> Move:
    by = "gate" if action == "gate" else "cli"
    return Move(seq, f"2026-01-0{seq}T00:00:00+00:00", action, by, "someone", src, dst, f"move {seq}")


# gate v1, gate v2, a promotion to v3 whose alias update was interrupted (the next move still starts
# from v2), a promotion to v4, a rollback to v2.
MOVES = [
    move(1, "gate", None, "1"),
    move(2, "gate", "1", "2"),
    move(3, "promote", "2", "3"),
    move(4, "promote", "2", "4"),
    move(5, "rollback", "4", "2"),
]


def test_a_move_is_applied_when_the_next_one_starts_from_its_target():
    marked = applied_moves(MOVES, current="2")
    assert [m.applied for m in marked] == [True, True, False, True, True]
    assert [(m.seq, m.from_version, m.to_version, m.reason) for m in marked] == [
        (m.seq, m.from_version, m.to_version, m.reason) for m in MOVES
    ]
    # The last move is judged against the current champion: interrupted if the alias is elsewhere.
    assert [m.applied for m in applied_moves(MOVES, current="4")][-1] is False
    assert applied_moves([], current="1") == []


def test_the_champion_stack_replays_promotions_and_rollbacks_and_skips_interrupted_moves():
    marked = applied_moves(MOVES, current="2")
    assert champion_stack(marked) == ["1", "2"]  # v3 never was champion; the rollback popped v4
    assert champion_stack(marked[:4]) == ["1", "2", "4"]
    # Taken at face value, the interrupted move would have made v3 champion in between.
    assert champion_stack(MOVES[:3]) == ["1", "2", "3"]
    # History that starts while a champion already existed keeps that champion underneath.
    assert champion_stack([move(1, "promote", "7", "8")]) == ["7", "8"]
    assert champion_stack([]) == []


def test_rollback_target_is_the_champion_before_the_current_one(workdir, register_tiny):
    register_tiny(NAME, decide("macro_f1", 0.6, None, None, 0.0))
    register_tiny(NAME, decide("macro_f1", 0.9, 0.6, "1", 0.0))
    assert rollback_target(NAME) == ("2", "1")


def test_rollback_target_errors_name_the_fix(workdir, register_tiny):
    # Registered but never promoted (its champion could not be re-scored): no champion.
    register_tiny(NAME, decide("macro_f1", 0.6, None, "9", 0.0))
    with pytest.raises(RegistryError, match="has no champion") as err:
        rollback_target(NAME)
    assert f"tuneflow promote {NAME} VERSION" in str(err.value)

    # The first recorded champion has nothing before it.
    register_tiny(NAME, decide("macro_f1", 0.7, None, None, 0.0))
    with pytest.raises(RegistryError, match="first recorded champion") as err:
        rollback_target(NAME)
    assert "Fix:" in str(err.value)

    # The alias moved by hand, outside tuneflow: the history cannot say what came before.
    client = MlflowClient()
    client.set_registered_model_alias(NAME, "champion", "1")
    with pytest.raises(RegistryError, match="moved outside tuneflow"):
        rollback_target(NAME)

    # A champion set before tuneflow recorded moves.
    for key in [k for k in client.get_registered_model(NAME).tags if k.startswith(HISTORY_TAG)]:
        client.delete_registered_model_tag(NAME, key)
    assert read_history(NAME) == []
    with pytest.raises(RegistryError, match="no promotion history"):
        rollback_target(NAME)


def test_two_runs_scored_against_v1_the_later_one_does_not_replace_the_first_ones_promotion(workdir, register_tiny):
    from tuneflow.history import ChampionChanged, promote_by_gate, record_refused_promotion

    register_tiny(NAME, decide("macro_f1", 0.6, None, None, 0.0))  # v1 champion
    run_a = decide("macro_f1", 0.9, 0.6, "1", 0.0)  # both runs compared their model with v1 ...
    run_b = decide("macro_f1", 0.8, 0.6, "1", 0.0)
    register_tiny(NAME, run_a)  # ... A registers v2 and promotes it
    v3 = register_tiny(NAME, _no_promote(run_b))
    with pytest.raises(ChampionChanged, match="not v1"):
        promote_by_gate(NAME, "3", run_b, "run-b")  # B beat v1, not v2: refused
    client = MlflowClient()
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "2"
    assert [m.to_version for m in read_history(NAME)] == ["1", "2"]  # the refusal moved and recorded nothing
    record_refused_promotion(NAME, str(v3.version), "champion changed")
    refused = client.get_model_version(NAME, "3")
    assert refused.tags["tuneflow.decision"] == "rejected" and "Promotion refused" in refused.description


def test_a_rollback_during_a_run_is_not_undone_by_its_promotion(workdir, register_tiny):
    from tuneflow.history import ChampionChanged, move_champion, promote_by_gate

    register_tiny(NAME, decide("macro_f1", 0.6, None, None, 0.0))
    register_tiny(NAME, decide("macro_f1", 0.9, 0.6, "1", 0.0))  # v2 champion
    running = decide("macro_f1", 0.95, 0.9, "2", 0.0)  # a run scores its model against v2 ...
    register_tiny(NAME, _no_promote(running))  # v3
    move_champion(NAME, "1", "rollback", "cli", "ops", "bad v2")  # ... while someone rolls back to v1
    with pytest.raises(ChampionChanged):
        promote_by_gate(NAME, "3", running, "run")
    assert str(MlflowClient().get_model_version_by_alias(NAME, "champion").version) == "1"


def test_history_entries_stay_unique_under_concurrent_moves(workdir, register_tiny):
    from concurrent.futures import ThreadPoolExecutor

    from tuneflow.history import ANY, move_champion

    for i in range(4):
        register_tiny(NAME, _no_promote(decide("macro_f1", 0.5 + i / 10, None, None, 0.0)))
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda v: move_champion(NAME, str(v), "promote", "cli", f"t{v}", "race", ANY), range(1, 5)))
    moves = read_history(NAME)
    assert sorted(m.to_version for m in moves) == ["1", "2", "3", "4"]  # no entry overwrote another
    assert sorted(m.seq for m in moves) == [1, 2, 3, 4]
    # each move started from the champion the previous one set: the history replays to the real champion
    assert champion_stack(moves)[-1] == str(MlflowClient().get_model_version_by_alias(NAME, "champion").version)


def _no_promote(decision):
    from dataclasses import replace

    return replace(decision, promote=False)


def test_a_champion_lock_held_too_long_is_a_clear_refusal_with_exit_2(workdir, register_tiny, monkeypatch, capsys):
    import tuneflow.history as history
    from tuneflow.cli import main
    from tuneflow.files import file_lock
    from tuneflow.history import ChampionLocked, champion_lock_path, move_champion

    register_tiny(NAME, decide("macro_f1", 0.6, None, None, 0.0))
    register_tiny(NAME, decide("macro_f1", 0.9, 0.6, "1", 0.0))  # v2 champion
    lock = champion_lock_path(NAME)
    with file_lock(lock, what="a test"):  # another champion move on this machine, stuck
        with pytest.raises(ChampionLocked) as err:
            move_champion(NAME, "1", "promote", "cli", "me", "try", lock_timeout_s=0.3)
        message = str(err.value)
        assert str(lock) in message and "nothing was moved" in message and "Fix:" in message
        assert "pid " in message  # what holds it: the holder wrote its process into the lock file
        monkeypatch.setattr(history, "CHAMPION_LOCK_TIMEOUT_S", 0.3)
        assert main(["rollback", NAME]) == 2
    err_text = capsys.readouterr().err
    assert "Traceback" not in err_text and str(lock) in err_text and "Fix:" in err_text
    assert str(MlflowClient().get_model_version_by_alias(NAME, "champion").version) == "2"
    assert move_champion(NAME, "1", "rollback", "cli", "me", "lock free again").to_version == "1"


def test_a_hand_edited_history_tag_that_is_not_json_is_shown_unreadable_and_moves_keep_working(
    workdir, register_tiny, capsys
):
    from tuneflow.cli import main
    from tuneflow.history import move_champion
    from tuneflow.review import history_rows, rollback

    register_tiny(NAME, decide("macro_f1", 0.6, None, None, 0.0))
    register_tiny(NAME, decide("macro_f1", 0.9, 0.6, "1", 0.0))  # v2 champion
    register_tiny(NAME, _no_promote(decide("macro_f1", 0.95, 0.9, "2", 0.0)))  # v3 challenger
    client = MlflowClient()
    bad = f"{HISTORY_TAG}000003.handedit"
    client.set_registered_model_tag(NAME, bad, "v2 is champion now (edited by hand)")  # not JSON

    rows = history_rows(NAME)
    assert [r["move"] for r in rows[:2]] == ["v- -> v1", "v1 -> v2"]
    assert "UNREADABLE" in rows[2]["action"] and bad in rows[2]["reason"]
    assert main(["models", NAME, "--history"]) == 0
    assert bad in capsys.readouterr().out

    # The entry sits where no move happened (the entries around it connect): rollback works and says it skipped it.
    move = rollback(NAME, "v2 misfires")
    assert move.to_version == "1" and bad in move.reason and "skipped" in move.reason
    # promotions still number their entries past it
    later = move_champion(NAME, "3", "promote", "cli", "me", "reviewed", expected="1")
    assert later.seq == 5 and [m.to_version for m in read_history(NAME)] == ["1", "2", "1", "3"]


def test_rollback_refuses_when_an_unreadable_history_entry_hides_a_move(workdir, register_tiny, capsys):
    from tuneflow.cli import main

    register_tiny(NAME, decide("macro_f1", 0.6, None, None, 0.0))
    register_tiny(NAME, decide("macro_f1", 0.9, 0.6, "1", 0.0))
    register_tiny(NAME, decide("macro_f1", 0.95, 0.9, "2", 0.0))  # v3 champion, entry 3 records 2 -> 3
    client = MlflowClient()
    third = next(k for k in client.get_registered_model(NAME).tags if k.startswith(f"{HISTORY_TAG}000003."))
    client.set_registered_model_tag(NAME, third, "{oops")  # the record of the move to v3, garbled by hand
    assert main(["rollback", NAME]) == 2
    err = capsys.readouterr().err
    assert third in err and "unreadable" in err and "Fix:" in err and "Traceback" not in err
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "3"
