"""Budget mode: the byte cap holds physically, the bound holds numerically, stats are reused."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_llama, write_spec
from mergepipe import api
from mergepipe.catalog.stats import load_block_stats
from mergepipe.runs.analyze import analyze
from mergepipe.errors import BudgetError
from mergepipe.planner.bound import input_shares

SMALL_BLOCKS = 1024  # several blocks per tensor even in hidden-32 models


def _spec(family: dict[str, Path], method: str, weights: list[float]) -> dict:
    experts = ["e1", "e2", "e3"][:len(weights)]
    spec = {"merge_method": method, "base_model": str(family["base"]), "dtype": "float32",
            "models": [{"model": str(family[e]), "parameters": {"weight": w}}
                       for e, w in zip(experts, weights)]}
    if method == "linear":  # linear reads base_model as one more weighted input
        spec["models"].append({"model": str(family["base"]), "parameters": {"weight": 0.3}})
    if method == "ties":
        for m in spec["models"]:
            m["parameters"]["density"] = 0.6
    return spec


@pytest.fixture
def ws(tmp_path, tiny_family):
    """A catalog with the tiny family registered and analysed in small blocks."""
    cat = api.open_catalog(tmp_path / "ws")
    rows = {k: api.register(cat, p, name=k) for k, p in tiny_family.items()}
    analyze(cat, [rows["e1"], rows["e2"], rows["e3"]], rows["base"], block_bytes=SMALL_BLOCKS)
    yield cat
    cat.close()


def _tensors(out: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(out) / "model.safetensors"))


def test_expert_bytes_read_never_exceed_random_budgets(ws, tiny_family, tmp_path):
    rng = random.Random(7)
    for i in range(14):
        method = rng.choice(["linear", "task_arithmetic", "ties"])
        weights = [round(rng.uniform(0.1, 1.0), 3) for _ in range(rng.randint(1, 3))]
        spec = _spec(tiny_family, method, weights)
        full = api.build_plan(ws, spec, io_budget="100%", store=False).full_expert_bytes()
        budget = rng.choice([f"{rng.uniform(0, 100):.2f}%", rng.randint(0, full)])
        plan = api.build_plan(ws, spec, io_budget=budget)
        res = api.apply_plan(ws, plan, tmp_path / f"out{i}")
        assert res.bytes_read["experts"] <= plan.io_budget, (method, budget)
        assert res.bytes_read["experts"] == plan.est_bytes()["experts"]
        assert plan.io_budget <= full
        # the read-ahead thread read exactly what the merge took: no physical byte beyond it
        assert res.phases["readahead_unused_bytes"] == 0
        assert res.phases["read_ahead"] > 0


def test_full_budget_reads_every_expert_byte_and_writes_the_exact_bytes(ws, tiny_family, tmp_path):
    for method in ("linear", "task_arithmetic", "ties"):
        spec = _spec(tiny_family, method, [0.5, 0.3, 0.9])
        exact = api.apply_plan(ws, api.build_plan(ws, spec), tmp_path / f"exact-{method}")
        plan = api.build_plan(ws, spec, io_budget="100%")
        res = api.apply_plan(ws, plan, tmp_path / f"full-{method}")
        assert res.bytes_read["experts"] == plan.full_expert_bytes() == plan.io_budget
        assert plan.error_bound == 0.0
        assert (Path(exact.out) / "model.safetensors").read_bytes() == \
            (Path(res.out) / "model.safetensors").read_bytes()


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_linear_family_difference_is_within_the_reported_bound_on_every_tensor(
        ws, tiny_family, tmp_path, method):
    spec = _spec(tiny_family, method, [0.7, -0.4, 1.2])
    spec.setdefault("parameters", {})["normalize"] = method == "linear"
    exact = _tensors(api.apply_plan(ws, api.build_plan(ws, spec), tmp_path / "exact").out)
    experts = [ws.model_by_name(k)["model_id"] for k in ("e1", "e2", "e3")]
    stats = load_block_stats(ws, experts, ws.model_by_name("base")["model_id"])
    differed = 0
    for pct in ("0%", "7%", "30%", "65%", "95%"):
        plan = api.build_plan(ws, spec, io_budget=pct)
        assert plan.error_bound_kind == "exact"
        got = _tensors(api.apply_plan(ws, plan, tmp_path / f"b{pct[:-1]}").out)
        _, bounds = input_shares(plan, stats)
        total = 0.0
        for task, bound in zip(plan.tasks, bounds):
            diff = float(torch.linalg.vector_norm((exact[task.name] - got[task.name]).double()))
            assert diff <= bound, (pct, task.name, diff, bound)
            differed += diff > 0
            total += diff * diff
        assert total ** 0.5 <= plan.error_bound
    assert differed > 0  # the budgets really dropped something


def test_budget_changes_the_plan_id(ws, tiny_family):
    spec = _spec(tiny_family, "task_arithmetic", [0.5, 0.5])
    ids = {api.build_plan(ws, spec, io_budget=b, store=False).plan_id for b in ("10%", "50%", "100%")}
    ids.add(api.build_plan(ws, spec, store=False).plan_id)
    assert len(ids) == 4


def test_second_analyze_reads_nothing(ws):
    rows = [ws.model_by_name(k) for k in ("e1", "e2", "e3")]
    rep = analyze(ws, rows, ws.model_by_name("base"), block_bytes=SMALL_BLOCKS)
    assert rep.analyzed == [] and rep.bytes_read == 0
    assert sorted(rep.up_to_date) == ["e1", "e2", "e3"]


def test_changed_expert_file_invalidates_its_stats(family, tmp_path):
    with api.open_catalog(tmp_path / "ws") as cat:
        base = api.register(cat, family["base"], name="base")
        e1 = api.register(cat, family["e1"], name="e1")
        e2 = api.register(cat, family["e2"], name="e2")
        analyze(cat, [e1, e2], base)
        before = load_block_stats(cat, [e1["model_id"]], base["model_id"])
        make_llama(family["e1"], 99, base=family["base"], scale=0.2)   # rewrite e1 in place
        rep = analyze(cat, [cat.model_by_name("e1"), cat.model_by_name("e2")],
                      cat.model_by_name("base"))
        assert rep.analyzed == ["e1"] and rep.up_to_date == ["e2"]
        assert rep.bytes_read > 0
        after = load_block_stats(cat, [e1["model_id"]], base["model_id"])
        key = (e1["model_id"], "model.layers.0.mlp.up_proj.weight")
        assert after[key][0]["delta_l2"] != before[key][0]["delta_l2"]


def test_negative_budget_is_refused_before_anything_is_written(cli, family, tmp_path):
    spec = write_spec(tmp_path / "ta.yml", json.dumps(_spec(family, "task_arithmetic", [0.5, 0.5])))
    cli("register", family["base"], "--name", "base")
    before = cli.snapshot()
    for bad in ("-1MiB", "-5%", "lots"):
        res = cli("apply", spec, "--io-budget", bad, "--out", tmp_path / "out", ok=False)
        assert res.exit_code != 0
        assert res.stderr.startswith("error: ") and len(res.stderr.strip().splitlines()) == 1
        assert "budget" in res.stderr
        assert not (tmp_path / "out").exists()
        assert cli.snapshot() == before


def test_missing_stats_with_no_analyze_is_a_clear_error(cli, family, tmp_path):
    spec = write_spec(tmp_path / "ta.yml", json.dumps(_spec(family, "task_arithmetic", [0.5, 0.5])))
    for k in ("base", "e1", "e2"):
        cli("register", family[k], "--name", k)
    before = cli.snapshot()
    res = cli("apply", spec, "--io-budget", "10%", "--no-analyze", "--out", tmp_path / "out",
              ok=False)
    assert res.exit_code != 0
    assert "mergepipe analyze" in res.stderr and "e1" in res.stderr
    assert not (tmp_path / "out").exists()
    assert cli.snapshot() == before
    with pytest.raises(BudgetError):
        with api.open_catalog(cli.home) as cat:
            api.build_plan(cat, spec, io_budget="10%", analyze=False)


def test_apply_with_budget_analyzes_on_demand_and_says_so(cli, family, tmp_path):
    spec = write_spec(tmp_path / "ta.yml", json.dumps(_spec(family, "task_arithmetic", [0.5, 0.5])))
    res = cli("apply", spec, "--io-budget", "20%", "--out", tmp_path / "out", "--json")
    assert "analyze" in res.stderr
    out = json.loads(res.stdout)
    assert out["bytes_read"]["experts"] <= out["io_budget"]
    assert out["error_bound_kind"] == "exact" and out["error_bound"] >= 0
    again = cli("analyze", family["e1"], family["e2"], "--base", family["base"], "--json")
    assert json.loads(again.stdout)["bytes_read"] == 0
    shown = cli("explain", out["run_id"]).stdout
    assert "energy_kept" in shown and "within the budget" in shown


def test_a_budget_without_a_unit_is_refused_naming_the_accepted_forms(cli, family, tmp_path):
    spec = write_spec(tmp_path / "ta.yml", json.dumps(_spec(family, "task_arithmetic", [0.5, 0.5])))
    before = cli.snapshot()
    for bare in ("10", "1500000000", "2.5"):
        res = cli("apply", spec, "--io-budget", bare, "--out", tmp_path / "out", ok=False)
        assert res.exit_code != 0 and len(res.stderr.strip().splitlines()) == 1
        assert res.stderr.startswith(f"error: I/O budget '{bare}' has no unit")
        assert "10%" in res.stderr and "2GiB" in res.stderr and "1500000000B" in res.stderr
        assert not (tmp_path / "out").exists()
    assert cli.snapshot() == before
    res = cli("plan", spec, "--io-budget", "1500000000B", "--json")
    assert json.loads(res.stdout)["io_budget"] == 1500000000


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties", "dare_ties"])
def test_unselected_blocks_skipped_or_computed_as_zeros_give_the_same_bytes(
        ws, tiny_family, tmp_path, method):
    """In small row blocks an unselected block is the base itself and the method skips
    it; as one block per tensor, the same rows are zeros computed like any others."""
    spec = _spec(tiny_family, method, [0.5, 0.3, 0.9])
    for m in spec["models"]:
        m["parameters"]["density"] = 0.4
    if method == "breadcrumbs_ties":
        spec["parameters"] = {"gamma": 0.05}
    plan = api.build_plan(ws, spec, io_budget="30%", store=False)
    rows = api.execute_plan(plan, tmp_path / "rows", block_bytes=SMALL_BLOCKS, cache_bytes=0)
    whole = api.execute_plan(plan, tmp_path / "whole", block_bytes=1 << 30)
    assert rows.bytes_read == whole.bytes_read
    assert (tmp_path / "rows" / "model.safetensors").read_bytes() == \
        (tmp_path / "whole" / "model.safetensors").read_bytes()


def test_base_rows_outside_every_selection_pass_through_as_stored(ws, tiny_family, tmp_path,
                                                                   monkeypatch):
    """Blocks where no expert is read are the base's own bytes, not decoded and encoded:
    the same output as the float32 round trip, with fewer steps."""
    from mergepipe.engine import execute
    from mergepipe.engine.reader import BlockReader

    spec = _spec(tiny_family, "task_arithmetic", [0.6, 0.4])
    plan = api.build_plan(ws, spec, io_budget="20%", store=False)
    passed = []
    rows_bytes = BlockReader.rows_bytes
    monkeypatch.setattr(BlockReader, "rows_bytes",
                        lambda self, *a: passed.append(a) or rows_bytes(self, *a))
    api.execute_plan(plan, tmp_path / "through", block_bytes=SMALL_BLOCKS)
    monkeypatch.setattr(execute, "_base_bytes_out", lambda *a: False)
    api.execute_plan(plan, tmp_path / "round_trip", block_bytes=SMALL_BLOCKS)
    assert len(passed) > 10
    assert (tmp_path / "through" / "model.safetensors").read_bytes() == \
        (tmp_path / "round_trip" / "model.safetensors").read_bytes()


def test_nan_in_base_rows_that_pass_through_is_refused(family, tmp_path):
    from safetensors.torch import load_file as load, save_file

    from mergepipe.errors import MergePipeError

    shard = family["base"] / "model.safetensors"
    sd = load(shard)
    sd["model.layers.2.mlp.up_proj.weight"][-1, 0] = float("nan")
    save_file(sd, shard, metadata={"format": "pt"})
    with api.open_catalog(tmp_path / "ws") as cat:
        rows = {k: api.register(cat, p, name=k) for k, p in family.items()}
        analyze(cat, [rows["e1"], rows["e2"]], rows["base"], block_bytes=SMALL_BLOCKS)
        plan = api.build_plan(cat, _spec(family, "task_arithmetic", [0.6, 0.4]),
                              io_budget="5%", store=False)
        with pytest.raises(MergePipeError, match="NaN or Inf"):
            api.execute_plan(plan, tmp_path / "out", block_bytes=SMALL_BLOCKS)
