"""DPO: the loss functions against hand-computed numbers, and the dpo stage end to end on CPU with
tiny models ([sft, dpo] on the built-in task; ZeRO-0 vs ZeRO-3, LoRA, offloaded reference,
resume-equals-continuous, two gloo ranks).

Hand numbers (beta 0.1) for the pairs below: log-ratios policy - reference are
chosen (0.5, 0.0) and rejected (-1.0, 0.5), so h = chosen - rejected = (1.5, -0.5) and
  sigmoid:  -logsigmoid(0.15) = log(1 + e^-0.15) = 0.620957048,  -logsigmoid(-0.05) = 0.718459648
  conservative (label_smoothing 0.2): 0.8 * 0.620957048 + 0.2 * log(1 + e^0.15) = 0.650957048,
            0.8 * 0.718459648 + 0.2 * log(1 + e^-0.05) = 0.708459648
  ipo:      (1.5 - 5)^2 = 12.25, (-0.5 - 5)^2 = 30.25
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import stage_config

from pipeline.rl_math import dpo_loss, preference_accuracy, sequence_logprobs, wilson_interval

POLICY_CHOSEN = torch.tensor([-5.0, -3.0])
POLICY_REJECTED = torch.tensor([-6.0, -2.0])
REFERENCE_CHOSEN = torch.tensor([-5.5, -3.0])
REFERENCE_REJECTED = torch.tensor([-5.0, -2.5])


def test_dpo_sigmoid_loss_and_implicit_rewards_equal_the_hand_computation():
    loss, chosen, rejected = dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED, beta=0.1)
    assert loss.item() == pytest.approx((0.620957048 + 0.718459648) / 2, abs=1e-7)
    assert torch.allclose(chosen, torch.tensor([0.05, 0.0]), atol=1e-7)
    assert torch.allclose(rejected, torch.tensor([-0.1, 0.05]), atol=1e-7)
    assert preference_accuracy(chosen, rejected).item() == 0.5  # pair 1 right, pair 2 wrong


def test_conservative_dpo_with_label_smoothing_equals_the_hand_computation():
    loss, _, _ = dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED, beta=0.1,
                          label_smoothing=0.2)
    assert loss.item() == pytest.approx((0.650957048 + 0.708459648) / 2, abs=1e-7)


def test_ipo_loss_equals_the_hand_computation():
    loss, chosen, _ = dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED, beta=0.1,
                               loss_type="ipo")
    assert loss.item() == pytest.approx((12.25 + 30.25) / 2, abs=1e-5)
    assert torch.allclose(chosen, torch.tensor([0.05, 0.0]), atol=1e-7)


def test_dpo_gradient_pushes_the_chosen_answer_up_and_the_rejected_one_down():
    chosen = POLICY_CHOSEN.clone().requires_grad_(True)
    rejected = POLICY_REJECTED.clone().requires_grad_(True)
    dpo_loss(chosen, rejected, REFERENCE_CHOSEN, REFERENCE_REJECTED, beta=0.1)[0].backward()
    # d loss / d policy_chosen = -beta * sigmoid(-beta * h) / B per pair: sigmoid(-0.15) = 0.462570, sigmoid(0.05) = 0.512497
    assert torch.allclose(chosen.grad, torch.tensor([-0.1 * 0.4625702 / 2, -0.1 * 0.5124974 / 2]), atol=1e-7)
    assert torch.allclose(rejected.grad, -chosen.grad)


def test_unknown_loss_type_is_refused():
    with pytest.raises(ValueError, match="sigmoid or ipo"):
        dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED, beta=0.1, loss_type="hinge")


def test_sequence_logprobs_sum_and_average_only_the_answer_tokens():
    # p(label) per position: 3/4 (a prompt token, masked), 1/4, 1/2.
    logits = torch.tensor([[[0.0, math.log(3)], [math.log(3), 0.0], [0.0, 0.0]]])
    labels = torch.tensor([[1, 1, 0]])
    mask = torch.tensor([[0, 1, 1]])
    assert sequence_logprobs(logits, labels, mask).item() == pytest.approx(-math.log(8), abs=1e-6)
    assert sequence_logprobs(logits, labels, mask, average=True).item() == pytest.approx(-math.log(8) / 2, abs=1e-6)


def test_a_policy_equal_to_its_reference_ties_every_pair_at_chance():
    zeros = torch.zeros(4)
    assert preference_accuracy(zeros, zeros).item() == 0.5


def test_wilson_interval_equals_the_hand_computation():
    # 45 of 50: centre (0.9 + z^2/100) / (1 + z^2/50), half-width z sqrt(0.0018 + z^2/10000) / (1 + z^2/50)
    low, high = wilson_interval(45, 50)
    assert (low, high) == (pytest.approx(0.786398, abs=1e-6), pytest.approx(0.956524, abs=1e-6))
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.277533, abs=1e-6)
    assert wilson_interval(0, 0) == (0.0, 1.0)


# ---------------------------------------------------------------------- config and plan


def test_bad_dpo_settings_name_the_key():
    from pipeline.config import ConfigError, load_config

    for stage, key in (({"loss_type": "hinge"}, "stage.dpo.loss_type=hinge must be sigmoid or ipo"),
                       ({"beta": 0.0}, "stage.dpo.beta=0.0 must be > 0"),
                       ({"label_smoothing": 0.5}, "stage.dpo.label_smoothing=0.5 must be in [0, 0.5)"),
                       ({"loss_type": "ipo", "label_smoothing": 0.1}, "applies to stage.dpo.loss_type=sigmoid only")):
        with pytest.raises(ConfigError, match=re.escape(key)):
            load_config({"stage": {"dpo": stage}})
    assert load_config({}).run.stages == ["sft", "rm", "ppo"]  # DPO only when asked for


def test_planner_offloads_the_reference_when_that_lets_the_policy_stay_on_the_gpu():
    """OPT-13B DPO on one A100-80G: policy (LoRA, checkpointing) + a resident bf16 reference do not fit
    without offloading something; the reference's weights go to host RAM (one copy per step) rather than
    the policy's optimizer (every step's Adam on the CPU). Pinned off, the policy's optimizer is offloaded."""
    from pipeline import planner as P
    from pipeline.catalog import resolve_model
    from pipeline.config import load_config

    def plan(**dpo):
        cfg = load_config({"model": {"actor": "opt-13b"}, "hardware": {"name": "a100-80g", "device": "cuda",
                                                                        "memory_gib": 80, "bf16": True},
                           "run": {"stages": ["sft", "dpo"]}, "stage": {"dpo": dpo}})
        return cfg, P.plan_run(cfg)

    cfg, chosen = plan()
    dpo = chosen.stages["dpo"]
    assert dpo.fits and dpo.active
    policy, ref = dpo.role("actor"), dpo.role("ref")
    assert policy.strategy == P.Strategy(0, False, True, 128)
    n = resolve_model("opt-13b").num_params()
    assert ref.strategy == P.Strategy(3, True) and ref.host_gib == pytest.approx(2 * n / P.GIB)
    # 2 x 16 rows of 256 + 256 tokens through the policy and, before it, the reference
    assert dpo.peak_gib == pytest.approx(dpo.phases["resident"] + max(dpo.phases["train"], dpo.phases["reference forward"]))
    chosen.apply(cfg)
    assert cfg.stage.dpo.offload_reference_model is True and cfg.stage.dpo.strategy.zero_stage == 0
    report = P.dry_run_report(cfg, chosen)
    assert "DPO phases" in report and any(line.split()[:2] == ["dpo", "ref"] for line in report.splitlines())

    _, pinned = plan(offload_reference_model=False)
    policy = pinned.stages["dpo"].role("actor").strategy
    assert pinned.stages["dpo"].fits and policy.offload and not pinned.stages["dpo"].role("ref").strategy.offload


