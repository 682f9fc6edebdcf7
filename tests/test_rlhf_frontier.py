"""`rlhf frontier`: the grid and seeds give the expected points, the summary and the dominance computation on
hand-made curves, best-of-n at its KL bound, and a quick sweep end to end that resumes point by point."""

import json
import math
import shutil

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

from rlhf import frontier  # noqa: E402
from rlhf.cli import main  # noqa: E402
from rlhf.evaluate import best_of_n_kl  # noqa: E402


def test_points_are_the_grid_times_the_seeds():
    cfg = frontier.FrontierConfig(methods="dpo,best_of_n", dpo="0.1,1", best_of_n="1,4", seeds="0,3")
    assert frontier.points(cfg) == [
        ("sft", 0.0, 0), ("sft", 0.0, 3),
        ("dpo", 0.1, 0), ("dpo", 0.1, 3), ("dpo", 1.0, 0), ("dpo", 1.0, 3),
        ("best_of_n", 1.0, 0), ("best_of_n", 1.0, 3), ("best_of_n", 4.0, 0), ("best_of_n", 4.0, 3),
    ]  # fmt: skip
    with pytest.raises(ValueError, match="methods: unknown"):
        frontier.FrontierConfig(methods="dpo,magic").validate()
    with pytest.raises(ValueError, match="best_of_n values must be integers"):
        frontier.FrontierConfig(best_of_n="1,2.5").validate()
    # each strength goes through its stage's own checks before anything runs
    with pytest.raises(ValueError, match="ppo_target_kl=0: target_kl must be > 0"):
        frontier.FrontierConfig(methods="ppo_target_kl", ppo_target_kl="2,0").validate()
    with pytest.raises(ValueError, match="ipo=-1: beta must be"):
        frontier.FrontierConfig(ipo="-1").validate()
    assert main(["frontier", "dpo=0.1,-1"]) == 2


def test_workers_auto():
    assert frontier.auto_workers("cpu", 1) == 1  # one thread: nothing to split
    assert frontier.auto_workers("cpu", 2) == 2 and frontier.auto_workers("cpu", 16) == 2
    with pytest.raises(ValueError, match="workers must be >= 0"):
        frontier.FrontierConfig(workers=-1).validate()


def record(method, strength, seed, gold, kl):
    return {"method": method, "strength": strength, "seed": seed, "gold_reward": gold, "kl_to_sft": kl}


def test_summary_means_and_standard_errors():
    # gold 0.2 and 0.4: mean 0.3, sample sd 0.1414, s.e. 0.1; KL 1 and 3: mean 2, s.e. 1
    (entry,) = frontier.summarise([record("dpo", 0.1, 0, 0.2, 1.0), record("dpo", 0.1, 1, 0.4, 3.0)])
    assert entry["gold_reward"] == pytest.approx(0.3) and entry["gold_reward_sem"] == pytest.approx(0.1)
    assert entry["kl_to_sft"] == pytest.approx(2.0) and entry["kl_to_sft_sem"] == pytest.approx(1.0)
    assert entry["seeds"] == 2


def curve(method, pts, sem=0.01):
    return [{"method": method, "strength": float(i), "gold_reward": g, "gold_reward_sem": sem, "kl_to_sft": k}
            for i, (k, g) in enumerate(pts)]  # fmt: skip


def test_dominance_and_budgets_on_hand_made_curves():
    a = curve("a", [(0.5, 0.3), (1.0, 0.5), (3.0, 0.7)])
    b = curve("b", [(1.0, 0.2), (3.0, 0.6)])  # below a everywhere: a covers each b point, clearly
    c = curve("c", [(0.2, 0.4)])  # less KL than any point of a: not dominated by a
    close = curve("close", [(1.0, 0.495)])  # covered by a's (1.0, 0.5) but within the error (0.005 < 0.014)
    summary = a + b + c + close
    assert frontier.dominates(summary, "a", "b") and not frontier.dominates(summary, "b", "a")
    assert not frontier.dominates(summary, "a", "c")
    assert not frontier.dominates(summary, "a", "close")
    assert frontier.best_within(summary, "a", 1.0)["gold_reward"] == 0.5
    assert frontier.best_within(summary, "a", 0.1) is None
    # best-of-n's KL is an upper bound: dominance by it is claimed, dominance over it never
    bon = [{**e, "method": "best_of_n"} for e in b]
    assert frontier.dominates(a + b, "a", "b") and not frontier.dominates(a + bon, "a", "best_of_n")
    assert frontier.dominates(curve("best_of_n", [(0.4, 0.9)]) + b, "best_of_n", "b")
    result = frontier.conclusions(summary, ["a", "b", "c"], [1.0, 5.0])
    assert result["dominates"] == [["a", "b"]]
    assert result["best_within_budget"]["b"]["5"]["gold_reward"] == 0.6


def test_figures_hold_one_curve_per_method():
    summary = curve("dpo", [(1.0, 0.2), (3.0, 0.5)]) + curve("ppo", [(2.0, 0.4)]) + curve("best_of_n", [(0.3, 0.1)])
    run = {
        "method": "ppo",
        "strength": 0.1,
        "seed": 0,
        "curve": [
            {"step": s, "kl_to_sft": k, "gold_reward": g, "rm_reward": r}
            for s, k, g, r in ((0, 0, 0, 1), (5, 2, 0.4, 3))
        ],
    }
    fig = frontier.frontier_figure({"summary": summary, "points": [run]})
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert labels == ["dpo", "ppo", "best_of_n"]
    gold, proxy = frontier.overoptimisation_figure({"summary": summary, "points": [run]}).axes
    assert len(gold.lines) == len(proxy.lines) == 1
    assert list(proxy.lines[0].get_xdata()) == [0, 2] and list(proxy.lines[0].get_ydata()) == [1, 3]
    assert frontier.overoptimisation_figure({"summary": summary, "points": []}) is None


