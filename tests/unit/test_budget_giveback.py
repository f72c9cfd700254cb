"""The accuracy budget's give-back on a stand-in evaluation (no builds): the last round is bisected for the fewest
moves that still meet the budget, then single moves are given back, and the record ends with what is built."""

from edgeexport import budget


def _search(needed, moves, start, tries=8):
    """Budget (cosine >= 0.99) met iff every tensor in ``needed`` is int16; each evaluation is one 'rebuild'."""
    calls = []

    def evaluate(excl, wide, keep):
        calls.append(list(wide))
        return (0.995 if set(needed) <= set(wide) else 0.9), None

    excl, wide = budget._apply([], [], moves)
    steps = [{"step": 0, "float_nodes": [], "int16_tensors": wide[:start], "value": 0.9, "met": False},
             {"step": 1, "float_nodes": excl, "int16_tensors": wide, "value": 0.995, "met": True}]
    kept_moves, left, kept = budget._trim_last_round(steps, moves, start, [], [], evaluate, "cosine", 0.99, tries,
                                                     lambda _m: None)
    excl, wide = budget._apply([], [], kept_moves)
    excl, wide = budget._give_back(steps, kept_moves, excl, wide, kept, evaluate, "cosine", 0.99, left,
                                   lambda _m: None)
    return wide, calls, steps


def test_the_last_round_is_bisected_then_single_moves_are_given_back():
    moves = [("int16", f"t{i}") for i in range(16)]
    # rounds of 1, 2, 4 fell short; the round of 8 (t7..t14) met it; only t0 and t9 are needed
    wide, calls, steps = _search(["t0", "t9"], moves[:15], start=7, tries=16)
    assert wide == ["t0", "t9"]
    assert len(calls) == 3 + 9 and steps[-1]["met"] and steps[-1]["int16_tensors"] == ["t0", "t9"]
    # with the default 8 rebuilds: 3 bisect the round of 8, 5 give single moves back; never short of the budget
    wide, calls, steps = _search(["t0", "t9"], moves[:15], start=7)
    assert len(calls) == 8 and {"t0", "t9"} <= set(wide) and len(wide) == 5 and steps[-1]["met"]
    # the bisection alone took 3 rebuilds for 8 moves (one per move before)
    assert sum(1 for s in steps if isinstance(s.get("give_back"), dict) and "last_moves" in s["give_back"]) == 3


def test_when_every_move_of_the_last_round_is_needed_the_record_still_ends_with_the_mix_built():
    moves = [("int16", f"t{i}") for i in range(3)]
    wide, calls, steps = _search(["t0", "t1", "t2"], moves, start=1)
    assert wide == ["t0", "t1", "t2"] and steps[-1]["met"] and steps[-1]["int16_tensors"] == wide
    assert steps[-1]["value"] == 0.995


def test_float_moves_are_given_back_as_groups():
    moves = [("int16", "a"), ("float", ["n1", "n2"]), ("float", ["n3"])]
    excl, wide = budget._apply(["user"], [], moves)
    assert excl == ["user", "n1", "n2", "n3"] and wide == ["a"]
