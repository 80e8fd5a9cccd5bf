"""Shared plumbing of the side-by-side benchmarks (bench/sft.py, rm.py, dpo.py, generation.py,
ppo_step.py, rl_step.py).

One invocation = prepare once (model folder, tokenized data), then A B A B: every run is a
fresh subprocess (`--child ours|trl`), so each side pays its own imports and start-up and its
peak RSS is its own. A child times only the steps after `warmup` (start-up, model load,
DeepSpeed / accelerate set-up, data preparation and the first steps are left out) and prints
one JSON line. The parent pairs run i of each side, prints ours/theirs per pair and the median
with the min-max spread, and appends a dated row to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "RESULTS.md"
SHARED = ROOT.parent / "shared" / "data"
HH_RLHF = SHARED / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"
OPT_TOKENIZER = SHARED / "tokenizers" / "opt"

# The CPU shape: tiny but not trivial (the 50k-token LM head and 4 layers of width 256).
SHAPE = dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, ffn_dim=1024, vocab_size=50272,
             max_position_embeddings=2048, word_embed_proj_dim=256)
SEED = 1234
# Threads per run. One: the 2-core machine is shared (other jobs run tests), and OpenMP's
# spin-waiting collapses when two 2-thread processes share 2 cores; one thread per side keeps the
# A/B comparison about the code, not about scheduling. Override with BENCH_THREADS.
THREADS = int(os.environ.get("BENCH_THREADS", "1"))


# --------------------------------------------------------------------------- preparation


def write_opt(path: Path, shape: dict | None = None, seed: int = 0, dtype=None, device: str = "cpu") -> Path:
    """A random-init OPT causal LM in Hugging Face format (dropout 0), written once."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    path = Path(path)
    if (path / "config.json").exists():
        return path
    torch.manual_seed(seed)
    config = OPTConfig(**(shape or SHAPE), dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                       pad_token_id=1, bos_token_id=2, eos_token_id=2)
    with torch.device(device):
        model = OPTForCausalLM(config)
    if dtype is not None:
        model = model.to(dtype)
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    os.replace(tmp, path)
    return path


def write_reward(path: Path, base_dir: Path) -> Path:
    """The pipeline's reward model (transformers' sequence classifier) from a causal-LM folder."""
    from pipeline.files import atomic_dir
    from pipeline.models import RewardModel

    path = Path(path)
    if not (path / "config.json").exists():
        tokenizer = load_tokenizer()
        atomic_dir(path, RewardModel.from_base(str(base_dir), tokenizer).save_pretrained)
    return path


def load_fp32(folder: Path, auto_class=None, **kwargs):
    """A transformers model from `folder` in fp32 (`auto_class`, e.g. AutoModelForSequenceClassification;
    AutoModelForCausalLM when None)."""
    import torch
    from transformers import AutoModelForCausalLM

    return (auto_class or AutoModelForCausalLM).from_pretrained(str(folder), dtype=torch.float32, **kwargs)


def load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(OPT_TOKENIZER))


def our_config(work: Path, out: Path, stages: list[str], stage: dict, max_prompt_len: int = 128,
               max_answer_len: int = 128, max_records: int = 1200) -> dict:
    """The RunConfig dict for our side: the bench model folder, the OPT tokenizer, hh-rlhf, CPU fp32,
    ZeRO 0, no LoRA, no gradient checkpointing (all explicit, so the planner changes nothing)."""
    model_dir = str(work / "model")
    return {
        "run": {"output_dir": str(out), "stages": stages, "dtype": "fp32", "seed": SEED, "resume": "never",
                "device": "cpu", "log_interval": 10**6},
        "model": {"actor": model_dir, "reward": model_dir, "tokenizer": str(OPT_TOKENIZER), "dropout": 0.0},
        "data_blend": {"name": "hh-rlhf", "datasets": [{"name": "hh-rlhf", "path": str(HH_RLHF), "max_records": max_records}],
                       "split": "2,4,4", "eval_fraction": 0.02, "max_prompt_len": max_prompt_len,
                       "max_answer_len": max_answer_len, "cache_dir": str(work / "data_cache")},
        "hardware": {"name": "cpu", "device": "cpu"},
        "stage": stage,
    }


STRATEGY = {"zero_stage": 0, "offload": False, "gradient_checkpointing": False}
NO_LORA = {"dim": 0}


def stage_data(cfg_dict: dict, stage: str):
    """Our data layer's train examples of `stage` (also fills the shared cache our children hit)."""
    from pipeline.config import load_config
    from pipeline.data import load_stage_data

    cfg = load_config(cfg_dict)
    return load_stage_data(cfg, stage, load_tokenizer()).train


def epoch_order(n: int, seed: int = SEED, epoch: int = 0) -> list[int]:
    """The order pipeline.training.epoch_batches visits examples in (one rank)."""
    import torch

    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()


def in_epoch_order(train) -> list[dict]:
    """`train`'s examples in the order our first epoch visits them (what the peer is fed, in order)."""
    return [train[i] for i in epoch_order(len(train))]


