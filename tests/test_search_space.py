"""Budget projection, N:M snapping, heuristic seeds and the budget-neutral evolution: exact budgets."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_model
from pruners.registry import layout
from search.seeds import atp, heuristic_seeds, owl, uniform
from search.space import Space, make_space, parse_budget, parse_budget_range


def _space(sizes, target, low, high) -> Space:
    n = len(sizes)
    return Space(tuple(str(i) for i in range(n)), np.asarray(sizes, dtype=np.float64), target, low, high,
                 tuple((str(i),) for i in range(n)), tuple(range(n)))


def _draw_space(data, n: int, max_size: int) -> Space:
    """A random feasible space: n unit sizes up to ``max_size``, bounds, and a target inside them."""
    sizes = data.draw(st.lists(st.integers(1, max_size), min_size=n, max_size=n))
    low = data.draw(st.floats(0.0, 0.6))
    high = data.draw(st.floats(low, 0.99))
    return _space(sizes, data.draw(st.floats(low, high)), low, high)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), n=st.integers(1, 40))
def test_projection_meets_the_budget_exactly_inside_the_bounds(data, n):
    space = _draw_space(data, n, 10**7)
    low, high, target = space.low, space.high, space.target
    x = np.array(data.draw(st.lists(st.floats(-1.0, 2.0), min_size=n, max_size=n)))
    s = space.project(x)
    assert np.all(s >= low) and np.all(s <= high)
    assert abs(space.mean(s) - target) < 1e-9
    s2 = space.project(s)
    np.testing.assert_allclose(s2, s, atol=1e-9)  # an allocation on the budget is a fixed point


def test_projection_preserves_order_and_rejects_infeasible_budgets():
    space = _space([10, 10, 10, 10], 0.5, 0.3, 0.8)
    s = space.project(np.array([0.1, 0.4, 0.6, 0.9]))
    assert list(np.argsort(s)) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="infeasible"):
        _space([1, 1], 0.9, 0.0, 0.8)


def test_snap_to_nm_levels_keeps_the_budget_for_equal_blocks():
    space = _space([100] * 6, 0.5, 0.25, 0.75)
    snapped = space.snap(space.project(np.array([0.3, 0.7, 0.45, 0.55, 0.5, 0.5])), 4)
    assert np.allclose(snapped * 4, np.round(snapped * 4))
    assert space.mean(snapped) == pytest.approx(0.5)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), n=st.integers(1, 30))
def test_level_snapping_lands_on_the_grid_and_keeps_the_budget_exactly(data, n):
    space = _draw_space(data, n, 10**6)
    low, high, target = space.low, space.high, space.target
    step = data.draw(st.sampled_from([0.01, 0.025, 0.05]))
    x = np.array(data.draw(st.lists(st.floats(0.0, 1.0), min_size=n, max_size=n)))
    s = space.snap_levels(space.project(x), step)
    delta = space.level_steps(step)
    k = (s - target) / delta
    np.testing.assert_allclose(k, np.round(k), atol=1e-6)  # on the grid
    assert round(k.sum()) == 0  # level indices balance: exactly the budget's pruned-weight count
    assert abs(space.mean(s) - target) < 1e-9
    assert np.all(s >= low - 1e-9) and np.all(s <= high + 1e-9)
    kmin, kmax = space.level_range(step)
    assert all(len(lv) == b - a + 1 for lv, a, b in zip(space.levels(step), kmin, kmax))


def test_seeds_are_labelled_on_budget_and_shaped_as_the_heuristics_say():
    lay = layout(tiny_model("llama", layers=6))
    space = make_space(lay, 0.7, 0.5, 0.9)
    ratios = [1.0, 5.0, 2.0, 2.0, 3.0, 1.0]
    seeds = heuristic_seeds(space, ratios)
    assert set(seeds) == {"uniform", "owl", "atp-0.1", "atp-0.2", "atp-0.3", "atp-0.4", "atp-0.5"}
    for alloc in seeds.values():
        assert space.mean(alloc) == pytest.approx(0.7, abs=1e-9)
    np.testing.assert_allclose(uniform(space), 0.7)
    o = owl(space, ratios)
    assert o.max() - o.min() == pytest.approx(0.16)  # rescaled to [0, 2λ]
    assert np.argmin(o) == 1 and o[0] == o.max()  # most outliers → least pruned
    a = atp(space, 0.2)
    assert np.all(np.diff(a) > 0) and a[-1] - a[0] == pytest.approx(0.2)


def test_projection_granularity_gives_each_projection_its_block_seed():
    lay = layout(tiny_model("llama", layers=3))
    space = make_space(lay, 0.6, 0.3, 0.9, granularity="projection")
    assert space.dim == 21 and space.units[0] == "model.layers.0.self_attn.q_proj"
    s = atp(space, 0.2)
    assert space.mean(s) == pytest.approx(0.6, abs=1e-9)
    assert len({round(v, 9) for v in s[:7]}) == 1  # one value per block before projection onto bounds


def test_budget_parsing():
    model = tiny_model("llama")
    lay = layout(model)
    total = sum(p.numel() for p in model.parameters())
    prunable = sum(lay.numel(n) for n in lay.projection_names())
    assert parse_budget("sparsity=0.7", lay, total)[2] == 0.7
    kind, count, target = parse_budget(f"params={total - prunable // 2}", lay, total)
    assert kind == "params" and target == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown budget kind"):
        parse_budget("energy=1e9", lay, total)
    with pytest.raises(ValueError, match="--space width"):  # unstructured sparsity changes no dense FLOPs
        parse_budget("flops=1e9", lay, total)
    with pytest.raises(ValueError, match="infeasible"):
        parse_budget("params=10", lay, total)
    assert parse_budget_range("sparsity=0.7", lay, total) == ("sparsity", "0.7", (0.7, 0.7))
    assert parse_budget_range("sparsity=0.8:0.6", lay, total)[2] == (0.6, 0.8)
    kind, _, (low, high) = parse_budget_range(f"params={total - prunable // 4}:{total - prunable // 2}", lay, total)
    assert kind == "params" and (low, high) == (pytest.approx(0.25), pytest.approx(0.5))  # more params, less sparse
    for bad in ("sparsity=0.5:", "sparsity=0.5:0.6:0.7", "sparsity=0.5:0.5", "0.5:0.7"):
        with pytest.raises(ValueError, match="budget"):
            parse_budget_range(bad, lay, total)


def test_evolution_moves_are_budget_neutral():
    import optuna

    from search.samplers import BudgetNeutralEvolution, param_name

    space = _space([3, 5, 7, 11], 0.6, 0.3, 0.9)
    sampler = BudgetNeutralEvolution(space, seed=0)
    study = optuna.create_study(sampler=sampler)

    def objective(trial):
        x = np.array([trial.suggest_float(param_name(u), 0.3, 0.9) for u in space.units])
        if trial.number == 0:
            x = uniform(space)
        trial.set_user_attr("allocation", x.tolist())
        assert space.mean(x) == pytest.approx(0.6, abs=1e-9)
        return float(np.sum((x - np.array([0.4, 0.5, 0.7, 0.65])) ** 2))

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(objective, n_trials=60)
    assert study.trials[0].value == pytest.approx(0.0625)
    assert study.best_value < 0.005  # evolution improves on the uniform start while every child stays on budget


def test_depth_waves_bend_whole_blocks_and_wave_children_stay_on_budget():
    from search.samplers import BudgetNeutralEvolution, depth_waves

    blocks = tuple(b for b in range(6) for _ in range(3))  # 6 blocks of 3 projections each
    sizes = np.array([4, 1, 2] * 6, dtype=np.float64)
    space = Space(tuple(f"{b}.{i}" for b in range(6) for i in range(3)), sizes, 0.6, 0.25, 0.95,
                  tuple((f"{b}.{i}",) for b in range(6) for i in range(3)), blocks)
    waves = depth_waves(space, np.random.default_rng(0), 50, 0.05)
    assert waves.shape == (50, 18)
    per_block = waves.reshape(50, 6, 3)
    np.testing.assert_allclose(per_block, per_block[:, :, :1].repeat(3, axis=2))  # a block moves as one
    assert np.all(np.ptp(waves, axis=1) > 1e-4)  # and the blocks do not all move alike
    evo = BudgetNeutralEvolution(space, seed=0, wave=1.0)
    parent = uniform(space)
    for _ in range(20):
        child = evo._mutate(parent)
        assert space.mean(child) == pytest.approx(0.6, abs=1e-9)
        assert np.all(child >= 0.25 - 1e-12) and np.all(child <= 0.95 + 1e-12)
        assert np.abs(child - parent).max() > 1e-4
        np.testing.assert_allclose(child.reshape(6, 3), child.reshape(6, 3)[:, :1].repeat(3, axis=1), atol=1e-9)


def test_block_drops_put_one_whole_block_at_its_top_on_budget_at_the_drop_share():
    from search.samplers import DROP, BudgetNeutralEvolution, drop_block
    from search.screening import local

    blocks = tuple(b for b in range(6) for _ in range(3))  # 6 blocks of 3 projections each
    sizes = np.array([4, 1, 2] * 6, dtype=np.float64)
    space = Space(tuple(f"{b}.{i}" for b in range(6) for i in range(3)), sizes, 0.6, 0.25, 0.95,
                  tuple((f"{b}.{i}",) for b in range(6) for i in range(3)), blocks)
    rng = np.random.default_rng(0)
    parent = uniform(space)

    def dropped(x: np.ndarray) -> np.ndarray:
        return np.isclose(x, 0.95).reshape(6, 3).all(axis=1)

    seen = set()
    for _ in range(40):
        child = drop_block(space, rng, parent, np.full(18, 0.95))
        assert space.mean(child) == pytest.approx(0.6, abs=1e-12)
        np.testing.assert_allclose(space.project(child), child, atol=1e-12)  # already on budget
        assert dropped(child).sum() == 1 and np.isclose(child, 0.95).sum() == 3
        rest = child[~np.isclose(child, 0.95)]
        np.testing.assert_allclose(rest, 0.6 - 0.35 * 7 / 35)  # the freed weights spread evenly: 7 of 42 at +0.35
        seen.add(int(np.argmax(dropped(child))))
    assert seen == set(range(6))

    evo = BudgetNeutralEvolution(space, seed=0, wave=0.0)
    share = np.mean([dropped(evo._mutate(parent)).any() for _ in range(1000)])
    assert abs(share - DROP) < 0.03
    near = local(space, rng, parent[None], np.full(18, 0.25), np.full(18, 0.95), 2000)
    assert abs(np.mean([dropped(x).any() for x in near]) - DROP) < 0.02
    assert np.all([space.mean(x) == pytest.approx(0.6, abs=1e-9) for x in near])


def test_smooth_profiles_stay_in_the_box_and_follow_depth():
    from search.samplers import smooth_profiles

    blocks = tuple(b for b in range(10) for _ in range(7))
    space = Space(tuple(f"{b}.{i}" for b in range(10) for i in range(7)), np.ones(70), 0.7, 0.35, 0.99,
                  tuple((f"{b}.{i}",) for b in range(10) for i in range(7)), blocks)
    rng = np.random.default_rng(0)
    low, high = np.full(70, 0.4), np.linspace(0.8, 0.95, 70)
    x = smooth_profiles(space, rng, 400, low, high, jitter=0.0)
    assert x.shape == (400, 70) and np.all(x >= low) and np.all(x <= high)
    place = ((x - low) / (high - low)).reshape(400, 10, 7)
    np.testing.assert_allclose(place, place[:, :, :1].repeat(7, axis=2))  # no jitter: a block is one value
    block_means = place[:, :, 0]
    assert np.std(block_means, axis=1).mean() > 0.15  # unlike box points, whose block means all sit near 0.5
    box = rng.uniform(size=(400, 70)).reshape(400, 10, 7).mean(axis=2)
    assert np.std(box, axis=1).mean() < 0.13
    jittered = smooth_profiles(space, rng, 400, low, high)
    assert np.all(jittered >= low) and np.all(jittered <= high)
    assert np.ptp(jittered.reshape(400, 10, 7), axis=2).max() > 0
