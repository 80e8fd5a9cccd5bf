"""Ground truth on the built-in task: the answer checker, the held-out split of the data, the
interval math on hand numbers, and the demo's summary showing PPO beat its SFT start."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from pipeline.data import builtin
from pipeline.truth import paired_difference, proportion, summary_lines


def test_the_checker_judges_hand_written_answers():
    facts = builtin.world(3)
    frog, bear = facts["frog"]["color"], facts["bear"]["place"]
    wrong = next(c for c in builtin.COLORS if c != frog)
    cases = {
        f"the frog is {frog} .": "right",
        f"the frog is {frog} . the cat is {facts['cat']['color']} .": "right",  # what follows is not judged
        f"the frog is {frog} .</s>": "right",
        f"  the  frog is {frog} . ": "right",
        f"the frog is {wrong} .": "wrong_fact",
        f"the frog is {wrong} . the frog is {frog} .": "wrong_fact",  # the first sentence counts
        f"the frog lives in the {facts['frog']['place']} .": "wrong_relation",
        f"the bear lives in the {bear} .": "off_topic",
        f"the frog is {frog}": "malformed",  # cut off before its full stop: not a sentence of the world
        f"frog the is {frog} .": "malformed",
        "": "malformed",
    }
    for text, verdict in cases.items():
        assert builtin.judge_answer("frog", "color", text, seed=3) == verdict, text
    assert builtin.states_fact("frog", "color", f"the frog is {frog} .", seed=3)
    assert not builtin.states_fact("frog", "color", f"the frog is {frog} .", seed=4) or builtin.world(4)["frog"]["color"] == frog


def test_held_out_questions_are_in_no_training_data_and_mean_something():
    seed = 1234
    held = builtin.held_out_questions(seed)
    facts, contested = builtin.world(seed), builtin.contested_facts(seed)
    validation = builtin.held_out_questions(seed, "validation")
    assert len(held) == len(validation) == 24 and len({q["prompt"] for q in held + validation}) == 48
    assert sum(q["contested"] for q in held) == len(contested) == 12
    pairs, demos = builtin.generate_pairs(4000, seed), builtin.generate_demonstrations(4000, seed)
    held_prompts = {q["prompt"] for q in held + validation}
    assert not held_prompts & {p["prompt"] for p in pairs} and not held_prompts & {d["prompt"] for d in demos}
    # Every fact and every phrasing is trained on, only never together: 48 of the 96 questions.
    trained = {p["prompt"] for p in pairs}
    assert trained == {d["prompt"] for d in demos} and len(trained) == 48
    assert {_fact(p) for p in trained} == {(s, r) for s in builtin.SUBJECTS for r in builtin.QUESTIONS}
    assert {q.format(s=s) for r, qs in builtin.QUESTIONS.items() for q in qs for s in builtin.SUBJECTS} > trained
    assert all(any(q.format(s=s) in trained for s in builtin.SUBJECTS) for qs in builtin.QUESTIONS.values() for q in qs)
    # The preference data carries the truth; the SFT data states the decoy on most contested facts.
    assert all(builtin.judge_answer(*_fact(p["prompt"]), p["chosen"], seed) == "right" for p in pairs)
    kinds = Counter(p["kind"] for p in pairs)
    assert kinds["wrong_fact"] == pytest.approx(4000 * 3 / 8, rel=0.08)
    on_contested = [d for d in demos if _fact(d["prompt"]) in contested]
    right = sum(builtin.judge_answer(*_fact(d["prompt"]), d["answer"], seed) == "right" for d in on_contested)
    assert right / len(on_contested) == pytest.approx(builtin.SFT_RIGHT_ON_CONTESTED, abs=0.04)
    assert all(builtin.judge_answer(*_fact(d["prompt"]), d["answer"], seed) == "right" for d in demos
               if _fact(d["prompt"]) not in contested)
    decoys = [p for p in pairs if p["kind"] == "wrong_fact" and _fact(p["prompt"]) in contested]
    assert sum(p["rejected"] == builtin.answer(*_fact(p["prompt"]), contested[_fact(p["prompt"])]) for p in decoys) \
        / len(decoys) == pytest.approx(builtin.DECOY_REJECTED + (1 - builtin.DECOY_REJECTED) / 7, abs=0.06)
    # Held-out pairs for the reward model: each kind once per question, every wrong value for wrong_fact.
    kinds = Counter(p["kind"] for p in builtin.held_out_pairs(seed))
    assert kinds["off_topic"] == 24 and kinds["wrong_fact"] + kinds["wrong_fact (decoy)"] == 24 * 7
    assert kinds["wrong_fact (decoy)"] == 12
    assert facts  # the world the questions are about


def _fact(prompt: str) -> tuple[str, str]:
    for relation, phrasings in builtin.QUESTIONS.items():
        for q in phrasings:
            for s in builtin.SUBJECTS:
                if q.format(s=s) == prompt:
                    return s, relation
    raise AssertionError(prompt)


def test_intervals_on_hand_numbers():
    # Wilson 95% for 8 of 10: 0.4902-0.9433 (Newcombe 1998, Table I's method 3 for 8/10 rounds to these).
    p = proportion([1] * 8 + [0] * 2)
    assert (p["accuracy"], p["n"]) == (0.8, 10)
    assert p["low"] == pytest.approx(0.4902, abs=1e-4) and p["high"] == pytest.approx(0.9433, abs=1e-4)
    # Sampled answers: 3 questions x 4 samples, 6 right of 12 -> 0.5, Wilson 0.2538-0.7462.
    p = proportion([4, 2, 0], trials_each=4)
    assert (p["accuracy"], p["n"]) == (0.5, 12)
    assert p["low"] == pytest.approx(0.2538, abs=1e-4) and p["high"] == pytest.approx(0.7462, abs=1e-4)
    # Paired: one of four questions improved. The bootstrap mean is k/4 with k ~ Binomial(4, 1/4):
    # P(k=0) = 0.316 > 2.5%, P(k<=2) = 0.949 < 97.5% <= P(k<=3) = 0.996 -> interval [0, 0.75].
    d = paired_difference([1, 1, 0, 1], [0, 1, 0, 1])
    assert d["difference"] == 0.25 and (d["low"], d["high"]) == (0.0, 0.75)
    # Every question moved by the same amount: no spread, the interval is the point.
    d = paired_difference([0.75] * 5, [0.25] * 5)
    assert (d["difference"], d["low"], d["high"]) == (0.5, 0.5, 0.5)
    # Many questions: the percentile interval is the normal one (mean +- 1.96 sd / sqrt(n)) to 0.01.
    after = [1] * 120 + [0] * 80
    before = [1] * 60 + [0] * 60 + [1] * 20 + [0] * 60
    d = paired_difference(after, before)
    deltas = [a - b for a, b in zip(after, before)]
    mean = sum(deltas) / 200
    sd = (sum((x - mean) ** 2 for x in deltas) / 200) ** 0.5
    assert d["difference"] == pytest.approx(0.2)
    assert d["low"] == pytest.approx(mean - 1.96 * sd / 200 ** 0.5, abs=0.01)
    assert d["high"] == pytest.approx(mean + 1.96 * sd / 200 ** 0.5, abs=0.01)
    with pytest.raises(ValueError):
        paired_difference([1], [1, 0])


def test_summary_lines_from_numbers():
    truth = {"questions": 4, "samples_per_question": 2, "baseline": "sft",
             "policies": {"sft": {"greedy": proportion([1, 0, 0, 1]), "sampled": proportion([1, 1, 0, 2], 2)},
                          "ppo": {"greedy": proportion([1, 1, 1, 1]), "sampled": proportion([2, 2, 1, 2], 2)}},
             "gains": {"ppo": {"greedy": paired_difference([1, 1, 1, 1], [1, 0, 0, 1])}},
             "reward_model": {"wrong_fact": {**proportion([1, 0]), "margin": 0.1},
                              "garbled": {**proportion([1, 1]), "margin": 3.0}}}
    lines = summary_lines(truth)
    assert lines[0] == ("TRUTH SFT held-out questions answered right: greedy 0.500 (0.150-0.850) of 4, "
                        "sampled 0.500 (0.215-0.785) of 8 answers (95% Wilson)")
    assert lines[2].startswith("TRUTH PPO - SFT: greedy +0.500 (+0.000 to +1.000)")
    assert lines[3] == "TRUTH RM held-out pairs ranked right, by rejection kind: wrong_fact 0.50, garbled 1.00"


def test_gold_check_settings_are_validated():
    from conftest import ROOT
    from hydra import compose, initialize_config_dir

    from pipeline.config import ConfigError, load_config, register_resolvers

    def config(*overrides: str):
        register_resolvers()
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
            return load_config(compose("config", overrides=["+experiment=demo", *overrides]), check_paths=False)

    HH = ["data_blend.datasets=[{name: hh-rlhf, path: /data/hh}]", "data_blend.sft_only=[]"]
    gold = config().stage.ppo.gold_check
    assert (gold.every_steps, gold.keep_best, gold.patience) == (10, True, 0)
    for overrides, message in ((["stage.ppo.gold_check.every_steps=-1"], "stage.ppo.gold_check.every_steps=-1 must be >= 0"),
                               (["stage.ppo.gold_check.patience=-2"], "stage.ppo.gold_check.patience=-2 must be >= 0"),
                               (HH,
                                "stage.ppo.gold_check.every_steps=10 needs answers with a ground truth")):
        with pytest.raises(ConfigError) as err:
            config(*overrides)
        assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)
    assert config(*HH, "stage.ppo.gold_check.every_steps=0").stage.ppo.gold_check.every_steps == 0


def test_the_demo_shows_ppo_beating_its_sft_start_on_held_out_truth(demo_run: Path):
    results = json.loads((demo_run / "results.json").read_text())
    truth = results["truth"]
    assert set(truth["policies"]) == {"sft", "ppo"} and truth["questions"] == 24
    gain = truth["gains"]["ppo"]["greedy"]
    assert gain["difference"] > 0 and gain["low"] > 0, gain
    assert truth["policies"]["ppo"]["greedy"]["accuracy"] > truth["policies"]["sft"]["greedy"]["accuracy"]
    # The reward model is judged per rejection kind on held-out pairs.
    assert {"wrong_fact", "off_topic", "garbled"} <= set(truth["reward_model"])
    tail = (demo_run / "stdout.txt").read_text().splitlines()[-12:]
    assert any(line.startswith("TRUTH SFT held-out questions answered right: greedy") for line in tail)
    assert any(line.startswith("TRUTH PPO - SFT: greedy +") for line in tail)
    assert any(line.startswith("PPO   gold check") for line in tail)
    # The gold check ran every 10 steps and at the start; final/actor is its best step's actor.
    from pipeline.tracking import read_metrics

    gold = [r for r in read_metrics(demo_run / "ppo" / "metrics.jsonl") if r["split"] == "gold"]
    assert [r["step"] for r in gold] == list(range(0, 81, 10))
    ppo = results["ppo"]
    best = max(gold[1:], key=lambda r: (r["gold_accuracy"], -r["step"]))  # ties: the earliest; step 0 is the baseline
    assert (ppo["gold_best"], ppo["gold_best_step"], ppo["final_step"]) == (best["gold_accuracy"], best["step"], best["step"])
    assert best["gold_accuracy"] > gold[0]["gold_accuracy"]  # PPO beat its SFT start on the validation questions too
    assert (demo_run / "ppo" / "final" / "actor_last").exists() == (best["step"] != 80)
    report = (demo_run / "report.md").read_text()
    assert "## Ground truth on held-out questions" in report and "| ppo |" in report


def test_evaluate_truth_on_the_demo_run(demo_run: Path, tmp_path: Path, capsys):
    from pipeline.evaluate import main

    assert main(["truth", f"run={demo_run}", "samples=0", "device=cpu", f"out={tmp_path / 'truth.json'}"]) == 0
    printed = capsys.readouterr().out
    assert "ppo/final/actor - sft/final: greedy +" in printed
    got = json.loads((tmp_path / "truth.json").read_text())
    stored = json.loads((demo_run / "results.json").read_text())["truth"]
    # The same greedy answers as the run's own measurement, question by question.
    assert got["policies"]["sft/final"]["greedy_right"] == stored["policies"]["sft"]["greedy_right"]
    assert got["policies"]["ppo/final/actor"]["greedy_right"] == stored["policies"]["ppo"]["greedy_right"]
    assert got["reward_model"]["wrong_fact"]["accuracy"] == pytest.approx(stored["reward_model"]["wrong_fact"]["accuracy"])


def test_gold_check_keeps_the_best_and_stops_after_patience(tmp_path: Path, monkeypatch):
    """Scripted validation accuracies 0.8 (the SFT start: a baseline, not a candidate), 0.75, 0.75, 0.625,
    0.5 at steps 0-40: the best PPO step is 10 (a tie keeps the earliest), two checks below it stop
    training at step 40 (patience 2), and final/actor becomes step 10's actor, step 40's kept as
    final/actor_last."""
    from types import SimpleNamespace

    import pipeline.engine
    import pipeline.export
    import pipeline.truth as truth

    scripted = iter([0.8, 0.75, 0.75, 0.625, 0.5])  # step 0 (the SFT start) is the baseline, never kept

    def fake_truth(*args, **kwargs):
        assert kwargs["split"] == "validation" and kwargs["samples"] == 0  # never the test questions
        x = next(scripted)
        return {"greedy": {"accuracy": x, "low": x - 0.1, "high": x + 0.1}}

    def fake_save(actor, path, tokenizer):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "weights").write_text(actor)

    monkeypatch.setattr(truth, "policy_truth", fake_truth)
    monkeypatch.setattr(pipeline.export, "save_hf", fake_save)
    monkeypatch.setattr(pipeline.engine, "unwrap", lambda actor: actor)
    section = SimpleNamespace(every_steps=10, keep_best=True, patience=2)
    cfg = SimpleNamespace(stage=SimpleNamespace(ppo=SimpleNamespace(gold_check=section, generation=SimpleNamespace(max_new_tokens=8))),
                          run=SimpleNamespace(seed=0), data_blend=SimpleNamespace(prompt_format="human_assistant"))
    logged = []
    logger = SimpleNamespace(log=lambda step, split, **m: logged.append((step, split, m["gold_accuracy"])))
    gold = truth.GoldCheck(cfg, tokenizer=None, stage_dir=tmp_path)
    stopped_at = None
    for step in range(0, 81):
        if gold.due(step):
            gold.check(step, f"actor@{step}", logger)
            if gold.should_stop():
                stopped_at = step
                break
    assert stopped_at == 40 and not gold.due(40) and not gold.due(40, last=True)  # not the same step twice
    assert gold.due(43, last=True) and not gold.due(43)  # the last step is checked wherever it falls
    assert logged == [(0, "gold", 0.8), (10, "gold", 0.75), (20, "gold", 0.75), (30, "gold", 0.625), (40, "gold", 0.5)]
    restored = truth.GoldCheck(cfg, tokenizer=None, stage_dir=tmp_path)
    restored.load_state_dict(gold.state_dict())
    assert restored.state_dict() == gold.state_dict() and restored.should_stop()
    final = tmp_path / "final" / "actor"
    fake_save("actor@40", final, None)
    result = gold.finish(final, 40, is_main=True)
    assert result == {"gold_best": 0.75, "gold_best_step": 10, "gold_last": 0.5, "gold_last_step": 40,
                      "gold_stopped_early": True, "final_step": 10}
    assert (final / "weights").read_text() == "actor@10"
    assert (tmp_path / "final" / "actor_last" / "weights").read_text() == "actor@40"
    section.every_steps = 0
    assert truth.GoldCheck(cfg, None, tmp_path).finish(final, 40, True) == {} and not truth.GoldCheck(cfg, None, tmp_path).due(0)
