"""Fast smoke of the benchmark plumbing (bench/common.py): results table, ratios, timing span."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import common as C  # noqa: E402


def test_append_result_creates_then_extends_a_section(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\n## Memory model\n\n| a |\n|---|\n| 1 |\n")
    C.append_result("SFT vs TRL", "intro text", ["x", "y"], ["1", "2"], path)
    C.append_result("SFT vs TRL", "intro text", ["x", "y"], ["3", "4"], path)
    C.append_result("RM vs TRL", "other", ["z"], ["5"], path)
    text = path.read_text()
    assert text.count("## SFT vs TRL") == 1 and text.count("intro text") == 1
    lines = text.splitlines()
    sft = lines.index("## SFT vs TRL")
    rows = [line for line in lines[sft:lines.index("## RM vs TRL")] if line.startswith("| ")]
    assert rows[0].startswith("| date | x | y |") and rows[1].endswith("| 1 | 2 |") and rows[2].endswith("| 3 | 4 |")
    assert "| 1 |" in lines[:8]  # the memory section is untouched
    assert lines[-1] == "" or lines[-1].startswith("|")


def test_ratios_spread_and_rate():
    runs = {"ours": [{"r": 2.0}, {"r": 3.0}], "trl": [{"r": 1.0}, {"r": 2.0}]}
    assert C.ratios(runs, "r") == [2.0, 1.5]
    assert C.spread([2.0, 1.5]) == "1.75 (1.5-2)"
    assert C.ratios({"ours": runs["ours"]}, "r") == []
    secs, n = C.rate([1.0, 2.0, 4.0, 7.0], warmup=2)
    assert (secs, n) == (5.0, 2)


def test_parent_side_figures_and_options_handed_to_children(capsys, tmp_path):
    runs = {"ours": [{"r": 2.0, "peak_rss_mib": 100.0}, {"r": 3.0, "peak_rss_mib": 120.0}],
            "trl": [{"r": 1.0, "peak_rss_mib": 90.0}, {"r": 2.0, "peak_rss_mib": 96.0}]}
    assert C.print_ratios(runs, "r", "pairs/s") == [2.0, 1.5]
    assert capsys.readouterr().out == "ours/TRL pairs/s: 1.75 (1.5-2)  (target >= 1.0: met)\n"
    assert C.print_ratios({"ours": runs["ours"]}, "r", "pairs/s") == [] and capsys.readouterr().out == ""
    assert C.spread_of(runs["ours"], "r") == "2.5 (2-3)"
    assert C.rss_pair(runs["ours"], runs["trl"]) == "110 / 93"
    assert C.opt_shape(C.SHAPE) == "OPT 4 layers, hidden 256, vocab 50272"
    assert C.opt_shape(C.SHAPE, vocab=False) == "OPT 4 layers, hidden 256"

    args = argparse.Namespace(steps=6, warmup=2, repeats=3, batch=8, work=str(tmp_path), peer_decoding="greedy", dtype="bf16")
    assert C.runs_done(args) == "6 (2) x 3"
    C.pass_to_child(args, "peer_decoding", "dtype")
    assert args.extra == ["--peer-decoding", "greedy", "--dtype", "bf16"]
    # Our stage section and TRL's config train the same steps at the same rate on the same micro-batch.
    ours, theirs = C.stage_settings(args, 1e-4, 16), C.trl_training_args(args, "sft", 1e-4)
    assert ours["max_steps"] == theirs["max_steps"] == 8
    assert ours["per_device_train_batch_size"] == theirs["per_device_train_batch_size"] == 8
    assert ours["optim"]["learning_rate"] == theirs["learning_rate"] == 1e-4
    assert ours["optim"]["gradient_clipping"] == theirs["max_grad_norm"] == 1.0
    assert Path(theirs["output_dir"]).parent == tmp_path / "runs" and Path(theirs["output_dir"]).name.startswith("trl_sft_")


def test_gpu_script_report_formats():
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_step3

    r = {"device": "cpu", "dtype": "fp32", "batch": 4, "prompt_len": 16, "max_new_tokens": 16, "steps": 1, "warmup": 1,
         "step_s": 1.0, "generation_frac": 0.5, "experience_frac": 0.2, "training_frac": 0.3,
         "generation_tokens_per_s": 64.0, "ms_per_decode_step": 62.5, "actor_weight_bytes": 2**20,
         "kv_bytes_per_decode_step": 2**20, "bandwidth_nominal_gbps": 10.0, "bandwidth_measured_gbps": 10.0,
         "roofline_tokens_per_s": 100.0, "roofline_frac": 0.64, "roofline_frac_measured_bw": 0.64,
         "training_tflops": 0.01, "matmul_peak_tflops": 0.1, "training_mfu": 0.1, "peak_mem_gib": None}
    assert "64.0%" in gpu_step3.report(r)


def test_gpu_script_runs_end_to_end_in_its_cpu_smoke_mode(tmp_path):
    """The GPU benchmark's whole path (model writing, RLHFEngine/PPOTrainer, timing, roofline
    arithmetic, report files) on CPU with tiny shapes, so a lent GPU's minutes are not spent on a bug."""
    import json
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_step3.py"), "--device", "cpu", "--tiny",
                           "--steps", "1", "--warmup", "0", "--work", str(tmp_path / "work"), "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    r = json.loads((tmp_path / "gpu_step3.json").read_text())
    assert r["steps"] == 1 and r["batch"] == 4 and r["actor_params"] > 0
    assert r["step_s"] > 0 and r["generation_tokens_per_s"] > 0 and r["training_tflops"] > 0
    assert 0 < r["roofline_frac"] <= 1 and r["training_mfu"] > 0  # a loaded CPU can even read above its "peak"
    assert 0.8 <= r["generation_frac"] + r["experience_frac"] + r["training_frac"] <= 1.01
    assert "end-to-end" in (tmp_path / "gpu_step3.txt").read_text()


