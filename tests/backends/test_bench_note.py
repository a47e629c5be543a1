"""`minisparse bench` explains a measured speed-up above the ideal one (issue 14 item 5)."""
from __future__ import annotations

from minisparse.cli.bench import above_ideal_note


def test_note_only_above_the_ideal_and_it_names_the_causes():
    dense = dict(method="numpy dense (BLAS)", time_s=0.03, speedup=1.0, ideal=1.0, t_p25=0.028, t_p75=0.041)
    assert above_ideal_note(dict(method="numba skip", speedup=2.20, ideal=2.50), dense) == ""
    assert above_ideal_note(dict(method="numba skip", speedup=2.53, ideal=2.50), dense) == ""   # within 2%
    note = above_ideal_note(dict(method="numba skip", speedup=2.80, ideal=2.50), dense)
    assert "2.80x is above its ideal 2.50x" in note
    assert "dense baseline ran slower" in note and "noisy" in note and "28-41 ms" in note