# ---------------------------------------------------------------------- the stage end to end (tiny, CPU, fp32)

LOSS_RTOL, LOSS_ATOL = 1e-4, 1e-6
TRAIN_KEYS = ("loss", "chosen_reward", "rejected_reward", "margin", "accuracy", "lr")
BASE = {
    "run": {"name": "tiny", "dtype": "fp32", "log_interval": 1, "seed": 1234},
    "model": {"actor": "tiny-opt", "reward": "tiny-opt", "tokenizer": "builtin"},
    # 800 records: 160 for SFT, 320 preference pairs for DPO (288 train, 32 held out)
    "data_blend": {"name": "builtin", "datasets": [{"name": "builtin", "max_records": 800}], "split": "2,4,4",
                   "max_prompt_len": 32, "max_answer_len": 24},
    "hardware": {"name": "cpu", "device": "cpu"},
    "stage": {
        "sft": {"per_device_train_batch_size": 8, "num_train_epochs": 2, "max_steps": 30, "mask_prompt": True,
                "optim": {"learning_rate": 2e-3}},
        "dpo": {"per_device_train_batch_size": 8, "per_device_eval_batch_size": 32, "max_steps": 4,
                "optim": {"learning_rate": 1e-3, "lr_scheduler_type": "constant"}},
    },
}


