"""report.md and its plots from a run folder's files (config.yaml, plan, results, metrics.jsonl)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def fake_run(root: Path, stages=("sft", "rm", "ppo")) -> Path:
    """A run folder shaped like the runner's, with made-up but plausible numbers."""
    run = root / "run"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(
        "run:\n  name: fake\n  stages: [sft, rm, ppo]\n  seed: 7\n  dtype: fp32\n  loggers: [tensorboard]\n"
        "model:\n  actor: tiny-opt\n  reward: tiny-opt\n  tokenizer: builtin\n"
        "data_blend:\n  datasets: [{name: builtin, path: null}]\n  split: 2,4,4\n  prompt_format: human_assistant\n"
        "stage:\n  sft: {per_device_train_batch_size: 16, num_train_epochs: 3, max_steps: null, optim: {learning_rate: 0.002}}\n"
        "  rm: {per_device_train_batch_size: 16, num_train_epochs: 6, max_steps: null, optim: {learning_rate: 0.001}}\n"
        "  ppo: {per_device_training_batch_size: 16, per_device_generation_batch_size: 16, num_train_epochs: 1,"
        " max_steps: 40, kl_ctl: 0.1, generation: {max_new_tokens: 24}, actor: {optim: {learning_rate: 0.0002}},"
        " critic: {optim: {learning_rate: 0.0005}}}\n"
        "hardware: {name: cpu, device: cpu}\n")
    (run / "plan.txt").write_text("stage  role   model\nsft    actor  tiny-opt\n")
    (run / "plan.json").write_text(json.dumps({"warnings": ["a made-up warning"], "suggestions": []}))
    results = {}
    if "sft" in stages:
        rows = [{"step": 0, "split": "eval", "loss": 6.0}] + \
               [{"step": i, "split": "train", "loss": 6.0 * math.exp(-i / 20), "lr": 1e-3} for i in range(1, 61)] + \
               [{"step": 60, "split": "eval", "loss": 0.9}]
        results["sft"] = {"steps": 60, "eval_loss_before": 6.0, "eval_loss_after": 0.9, "perplexity_after": 2.46,
                          "seconds": 12.0}
        _write_stage(run, "sft", rows)
    if "rm" in stages:
        rows = [{"step": 0, "split": "eval", "accuracy": 0.5, "chosen_score": 0.0, "rejected_score": 0.0}] + \
               [{"step": i, "split": "train", "accuracy": min(1.0, 0.5 + i / 100), "loss": 0.5} for i in range(1, 81)] + \
               [{"step": 80, "split": "eval", "accuracy": 0.95, "chosen_score": 2.0, "rejected_score": -3.0}]
        results["rm"] = {"steps": 80, "accuracy_before": 0.5, "accuracy_after": 0.95, "chosen_score": 2.0,
                         "rejected_score": -3.0, "seconds": 20.0}
        _write_stage(run, "rm", rows)
    if "ppo" in stages:
        rows = [{"step": i, "split": "train", "reward": -1 + i / 20, "kl": i / 100, "answer_length": 7 - i / 20,
                 "generation_s": 0.6, "step_s": 1.0} for i in range(1, 41)]
        results["ppo"] = {"steps": 40, "reward_first": -0.9, "reward_last": 0.9, "kl_last": 0.38,
                          "answer_length_last": 5.1, "seconds": 40.0}
        _write_stage(run, "ppo", rows)
        (run / "ppo" / "final" / "actor").mkdir(parents=True)
    (run / "results.json").write_text(json.dumps(results))
    return run