def stage_settings(args, lr: float, eval_batch: int) -> dict:
    """Our stage section's settings that match trl_training_args: the micro-batch, warm-up + timed steps,
    no LoRA, ZeRO 0, AdamW at `lr` on a cosine schedule without warm-up, clipping 1.0."""
    return {"per_device_train_batch_size": args.batch, "per_device_eval_batch_size": eval_batch,
            "max_steps": args.warmup + args.steps, "lora": NO_LORA, "strategy": STRATEGY,
            "optim": {"learning_rate": lr, "weight_decay": 0.0, "lr_scheduler_type": "cosine",
                      "num_warmup_steps": 0, "gradient_clipping": 1.0}}


def trl_training_args(args, name: str, lr: float) -> dict:
    """The TRL config settings that match stage_settings (fp32 on CPU, AdamW betas 0.9 / 0.95, no gradient
    checkpointing, no eval/saving/logging), with a fresh output folder runs/trl_<name>_<ns>."""
    return dict(
        output_dir=str(Path(args.work) / "runs" / f"trl_{name}_{time.time_ns()}"), per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1, max_steps=args.warmup + args.steps, learning_rate=lr, lr_scheduler_type="cosine",
        warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, optim="adamw_torch",
        bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True, logging_strategy="no", save_strategy="no",
        eval_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0, seed=SEED)


# --------------------------------------------------------------------------- child side


def time_engine_steps() -> list[float]:
    """Wrap `pipeline.training.initialize` (through which stages/sft.py, rm.py and dpo.py build their
    engine) so that every engine.step() appends a perf_counter timestamp to the returned list (our side
    of the SFT, RM and DPO benches)."""
    import pipeline.training as training

    times: list[float] = []
    original = training.initialize

    def timed_initialize(*a, **k):
        engine = original(*a, **k)
        step = engine.step

        def timed_step(*sa, **sk):
            out = step(*sa, **sk)
            times.append(time.perf_counter())
            return out

        engine.step = timed_step
        return engine

    training.initialize = timed_initialize
    return times


def run_ours_timed(cfg_dict: dict) -> list[float]:
    """Our side: `run_pipeline` on `cfg_dict` as users run it; the perf_counter at each engine.step()."""
    from pipeline.config import load_config
    from pipeline.runner import run_pipeline

    times = time_engine_steps()
    run_pipeline(load_config(cfg_dict))
    return times


def step_timer(first_begin: bool = False):
    """(times, callback): a transformers TrainerCallback appending the perf_counter at each step's end
    to `times`, and with `first_begin` also at the first step's beginning (so every step is timed)."""
    from transformers import TrainerCallback

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if first_begin and not times:
                times.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter())

    return times, Timer()


def train_in_order(trainer_cls, **kwargs) -> tuple[list[float], object]:
    """The peer's side: train `trainer_cls(**kwargs)` (a transformers / TRL Trainer) over its train_dataset
    in order (our epoch order, not a fresh shuffle: identical batches); (the perf_counter at each step's
    end, the trainer)."""
    from torch.utils.data import SequentialSampler

    times, timer = step_timer()

    class InOrder(trainer_cls):
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    trainer = InOrder(**kwargs, callbacks=[timer])
    trainer.train()
    return times, trainer


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rate(times: list[float], warmup: int) -> tuple[float, int]:
    """(seconds, steps) from the end of step `warmup` to the end of the last step."""
    if len(times) <= warmup:
        raise RuntimeError(f"only {len(times)} step times recorded, need more than warmup={warmup}")
    return times[-1] - times[warmup - 1] if warmup else times[-1] - times[0], len(times) - warmup if warmup else len(times) - 1


def emit(result: dict) -> None:
    result.setdefault("peak_rss_mib", peak_rss_mib())
    print("BENCH_RESULT " + json.dumps(result), flush=True)


# --------------------------------------------------------------------------- parent side


def parser(description: str, steps: int, warmup: int, repeats: int = 2, peer: str = "trl") -> argparse.ArgumentParser:
    """The common options; `peer` names the other side (trl, or hf for a plain Hugging Face reference)."""
    ap = argparse.ArgumentParser(description=description)
    ap.set_defaults(peer=peer)
    ap.add_argument("--child", choices=["ours", peer], help=argparse.SUPPRESS)
    ap.add_argument("--work", default="/tmp/rlhf_bench", help="folder for the model, data cache and run folders")
    ap.add_argument("--steps", type=int, default=steps, help="timed steps per run (after warm-up)")
    ap.add_argument("--warmup", type=int, default=warmup, help="untimed steps first")
    ap.add_argument("--repeats", type=int, default=repeats, help="A B pairs")
    ap.add_argument("--batch", type=int, default=8, help="micro-batch (prompts / pairs / sequences)")
    ap.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    ap.add_argument("--only", choices=["ours", peer], help="run one side only (no ratio)")
    return ap


