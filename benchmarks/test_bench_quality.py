"""Smoke tests of the sample-quality benchmarks (CI runs them once, untimed) and a unit test of the decision rule
that chose the samplers' defaults (benchmarks/quality_per_step.py)."""
import json

import pytest


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _rows(table):
    """Rows from {(sampler, spacing, steps): [fd per seed]}."""
    return [dict(sampler=s, spacing=sp, steps=k, used_steps=k, seed=i, fd=fd, s_per_image=1e-3)
            for (s, sp, k), fds in table.items() for i, fd in enumerate(fds)]


def test_decision_rule(bench_script):
    """Rules 1-5 of quality_per_step.py on made-up FDs: the reference's largest FD is the bar (0.12); a match at few
    steps wins with the lowest-median spacing at the fewest steps; otherwise the geometric-mean spacing and the
    fewer of 50 / 100 that match; 100 when nothing matches; the fewest steps are recommended."""
    q = bench_script("quality_per_step")
    table = {("ddpm", "linspace", 1000): [0.10, 0.12, 0.08]}
    for sp, few in (("linspace", [0.9, 0.30, 0.20]), ("trailing", [0.8, 0.11, 0.10]), ("logsnr", [2.0, 0.10, 0.09])):
        table.update({("a", sp, k): [v, v + 0.01, v - 0.01] for k, v in zip((5, 10, 20), few)})
    for sp, few in (("linspace", [0.9, 0.30, 0.20]), ("trailing", [0.5, 0.20, 0.15]), ("logsnr", [3.0, 0.15, 0.13])):
        table.update({("b", sp, k): [v] * 3 for k, v in zip((5, 10, 20), few)})
    table.update({("b", "trailing", 50): [0.11] * 3, ("b", "trailing", 100): [0.10] * 3})
    table.update({("c", sp, k): [1.0] * 3 for sp in q.SPACINGS for k in (5, 10, 20)})
    table.update({("c", "linspace", k): [0.5] * 3 for k in (50, 100)})
    d = q.decide(_rows(table), ["ddpm", "a", "b", "c"])
    assert d["reference_max"] == 0.12
    assert (d["spacing"]["a"], d["default_steps"]["a"]) == ("logsnr", 10)  # 0.10 beats trailing's 0.11 at 10
    assert (d["spacing"]["b"], d["default_steps"]["b"]) == ("trailing", 50)  # geometric means 0.38, 0.25, 0.39
    assert (d["spacing"]["c"], d["default_steps"]["c"]) == ("linspace", 100)  # a tie: the first spacing
    assert d["default_steps"]["ddpm"] is None
    assert d["recommended"] == {"sampler": "a", "steps": 10, "spacing": "logsnr"}


def test_quality_per_step_smoke(tmp_path, bench_script):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    q = bench_script("quality_per_step")
    out = tmp_path / "q.json"
    assert q.main(["--seeds", "0", "--steps", "5", "--samplers", "unipc", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {r["spacing"] for r in result["rows"]} == set(q.SPACINGS) and result["floors"]["random_floor_fd"] > 0
    assert (tmp_path / "q.md").exists() and (tmp_path / "q.png").exists()
    assert q.main(["--seeds", "0", "--steps", "5", "--samplers", "unipc", "--out", str(out)]) == 0  # resumed
    assert len(json.loads(out.read_text())["rows"]) == 3


def test_solver_grids_smoke(tmp_path, bench_script):
    pytest.importorskip("diffusers")
    g = bench_script("solver_grids")
    out = tmp_path / "g.json"
    assert g.main(["--steps", "5", "--samplers", "dpmpp_2m", "--n", "400", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    ours = {r["spacing"]: r["w1"] for r in rows if r["tool"] == "ddpm_fast"}
    theirs = {r["spacing"]: r["w1"] for r in rows if r["tool"] == "diffusers"}
    assert set(ours) == set(g.SPACINGS) and abs(ours["dpm-linspace"] - theirs["default"]) < 1e-3