def config(out: Path, stages: list[str], **dpo) -> dict:
    return stage_config(BASE, out, stages, "dpo", dpo)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> Path:
    """A tiny SFT run, once: every DPO variant starts from its sft/final."""
    from pipeline.config import load_config
    from pipeline.runner import run_pipeline

    out = tmp_path_factory.mktemp("dpo_base") / "run"
    run_pipeline(load_config(config(out, ["sft"])))
    return out


def run_dpo(sft_run: Path, out: Path, stages: tuple[str, ...] = ("dpo",), **dpo) -> tuple[dict, list[dict]]:
    """DPO in a copy of the SFT run; (its result, its train metric rows)."""
    from pipeline.config import load_config
    from pipeline.runner import run_pipeline
    from pipeline.tracking import read_metrics

    if not out.exists():
        shutil.copytree(sft_run, out)
    result = run_pipeline(load_config(config(out, list(stages), **dpo)))["dpo"]
    return result, [r for r in read_metrics(out / "dpo" / "metrics.jsonl") if r["split"] == "train"]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_sft_then_dpo_raises_held_out_preference_accuracy(sft_run: Path, tmp_path: Path, capsys):
    """[sft, dpo] (SFT already done, so skipped): the policy starts as its reference (loss ln 2, every
    held-out pair a tie: accuracy 0.5, margin 0) and after 36 steps (one epoch) ranks held-out pairs right with a
    Wilson 95% interval above 0.5; the run's summary, report and final model show it."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    result, rows = run_dpo(sft_run, out, ("sft", "dpo"), max_steps=36, optim={"learning_rate": 3e-3})
    printed = capsys.readouterr().out
    assert "[sft] already done" in printed and "[dpo] actor from sft/final of this run" in printed
    assert json.loads((out / "dpo" / "inputs.json").read_text())["actor"]["stage"] == "sft"

    assert result["steps"] == 36 and result["eval_pairs"] == 32
    assert result["loss_before"] == pytest.approx(math.log(2), abs=1e-6)
    assert result["accuracy_before"] == 0.5 and result["margin_before"] == 0.0
    assert result["accuracy_after"] >= 0.7 and result["accuracy_low_after"] > result["accuracy_before"], result
    assert result["accuracy_low_after"] < result["accuracy_after"] < result["accuracy_high_after"] <= 1.0
    assert result["margin_after"] > 0.1 and result["loss_after"] < result["loss_before"] - 0.05
    assert result["chosen_reward_after"] > result["rejected_reward_after"]

    assert [r["step"] for r in rows] == list(range(1, 37))
    assert all(math.isfinite(r[key]) for r in rows for key in TRAIN_KEYS)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at the first step
    assert sum(r["margin"] for r in rows[-6:]) > sum(r["margin"] for r in rows[:6])

    summary = next(line for line in printed.splitlines() if line.startswith("DPO   held-out preference accuracy"))
    assert f"0.500 -> {result['accuracy_after']:.3f} (95% interval {result['accuracy_low_after']:.3f}-" in summary
    assert f"DPO   model: {out / 'dpo' / 'final'}" in printed
    report = (out / "report.md").read_text()
    assert "### DPO" in report and f"{result['accuracy_after']:.4g}" in report

    final, start = weights(out / "dpo" / "final"), weights(out / "sft" / "final")
    assert set(final) == set(start) and max(float((final[k] - start[k]).abs().max()) for k in final) > 0
    AutoModelForCausalLM.from_pretrained(out / "dpo" / "final")


def test_zero3_and_an_offloaded_reference_train_as_zero0(sft_run: Path, tmp_path: Path):
    """ZeRO-3 (policy and reference partitioned) and a reference kept in host RAM (a ZeRO-3 inference
    engine with parameter offload beside a ZeRO-0 policy): the same per-step losses and rewards as
    ZeRO-0 with a plain reference, rtol 1e-4."""
    runs = {name: run_dpo(sft_run, tmp_path / name, **dpo)[1] for name, dpo in (
        ("zero0", {"strategy": {"zero_stage": 0}, "offload_reference_model": False}),
        ("zero3", {"strategy": {"zero_stage": 3}, "offload_reference_model": False}),
        ("offloaded", {"strategy": {"zero_stage": 0}, "offload_reference_model": True}))}
    plans = {name: {r["role"]: (r["zero_stage"], r["offload"]) for r in
                    json.loads((tmp_path / name / "plan.json").read_text())["stages"]["dpo"]["roles"]} for name in runs}
    assert plans["zero3"]["ref"] == (3, False) and plans["offloaded"]["ref"] == (3, True)
    assert plans["zero0"]["ref"] == (0, False)
    for name in ("zero3", "offloaded"):
        for key in ("loss", "margin", "chosen_reward"):
            assert [r[key] for r in runs[name]] == pytest.approx([r[key] for r in runs["zero0"]], rel=LOSS_RTOL,
                                                                  abs=LOSS_ATOL), (name, key)
    assert runs["zero0"][-1]["loss"] < runs["zero0"][0]["loss"]


def test_lora_and_ipo(sft_run: Path, tmp_path: Path):
    """LoRA adapters start at zero, so the first step's policy equals its reference: DPO's loss ln 2,
    IPO's (0 - 1 / (2 beta))^2 = 25 at beta 0.1; the adapters are merged into dpo/final."""
    for loss_type, first in (("sigmoid", math.log(2)), ("ipo", 25.0)):
        out = tmp_path / loss_type
        result, rows = run_dpo(sft_run, out, loss_type=loss_type, lora={"dim": 8, "learning_rate": 1e-2})
        assert rows[0]["loss"] == pytest.approx(first, rel=1e-6), loss_type
        assert result["loss_after"] < result["loss_before"] and result["margin_after"] > 0, (loss_type, result)
        assert json.loads((out / "plan.json").read_text())["stages"]["dpo"]["roles"][0]["lora_dim"] == 8
        final, start = weights(out / "dpo" / "final"), weights(out / "sft" / "final")
        assert set(final) == set(start)  # merged: no adapter keys
        assert max(float((final[k] - start[k]).abs().max()) for k in final) > 0