def test_ppo_step_reference_scores_and_losses_equal_ours(tmp_path):
    """bench/ppo_step.py's plain Hugging Face reference and PPOTrainer, on the same fp32 models and the
    same sampled answers: the same actor log-probs (ours taken while decoding), reference log-probs,
    values and scores (atol 1e-5), and the same first-update actor and critic losses (rtol 1e-4), so
    the bench compares the same work done two ways."""
    from argparse import Namespace

    import ppo_step
    import torch

    from pipeline.config import load_config
    from pipeline.dist import init_distributed
    from pipeline.rlhf import PPOTrainer, RLHFEngine

    ppo_step.prepare(tmp_path, torch.float32)
    args = Namespace(work=str(tmp_path), batch=4, warmup=0, steps=1, decoding="sample")
    cfg = ppo_step.config(args, tmp_path / "run")
    cfg["run"]["dtype"] = "fp32"
    cfg["stage"]["ppo"]["generation"]["max_new_tokens"] = 8
    cfg = load_config(cfg)
    init_distributed(cfg)
    tokenizer = C.load_tokenizer()
    torch.manual_seed(0)
    engine = RLHFEngine(actor_model_name_or_path=tmp_path / "actor", critic_model_name_or_path=tmp_path / "reward",
                        tokenizer=tokenizer, num_total_iters=2, args=cfg)
    trainer = PPOTrainer(engine=engine, args=cfg)
    ids = torch.randint(3, 50000, (4, 10))
    mask = torch.ones_like(ids)
    ids[:2, :3], mask[:2, :3] = tokenizer.pad_token_id, 0  # left padding
    exp = trainer.generate_experience({"input_ids": ids, "attention_mask": mask})

    reference = ppo_step.HFReferencePPO(str(tmp_path / "actor"), str(tmp_path / "reward"), tokenizer, torch.float32)
    theirs = reference.experience(exp.seq, mask)
    answer = exp.answer_mask.bool()
    assert torch.equal(theirs["mask"], exp.answer_mask)
    for ours_key, their_key in (("logprobs", "logprobs"), ("ref_logprobs", "ref_logprobs"), ("values", "values")):
        torch.testing.assert_close(getattr(exp, ours_key)[answer], theirs[their_key][answer], atol=1e-5, rtol=0)
    torch.testing.assert_close(exp.scores, theirs["scores"], atol=1e-5, rtol=0)
    their_actor_loss, their_critic_loss = reference.losses(theirs)
    actor_loss, critic_loss = trainer.train_rlhf(exp)
    torch.testing.assert_close(actor_loss, their_actor_loss.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(critic_loss, their_critic_loss.detach(), rtol=1e-4, atol=1e-6)
