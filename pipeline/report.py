"""The run report: `<run>/report.md` plus PNG plots in `<run>/plots/`.

    python -m pipeline.report outputs/demo            # rebuild it from the run's files

It reads only what the run wrote: config.yaml, plan.txt / plan.json, results.json (or each
stage's manifest.json) and each stage's metrics.jsonl, so it works on a finished run, a
partial run, or a run copied from another machine. Plots (matplotlib, Agg backend):
  plots/sft_loss.png      SFT train loss per step (and eval loss)
  plots/rm_accuracy.png   RM train accuracy per step, smoothed (and held-out accuracy)
  plots/ppo.png           PPO reward, KL and answer length per step (and the gold check's held-out accuracy)
  plots/dpo.png           DPO loss, implicit reward margin and preference accuracy per step (and held-out)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, RunConfig, load_run_config
from pipeline.files import atomic_write
from pipeline.tracking import read_metrics

STAGES = ("sft", "rm", "ppo", "dpo")


# --------------------------------------------------------------------------- reading the run


def _run_config(run: Path) -> tuple[RunConfig | None, str]:
    """The run's typed config, or None and why not (the report is still written without it)."""
    try:
        return load_run_config(run), ""
    except ConfigError as err:
        return None, str(err)


def _results(run: Path) -> dict[str, dict]:
    out: dict[str, dict] = {}
    path = run / "results.json"
    if path.exists():
        try:
            out.update(json.loads(path.read_text()))
        except json.JSONDecodeError:
            pass
    for stage in STAGES:  # a stage finished in a run that stopped later still has its manifest
        manifest = run / stage / "manifest.json"
        if stage not in out and manifest.exists():
            try:
                out[stage] = json.loads(manifest.read_text()).get("result", {})
            except json.JSONDecodeError:
                pass
    return out


# --------------------------------------------------------------------------- plots


def _series(rows: list[dict], split: str, key: str) -> tuple[list[float], list[float]]:
    picked = [(r["step"], r[key]) for r in rows if r.get("split") == split and isinstance(r.get(key), (int, float))]
    return [p[0] for p in picked], [p[1] for p in picked]