def _write_stage(run: Path, stage: str, rows: list[dict]) -> None:
    (run / stage).mkdir(exist_ok=True)
    (run / stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_report_and_plots_are_written(tmp_path: Path):
    from pipeline.report import build_report

    run = fake_run(tmp_path)
    path = build_report(run)
    assert path == run / "report.md"
    text = path.read_text()
    for needle in ("# Run report: fake", "| actor | tiny-opt |", "stage  role   model", "a made-up warning",
                   "eval loss 6 -> **0.9**", "held-out accuracy 0.5 -> **0.95**", "mean reward -0.9 (first steps) -> **0.9**",
                   "generation 60% of it", "![SFT loss](plots/sft_loss.png)", "![RM accuracy](plots/rm_accuracy.png)",
                   "(plots/ppo.png)", "python -m pipeline.chat path="):
        assert needle in text, needle
    for name in ("sft_loss", "rm_accuracy", "ppo"):
        png = run / "plots" / f"{name}.png"
        data = png.read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, name


def test_report_of_a_partial_run_and_the_command(tmp_path: Path):
    run = fake_run(tmp_path, stages=("sft",))
    (run / "results.json").unlink()  # a run stopped during rm: only the sft manifest is there
    (run / "sft" / "manifest.json").write_text(json.dumps({"status": "done", "result": {
        "steps": 60, "eval_loss_before": 6.0, "eval_loss_after": 0.9, "perplexity_after": 2.46}}))
    (run / "rm").mkdir()
    (run / "rm" / "metrics.jsonl").write_text(json.dumps({"step": 0, "split": "eval", "accuracy": 0.5}) + "\n")
    env = {**os.environ, "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "-m", "pipeline.report", str(run)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert str(run / "report.md") in proc.stdout
    text = (run / "report.md").read_text()
    assert "eval loss 6 -> **0.9**" in text and "not finished" in text and "Step 3" not in text
    assert (run / "plots" / "sft_loss.png").stat().st_size > 0
    assert (run / "plots" / "rm_accuracy.png").exists() and not (run / "plots" / "ppo.png").exists()
    proc = subprocess.run([sys.executable, "-m", "pipeline.report", str(tmp_path / "missing")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no such run folder" in proc.stderr


def test_report_shows_the_ground_truth_and_the_gold_check(tmp_path: Path):
    from pipeline.report import build_report
    from pipeline.truth import paired_difference, proportion

    run = fake_run(tmp_path)
    results = json.loads((run / "results.json").read_text())
    results["ppo"].update(gold_best=0.875, gold_best_step=20, gold_last=0.75, gold_last_step=40,
                          gold_stopped_early=False, final_step=20)
    sft_right, ppo_right = [1] * 16 + [0] * 8, [1] * 21 + [0] * 3
    results["truth"] = {
        "questions": 24, "samples_per_question": 8, "baseline": "sft",
        "policies": {"sft": {"greedy": proportion(sft_right), "sampled": proportion([6] * 24, 8),
                             "greedy_contested": proportion([0] * 8), "greedy_verdicts": {"right": 16, "wrong_fact": 8}},
                     "ppo": {"greedy": proportion(ppo_right), "sampled": proportion([7] * 24, 8),
                             "greedy_contested": proportion([1] * 5 + [0] * 3), "greedy_verdicts": {"right": 21, "wrong_fact": 3}}},
        "gains": {"ppo": {"greedy": paired_difference(ppo_right, sft_right)}},
        "reward_model": {"wrong_fact": {**proportion([1] * 130 + [0] * 30), "margin": 2.5},
                         "garbled": {**proportion([1] * 24), "margin": 9.0}}}
    (run / "results.json").write_text(json.dumps(results))
    rows = [{"step": s, "split": "gold", "gold_accuracy": a} for s, a in ((0, 0.625), (20, 0.875), (40, 0.75))]
    with open(run / "ppo" / "metrics.jsonl", "a") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in rows))
    text = build_report(run).read_text()
    for needle in ("## Ground truth on held-out questions",
                   "| sft | 0.667 (0.467-0.820) | 0.750 (0.684-0.806) | 0.000 (0.000-0.324) | right 16, wrong_fact 8 |",
                   "| ppo | 0.875 (0.690-0.957) |",
                   "- ppo minus sft: greedy **+0.208** (+0.042 to +0.375)",
                   "| wrong_fact | 160 | 0.812 (0.745-0.865) | 2.500 |",
                   "- gold check (greedy accuracy on the held-out validation questions): best 0.875 at step 20, "
                   "last 0.75 at step 40; final/actor is the actor of step 20",
                   "python -m pipeline.evaluate truth run="):
        assert needle in text, needle