@pytest.mark.parametrize("how", ["killed", "stopped"])
def test_resume_equals_continuous(sft_run: Path, tmp_path: Path, monkeypatch, how: str):
    """killed: dies right after step 6 (checkpoints every 4 steps); stopped: a stop request (SIGTERM)
    during step 6 saves a checkpoint there and exits resumable (75). The same run again resumes from
    step 4 or 6 and gives the same per-step metrics and bit-identical final weights as an
    uninterrupted run."""
    from pipeline import resume
    from pipeline.errors import RESUMABLE_EXIT_CODE
    from pipeline.tracking import MetricsLogger, read_metrics

    settings = {"max_steps": 8, "checkpoint": {"every_steps": 4}, "eval_interval": 4}
    continuous, _ = run_dpo(sft_run, tmp_path / "continuous", **settings)

    class Killed(BaseException):
        pass

    log = MetricsLogger.log

    def log_then_interrupt(self, step, split, *args, **metrics):
        log(self, step, split, *args, **metrics)
        if self.stage == "dpo" and split == "train" and step == 6:
            if how == "killed":
                raise Killed
            resume._stop["requested"] = True  # what the SIGTERM handler sets

    monkeypatch.setattr(MetricsLogger, "log", log_then_interrupt)
    with pytest.raises(Killed if how == "killed" else SystemExit) as stop:
        run_dpo(sft_run, tmp_path / how, **settings)
    if how == "stopped":
        assert stop.value.code == RESUMABLE_EXIT_CODE
    resume._stop["requested"] = False
    monkeypatch.setattr(MetricsLogger, "log", log)
    latest = (tmp_path / how / "dpo" / "checkpoints" / "latest").read_text()
    assert latest == {"killed": "step_000004", "stopped": "step_000006"}[how]
    resumed, _ = run_dpo(sft_run, tmp_path / how, **settings)

    rows = {name: read_metrics(tmp_path / name / "dpo" / "metrics.jsonl") for name in ("continuous", how)}
    assert rows[how] == rows["continuous"]  # train and eval rows, each step once
    assert {k: v for k, v in resumed.items() if k != "seconds"} == {k: v for k, v in continuous.items() if k != "seconds"}
    a, b = weights(tmp_path / how / "dpo" / "final"), weights(tmp_path / "continuous" / "dpo" / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_gloo_ranks_under_zero3(tmp_path: Path):
    """[sft, dpo] on 2 gloo ranks under torchrun, the policy and its reference partitioned by ZeRO-3:
    at the start the two agree exactly on every held-out pair (loss ln 2, accuracy 0.5), the held-out
    numbers are reduced over both ranks' shards, rank 0 alone writes metrics and the final model."""
    from conftest import run_cli
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    proc = run_cli("+experiment=demo", "data_blend.datasets.0.max_records=800", "run.log_interval=1",
                   "run.stages=[sft,dpo]", "stage.sft.max_steps=20", "stage.sft.per_device_train_batch_size=8",
                   "stage.dpo.max_steps=12", "stage.dpo.per_device_train_batch_size=4",
                   "stage.dpo.per_device_eval_batch_size=16", "stage.dpo.strategy.zero_stage=3",
                   "stage.dpo.optim.learning_rate=1e-3", "+deployment=single_node", "deployment.procs_per_node=2",
                   f"run.output_dir={out}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "--nproc_per_node=2" in proc.stdout
    result = json.loads((out / "results.json").read_text())["dpo"]
    assert result["loss_before"] == pytest.approx(math.log(2), abs=1e-6) and result["accuracy_before"] == 0.5
    assert result["eval_pairs"] == 40 and result["loss_after"] < result["loss_before"] and result["margin_after"] > 0
    rows = [json.loads(line) for line in (out / "dpo" / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["step"], r["split"]) for r in rows]
    assert len(keys) == len(set(keys)) and [s for s, split in keys if split == "train"] == list(range(1, 13))
    roles = json.loads((out / "plan.json").read_text())["stages"]["dpo"]["roles"]
    assert {r["role"]: r["zero_stage"] for r in roles} == {"actor": 3, "ref": 3}
    AutoModelForCausalLM.from_pretrained(out / "dpo" / "final")


def test_a_dpo_run_is_not_warned_about_the_reward_model_it_does_not_load():
    from pipeline import planner as P
    from pipeline.config import load_config

    def warnings(stages):
        return P.plan_run(load_config({"model": {"actor": "tiny-opt", "reward": "opt-350m", "tokenizer": "builtin"},
                                       "hardware": {"name": "cpu", "device": "cpu"}, "run": {"stages": stages}})).warnings

    assert any("model.reward=opt-350m" in w for w in warnings(["sft", "rm", "ppo"]))
    assert not any("model.reward" in w for w in warnings(["sft", "dpo"]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dpo_on_cuda_in_bf16_with_an_offloaded_reference(tmp_path: Path):
    """[sft, dpo] on CUDA in bf16, the reference a ZeRO-3 engine with parameter offload beside a ZeRO-0
    policy; the final model is written in bf16."""
    from conftest import run_cli

    out = tmp_path / "run"
    proc = run_cli("+experiment=demo", "hardware=h200-141g", "run.device=cuda", "run.dtype=bf16", "run.stages=[sft,dpo]",
                   "stage.sft.max_steps=20", "stage.dpo.max_steps=10", "stage.dpo.strategy.zero_stage=0",
                   "stage.dpo.offload_reference_model=true", f"run.output_dir={out}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())["dpo"]
    assert result["steps"] == 10 and result["loss_before"] == pytest.approx(math.log(2), abs=1e-3)
    assert result["margin_after"] > 0
    roles = {r["role"]: r for r in json.loads((out / "plan.json").read_text())["stages"]["dpo"]["roles"]}
    assert roles["ref"]["zero_stage"] == 3 and roles["ref"]["offload"]
    config = json.loads((out / "dpo" / "final" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"


def test_the_demo_command_with_dpo_in_place_of_rm_and_ppo(demo_run: Path, tmp_path: Path):
    """`python -m pipeline +experiment=demo run.stages=[sft,dpo]` (the README's command) on a copy of the
    session's demo run, whose SFT it reuses: the demo's DPO settings rank held-out pairs right."""
    from conftest import run_cli

    out = tmp_path / "demo"
    shutil.copytree(demo_run, out, ignore=shutil.ignore_patterns("rm", "ppo", "dpo"))
    proc = run_cli("+experiment=demo", "run.stages=[sft,dpo]", f"run.output_dir={out}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[sft] already done" in proc.stdout
    result = json.loads((out / "results.json").read_text())["dpo"]
    assert result["steps"] == 90 and result["eval_pairs"] == 160
    assert result["accuracy_after"] >= 0.8 and result["accuracy_low_after"] > 0.5 and result["margin_after"] > 0.5, result
    assert any(line.startswith("DPO   held-out preference accuracy 0.500 -> ") for line in proc.stdout.splitlines())
