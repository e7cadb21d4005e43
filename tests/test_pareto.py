"""The Pareto front of points to minimize (``prunesearch.pareto``), on hand-made numbers."""

from prunesearch.pareto import dominates, non_dominated


def test_only_the_non_dominated_points_are_on_the_front():
    # (PPL, latency ms): a dominated by b in both, c dominated in one and tied in the other, d and e trade off
    points = [(12.0, 40.0), (11.0, 35.0), (11.0, 36.0), (10.0, 50.0), (14.0, 20.0), (15.0, 25.0)]
    assert non_dominated(points) == [False, True, False, True, True, False]


def test_equal_points_do_not_dominate_each_other_and_one_point_is_its_own_front():
    assert not dominates((1.0, 2.0), (1.0, 2.0)) and dominates((1.0, 2.0), (1.0, 3.0))
    assert non_dominated([(1.0, 2.0), (1.0, 2.0), (2.0, 3.0)]) == [True, True, False]
    assert non_dominated([(5.0, 5.0)]) == [True] and non_dominated([]) == []