def test_quick_sweep_end_to_end_and_resume(tmp_path):
    out = tmp_path / "sweep"
    args = ["frontier", f"output_dir={out}", "preset=quick", "methods=dpo,best_of_n", "dpo=0.1,1.0",
            "best_of_n=1,4", "seeds=0,1", "num_threads=1", "progress=false"]  # fmt: skip
    assert main(args) == 0
    result = json.loads((out / "frontier.json").read_text())
    assert len(result["points"]) == 2 + 4 + 4
    assert {(p["method"], p["strength"]) for p in result["points"]} == {
        ("sft", 0.0), ("dpo", 0.1), ("dpo", 1.0), ("best_of_n", 1.0), ("best_of_n", 4.0)}  # fmt: skip
    for p in result["points"]:
        assert math.isfinite(p["gold_reward"]) and math.isfinite(p["kl_to_sft"])
        if p["method"] == "best_of_n":
            assert p["kl_to_sft"] == pytest.approx(best_of_n_kl(int(p["strength"])))  # the analytic bound
        if p["method"] == "sft":
            assert abs(p["kl_to_sft"]) < 1e-4
    assert {e["method"] for e in result["summary"]} == {"sft", "dpo", "best_of_n"}
    assert all(e["seeds"] == 2 for e in result["summary"])
    assert (out / "frontier.png").is_file() and "| dpo | 0.1 | 2 |" in (out / "frontier.md").read_text()
    # resume: finished points are kept as they are; a missing one is computed again, alone
    kept = out / "points" / "dpo-0.1-s0" / "point.json"
    mtime = kept.stat().st_mtime_ns
    (out / "points" / "dpo-1-s1" / "point.json").unlink()
    assert main(args) == 0
    assert kept.stat().st_mtime_ns == mtime

    def values(points):  # all but the wall time
        return [{k: v for k, v in p.items() if k != "seconds"} for p in points]

    again = json.loads((out / "frontier.json").read_text())["points"]
    assert values(again) == values(result["points"])  # same seeds, same values
    assert all(p["seconds"] > 0 for p in again)
    # the same sweep with two worker processes (one thread each, as here): the same points, bit for bit
    parallel = [f"output_dir={tmp_path / 'parallel'}" if a.startswith("output_dir=") else a for a in args]
    assert main([*parallel, "workers=2"]) == 0
    assert values(json.loads((tmp_path / "parallel" / "frontier.json").read_text())["points"]) == values(again)
    # other settings in the same directory would mix incomparable points: refused, nothing touched
    assert main([*args, "pipeline_args=label_beta=2"]) == 2
    assert kept.stat().st_mtime_ns == mtime
    # a point failing in a worker stops the sweep with its error; the finished points stay
    blocked = tmp_path / "parallel" / "points" / "dpo-1-s1"
    shutil.rmtree(blocked)
    blocked.write_text("a file where the point's directory goes")
    with pytest.raises(OSError):
        main([*parallel, "workers=2"])
    assert (tmp_path / "parallel" / "points" / "dpo-0.1-s0" / "point.json").is_file()


def test_every_trained_method_runs_a_point(tmp_path):
    out = tmp_path / "all"
    args = ["frontier", f"output_dir={out}", "preset=quick", "methods=kto,ipo,ppo,ppo_target_kl,grpo", "kto=0.1",
            "ipo=0.5", "ppo=0.05", "ppo_target_kl=2", "grpo=0.04", "seeds=0", "budgets=1,100", "num_threads=1",
            "progress=false"]  # fmt: skip
    assert main(args) == 0
    result = json.loads((out / "frontier.json").read_text())
    assert [(p["method"], p["strength"]) for p in result["points"]] == [
        ("sft", 0.0), ("kto", 0.1), ("ipo", 0.5), ("ppo", 0.05), ("ppo_target_kl", 2.0), ("grpo", 0.04)]  # fmt: skip
    # each point trained its stage with the method's options and its strength
    for point, stage, options in (
        ("kto-0.1", "kto", ["beta: 0.1"]),
        ("ipo-0.5", "dpo", ["beta: 0.5", "loss_type: ipo"]),
        ("ppo-0.05", "ppo", ["kl_coef: 0.05", "adaptive_kl: false"]),
        ("ppo_target_kl-2", "ppo", ["target_kl: 2.0", "adaptive_kl: true", "kl_horizon: 160"]),
        ("grpo-0.04", "grpo", ["beta: 0.04"]),
    ):
        config = (out / "points" / f"{point}-s0" / stage / "config.yaml").read_text()
        for option in options:
            assert option in config.splitlines(), (point, option)
    assert set(result["best_within_budget"]) == {"kto", "ipo", "ppo", "ppo_target_kl", "grpo"}
    assert set(result["not_swept"]) == {"rs", "ppo-ptx"} and "- rs: " in (out / "frontier.md").read_text()
    # the over-optimisation curves: PPO and GRPO evaluated from SFT (step 0) at every checkpoint (2 steps: 1, 2)
    for p in result["points"]:
        if p["method"] in ("ppo", "ppo_target_kl", "grpo"):
            assert [c["step"] for c in p["curve"]] == [0, 1, 2], p["method"]
            assert abs(p["curve"][0]["kl_to_sft"]) < 1e-4  # step 0 is the SFT policy
            assert p["curve"][-1]["gold_reward"] == pytest.approx(p["gold_reward"])  # the last is the final policy
        else:
            assert "curve" not in p
    assert (out / "overoptimisation.png").is_file()