def _smooth(values: list[float], window: int) -> list[float]:
    if window <= 1 or len(values) < window:
        return values
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _plot(path: Path, panels: list[dict], title: str) -> Path | None:
    """panels: [{"ylabel", "lines": [(x, y, label, style)]}] -> one PNG; None when nothing to draw."""
    panels = [p for p in panels if any(len(x) for x, *_ in p["lines"])]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.6 * len(panels)), sharex=True, squeeze=False)
    for ax, panel in zip(axes[:, 0], panels):
        for x, y, label, style in panel["lines"]:
            if len(x):
                ax.plot(x, y, style, label=label, markersize=4, linewidth=1.2 if style == "-" else 1.0,
                        alpha=0.45 if label.endswith("(raw)") else 1.0)
        ax.set_ylabel(panel["ylabel"])
        ax.grid(alpha=0.3)
        if sum(1 for x, *_ in panel["lines"] if len(x)) > 1:
            ax.legend(fontsize=8)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def make_plots(run: Path) -> dict[str, Path]:
    """The PNGs of every stage that has metrics; {name: path}."""
    run = Path(run)
    plots = run / "plots"
    made: dict[str, Path] = {}
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return made
    sft = read_metrics(run / "sft" / "metrics.jsonl")
    if sft:
        x, y = _series(sft, "train", "loss")
        ex, ey = _series(sft, "eval", "loss")
        w = max(1, len(x) // 50)
        p = _plot(plots / "sft_loss.png", [{"ylabel": "loss", "lines": [
            (x, y, "train (raw)", "-"), (x, _smooth(y, w), "train", "-"), (ex, ey, "eval", "o-")]}], "SFT loss")
        if p:
            made["sft_loss"] = p
    rm = read_metrics(run / "rm" / "metrics.jsonl")
    if rm:
        x, y = _series(rm, "train", "accuracy")
        ex, ey = _series(rm, "eval", "accuracy")
        w = max(5, len(x) // 25)
        panels = [{"ylabel": "accuracy", "lines": [(x, _smooth(y, w), f"train (mean of {w})", "-"),
                                                   (ex, ey, "held-out", "o-")]}]
        cx, cy = _series(rm, "eval", "chosen_score")
        rx, ry = _series(rm, "eval", "rejected_score")
        panels.append({"ylabel": "held-out score", "lines": [(cx, cy, "chosen", "o-"), (rx, ry, "rejected", "o-")]})
        p = _plot(plots / "rm_accuracy.png", panels, "Reward model")
        if p:
            made["rm_accuracy"] = p
    ppo = read_metrics(run / "ppo" / "metrics.jsonl")
    if ppo:
        panels = []
        for key, label in (("reward", "reward"), ("kl", "KL to reference"), ("answer_length", "answer length")):
            x, y = _series(ppo, "train", key)
            w = max(1, len(x) // 25)
            lines = [(x, y, f"{label} (raw)", "-"), (x, _smooth(y, w), f"mean of {w}", "-")] if w > 1 else [(x, y, label, "-")]
            panels.append({"ylabel": label, "lines": lines})
        gx, gy = _series(ppo, "gold", "gold_accuracy")
        panels.append({"ylabel": "gold check", "lines": [(gx, gy, "held-out greedy accuracy", "o-")]})
        p = _plot(plots / "ppo.png", panels, "PPO")
        if p:
            made["ppo"] = p
    dpo = read_metrics(run / "dpo" / "metrics.jsonl")
    if dpo:
        panels = []
        for key, label in (("loss", "loss"), ("margin", "reward margin"), ("accuracy", "preference accuracy")):
            x, y = _series(dpo, "train", key)
            ex, ey = _series(dpo, "eval", key)
            w = max(1, len(x) // 25)
            panels.append({"ylabel": label, "lines": [(x, _smooth(y, w), f"train (mean of {w})", "-"),
                                                      (ex, ey, "held-out", "o-")]})
        p = _plot(plots / "dpo.png", panels, "DPO")
        if p:
            made["dpo"] = p
    return made


# --------------------------------------------------------------------------- the markdown


def _num(v: Any, digits: int = 4) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _config_summary(cfg: RunConfig) -> list[str]:
    d = cfg.data_blend
    rows = [
        ("actor", cfg.model.actor), ("reward model", cfg.model.reward),
        ("tokenizer", cfg.model.tokenizer or "(the actor's)"),
        ("stages", ", ".join(cfg.run.stages)),
        ("data", ", ".join(ds.name + (f" ({ds.path})" if ds.path else "") for ds in d.datasets)),
        ("split sft,rm,ppo", d.split), ("prompt format", d.prompt_format),
        ("hardware", f"{cfg.hardware.name} ({cfg.hardware.device})"),
        ("deployment", f"{cfg.deployment.name} ({cfg.deployment.launcher}, {cfg.deployment.nodes} node(s))"),
        ("dtype", cfg.dtype), ("seed", cfg.run.seed),
        ("loggers", ", ".join(cfg.run.loggers) or "metrics.jsonl only"),
    ]
    lines = ["| setting | value |", "|---|---|"] + [f"| {k} | {_num(v)} |" for k, v in rows if v not in (None, "")]
    sft, rm, ppo, dpo = cfg.stage.sft, cfg.stage.rm, cfg.stage.ppo, cfg.stage.dpo
    stage_rows = [
        ("sft", sft.per_device_train_batch_size, sft.optim.learning_rate, sft.num_train_epochs, sft.max_steps, ""),
        ("rm", rm.per_device_train_batch_size, rm.optim.learning_rate, rm.num_train_epochs, rm.max_steps, ""),
        ("ppo", ppo.per_device_training_batch_size, ppo.actor.optim.learning_rate, ppo.num_train_epochs, ppo.max_steps,
         f"kl_ctl {_num(ppo.kl_ctl)}, generation batch {ppo.per_device_generation_batch_size}, "
         f"max_new_tokens {ppo.generation.max_new_tokens}, critic lr {_num(ppo.critic.optim.learning_rate)}"),
        ("dpo", dpo.per_device_train_batch_size, dpo.optim.learning_rate, dpo.num_train_epochs, dpo.max_steps,
         f"{dpo.loss_type} loss, beta {_num(dpo.beta)}, label smoothing {_num(dpo.label_smoothing)}"),
    ]
    lines += ["", "| stage | micro-batch | lr | epochs | max steps | other |", "|---|---|---|---|---|---|"]
    lines += [f"| {stage} | {batch} | {_num(lr)} | {epochs} | {'-' if steps is None else steps} | {extra} |"
              for stage, batch, lr, epochs, steps, extra in stage_rows if stage in cfg.run.stages]
    return lines


def _stage_numbers(stage: str, r: dict) -> list[str]:
    if stage == "sft" and "eval_loss_after" in r:
        return [f"- eval loss {_num(r.get('eval_loss_before'))} -> **{_num(r['eval_loss_after'])}** "
                f"(perplexity {_num(r.get('perplexity_after'))})"]
    if stage == "rm" and "accuracy_after" in r:
        return [f"- held-out accuracy {_num(r.get('accuracy_before'))} -> **{_num(r['accuracy_after'])}**",
                f"- mean held-out score: chosen {_num(r.get('chosen_score'))}, rejected {_num(r.get('rejected_score'))}"]
    if stage == "ppo" and "reward_last" in r:
        lines = [f"- mean reward {_num(r.get('reward_first'))} (first steps) -> **{_num(r['reward_last'])}** (last steps)",
                 f"- KL to reference (last steps) {_num(r.get('kl_last'))}, answer length {_num(r.get('answer_length_last'))}"]
        if r.get("gold_best") is not None:
            lines.append(f"- gold check (greedy accuracy on the held-out validation questions): best {_num(r['gold_best'])} at step "
                         f"{r['gold_best_step']}, last {_num(r.get('gold_last'))} at step {r.get('gold_last_step')}"
                         f"{', stopped early' if r.get('gold_stopped_early') else ''}; final/actor is the actor of step "
                         f"{r.get('final_step')}")
        if r.get("heldout_greedy_gain") is not None:
            lines += [f"- held-out accuracy, {mode} answers ({r.get('heldout_prompts')} prompts, the reward function's "
                      f"score >= 0.5): {_num(r.get(f'heldout_{mode}_before'))} -> **{_num(r[f'heldout_{mode}_after'])}**, "
                      f"gain {r[f'heldout_{mode}_gain']:+.3f} (95% interval {r[f'heldout_{mode}_gain_ci95'][0]:+.3f} to "
                      f"{r[f'heldout_{mode}_gain_ci95'][1]:+.3f}, Newcombe)" for mode in ("greedy", "sampled")]
        return lines
    if stage == "dpo" and "accuracy_after" in r:
        def interval(key: str, when: str) -> str:
            return f"95% interval {_num(r.get(f'{key}_low_{when}'))}-{_num(r.get(f'{key}_high_{when}'))}"

        return [f"- held-out preference accuracy (implicit reward of chosen above rejected; a tie counts 1/2) "
                f"{_num(r.get('accuracy_before'))} -> **{_num(r['accuracy_after'])}** ({interval('accuracy', 'after')}, "
                f"Wilson, {r.get('eval_pairs')} pairs)",
                f"- held-out implicit reward margin {_num(r.get('margin_before'))} -> **{_num(r.get('margin_after'))}** "
                f"(chosen {_num(r.get('chosen_reward_after'))}, rejected {_num(r.get('rejected_reward_after'))}); "
                f"loss {_num(r.get('loss_before'))} -> {_num(r.get('loss_after'))}",
                f"- the policy alone ranks the chosen answer more likely: {_num(r.get('policy_accuracy_before'))} "
                f"({interval('policy_accuracy', 'before')}) -> {_num(r.get('policy_accuracy_after'))} "
                f"({interval('policy_accuracy', 'after')})"]
    return []


def _timing(stage: str, r: dict, rows: list[dict]) -> str:
    parts = [f"{r.get('steps', '?')} steps"]
    if r.get("seconds") is not None:
        parts.append(f"{r['seconds']:.0f} s")
    if r.get("skipped_steps"):
        parts.append(f"{r['skipped_steps']} steps skipped (non-finite loss)")
    if stage == "ppo":
        gen = [x["generation_s"] for x in rows if x.get("split") == "train" and "generation_s" in x]
        tot = [x["step_s"] for x in rows if x.get("split") == "train" and "step_s" in x]
        if gen and tot and sum(tot) > 0:
            parts.append(f"{sum(tot) / len(tot):.2f} s/step, generation {100 * sum(gen) / sum(tot):.0f}% of it")
    return "- " + ", ".join(parts)


def accuracy_text(p: dict) -> str:
    """An accuracy with its 95% interval, as the report and the run summary print it: 0.750 (0.700-0.800)."""
    return f"{p['accuracy']:.3f} ({p['low']:.3f}-{p['high']:.3f})"


def _truth_section(truth: dict | None) -> list[str]:
    """Ground truth on the built-in task's held-out questions (pipeline.truth), when the run measured it."""
    if not truth or not truth.get("policies"):
        return []
    k = truth.get("samples_per_question")
    md = ["## Ground truth on held-out questions", "",
          f"Each fact of the built-in world asked in the one phrasing no stage trained on ({truth.get('questions')} "
          "questions); an answer is right when its first sentence states the true fact (checked by rule, "
          "`pipeline.data.builtin.judge_answer`). Greedy: one answer per question; sampled: "
          f"{k} per question at temperature 1. 95% Wilson intervals in brackets.", "",
          "| policy | greedy right | sampled right | contested facts, greedy | greedy verdicts |", "|---|---|---|---|---|"]
    for label, r in truth["policies"].items():
        sampled = accuracy_text(r["sampled"]) if r.get("sampled") else "-"
        verdicts = ", ".join(f"{v} {n}" for v, n in sorted(r.get("greedy_verdicts", {}).items()))
        md.append(f"| {label} | {accuracy_text(r['greedy'])} | {sampled} | {accuracy_text(r['greedy_contested'])} | {verdicts} |")
    for label, g in truth.get("gains", {}).items():
        parts = [f"{kind} **{d['difference']:+.3f}** ({d['low']:+.3f} to {d['high']:+.3f})" for kind, d in g.items()]
        md += ["", f"- {label} minus {truth.get('baseline', 'sft')}: {', '.join(parts)} (95% paired bootstrap over the questions)"]
    rm = truth.get("reward_model")
    if rm:
        md += ["", "Reward model on held-out pairs (true answer vs a rejected one), by rejection kind:", "",
               "| rejected answer | pairs | ranked right | mean margin |", "|---|---|---|---|"]
        md += [f"| {kind} | {r['n']} | {accuracy_text(r)} | {r['margin']:.3f} |"
               for kind, r in sorted(rm.items(), key=lambda kv: kv[1]["accuracy"])]
    return md + [""]


def build_report(run: str | Path) -> Path:
    """Write <run>/report.md and <run>/plots/*.png; return the report's path."""
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: no such run folder")
    cfg, why_not = _run_config(run)
    results = _results(run)
    plots = make_plots(run)
    name = cfg.run.name if cfg else run.name
    md = [f"# Run report: {name}", "", f"Run folder: `{run}`", ""]

    md += ["## Configuration", ""]
    md += _config_summary(cfg) if cfg else [f"(configuration not shown: {why_not})"]
    md += ["", "Full config: `config.yaml`.", ""]

    md += ["## Plan", ""]
    plan_txt = run / "plan.txt"
    if plan_txt.exists():
        md += ["```", plan_txt.read_text().rstrip(), "```"]
    else:
        md.append("(no plan.txt)")
    plan = {}
    if (run / "plan.json").exists():
        try:
            plan = json.loads((run / "plan.json").read_text())
        except json.JSONDecodeError:
            plan = {}
    for w in plan.get("warnings", []) or []:
        md.append(f"- warning: {w}")
    for s in plan.get("suggestions", []) or []:
        md.append(f"- suggestion: {s if isinstance(s, str) else json.dumps(s)}")
    md.append("")

    md += ["## Results", ""]
    titles = {"sft": "Step 1: supervised fine-tuning", "rm": "Step 2: reward model", "ppo": "Step 3: PPO",
              "dpo": "DPO (in place of steps 2 and 3)"}
    plot_of = {"sft": ("sft_loss", "SFT loss"), "rm": ("rm_accuracy", "RM accuracy"), "ppo": ("ppo", "PPO reward, KL, answer length"),
               "dpo": ("dpo", "DPO loss, reward margin, preference accuracy")}
    any_stage = False
    for stage in STAGES:
        r = results.get(stage)
        rows = read_metrics(run / stage / "metrics.jsonl")
        if r is None and not rows:
            continue
        any_stage = True
        md += [f"### {titles[stage]}", ""]
        if r is None:
            md.append("- not finished (numbers below come from its metrics so far)")
            r = {"steps": max((x["step"] for x in rows), default=0)}
        md += _stage_numbers(stage, r)
        md.append(_timing(stage, r, rows))
        final = run / stage / "final"
        if final.exists():
            md.append(f"- model: `{final}`" + (" (actor, critic" + (", actor_ema" if (final / 'actor_ema').exists() else "")
                                               + ")" if stage == "ppo" else ""))
        key, caption = plot_of[stage]
        if key in plots:
            md += ["", f"![{caption}](plots/{plots[key].name})"]
        md.append("")
    if any_stage and not plots:
        md += ["(no plots: matplotlib is not installed; `pip install matplotlib`, then "
               f"`python -m pipeline.report {run}`)", ""]
    if not any_stage:
        md += ["(no stage has written metrics yet)", ""]

    md += _truth_section(results.get("truth"))

    target = next((p for p in (run / "ppo" / "final" / "actor", run / "dpo" / "final", run / "sft" / "final") if p.exists()), None)
    if target is not None:
        md += ["## Next", "", "```",
               f"python -m pipeline.chat path={target}",
               f"python -m pipeline.evaluate compare run={run}",
               f"python -m pipeline.evaluate reward run={run}",
               f"python -m pipeline.evaluate truth run={run}", "```", ""]
    path = run / "report.md"
    atomic_write(path, "\n".join(md))
    return path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    args = [a.split("=", 1)[1] if a.startswith(("run=", "run.output_dir=")) else a for a in args]
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print("usage: python -m pipeline.report <run folder>", file=sys.stderr)
        return 2
    try:
        path = build_report(args[0])
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