def pass_to_child(args: argparse.Namespace, *names: str) -> None:
    """Hand the options `names` (dest names: peer_decoding is --peer-decoding) on to the children as given
    (those not given, None, are left to the children's defaults)."""
    args.extra = [x for name in names if getattr(args, name) is not None
                  for x in (f"--{name.replace('_', '-')}", str(getattr(args, name)))]


def run_child(script: str, side: str, args: argparse.Namespace, timeout: int = 900) -> dict:
    cmd = [sys.executable, script, "--child", side, "--work", args.work, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--batch", str(args.batch)] + list(getattr(args, "extra", []))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "TOKENIZERS_PARALLELISM": "false", "WANDB_DISABLED": "true",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)}
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=str(ROOT))
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            result = json.loads(line[len("BENCH_RESULT "):])
            result["wall_s"] = time.time() - t0
            return result
    raise RuntimeError(f"{side} run failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")


def ab(script: str, args: argparse.Namespace) -> dict[str, list[dict]]:
    """A B A B ... : `repeats` runs of each side, alternating, ours first."""
    sides = [args.only] if args.only else ["ours", args.peer]
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    for i in range(args.repeats):
        for side in sides:
            r = run_child(script, side, args)
            runs[side].append(r)
            print(f"  run {i + 1} {side:4s}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                         for k, v in r.items() if k != "notes"), flush=True)
    return runs


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.3g}"
    return f"{med:.3g} ({min(values):.3g}-{max(values):.3g})"


def spread_of(runs: list[dict], key: str) -> str:
    """spread() of `key` over one side's runs."""
    return spread([r[key] for r in runs])


def verdict(ratios_: list[float], target: float) -> str:
    """'target >= T: met' when every pair meets it, 'NOT met' when none does, else 'mixed'."""
    state = "met" if min(ratios_) >= target else "NOT met" if max(ratios_) < target else "mixed"
    return f"target >= {target}: {state}"


def ratios(runs: dict[str, list[dict]], key: str, peer: str = "trl") -> list[float]:
    """ours_i / theirs_i over the paired runs (higher = we are faster for a rate)."""
    if peer not in runs or "ours" not in runs:
        return []
    return [o[key] / t[key] for o, t in zip(runs["ours"], runs[peer]) if t.get(key)]


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def print_ratios(runs: dict[str, list[dict]], key: str, what: str, target: float = 1.0) -> list[float]:
    """ratios() of `key` against TRL, printed with their verdict when both sides ran."""
    r = ratios(runs, key)
    if r:
        print(f"ours/TRL {what}: {spread(r)}  ({verdict(r, target)})")
    return r


def rss_pair(ours: list[dict], theirs: list[dict]) -> str:
    """Median peak RSS of each side, 'ours / theirs' in MiB."""
    return f"{median(ours, 'peak_rss_mib'):.0f} / {median(theirs, 'peak_rss_mib'):.0f}"


def runs_done(args: argparse.Namespace) -> str:
    """The RESULTS.md column 'steps (warm-up) x pairs'."""
    return f"{args.steps} ({args.warmup}) x {args.repeats}"


def opt_shape(shape: dict, vocab: bool = True) -> str:
    """'OPT 4 layers, hidden 256, vocab 50272' for a write_opt shape."""
    text = f"OPT {shape['num_hidden_layers']} layers, hidden {shape['hidden_size']}"
    return f"{text}, vocab {shape['vocab_size']}" if vocab else text


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = lambda row: "  ".join(str(x).ljust(w) for x, w in zip(row, widths))  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def machine() -> str:
    import torch
    import transformers

    try:
        import trl

        trl_v = f", trl {trl.__version__}"
    except ImportError:
        trl_v = ""
    cpu = "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()} cores ({cpu}), {THREADS} thread per run, python {platform.python_version()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}{trl_v}")


def append_result(section: str, intro: str, header: list[str], row: list[str], path: Path = RESULTS) -> None:
    """Append `row` to the table under `## section` in RESULTS.md (creating the section, with
    `intro` and the header, at the end of the file the first time)."""
    date = datetime.date.today().isoformat()
    header, row = ["date"] + header, [date] + row
    line = "| " + " | ".join(str(x) for x in row) + " |"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    title = f"## {section}"
    if title not in text.split("\n"):
        block = [title, "", intro.strip(), "", "| " + " | ".join(header) + " |",
                 "|" + "|".join("---" for _ in header) + "|", line, ""]
        path.write_text(text.rstrip("\n") + "\n\n" + "\n".join(block))
        return
    lines = text.split("\n")
    start = lines.index(title)
    end = start + 1
    while end < len(lines) and not lines[end].startswith("## "):
        end += 1
    last_row = max((i for i in range(start, end) if lines[i].startswith("|")), default=None)
    if last_row is None:
        lines[end:end] = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|", line, ""]
    else:
        lines.insert(last_row + 1, line)
    path.write_text("\n".join(lines))
