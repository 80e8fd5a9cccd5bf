"""Peak RSS of the data layer per rank, for a large preference set, before and after a change.

    python bench/data_memory.py --before /tmp/data_before        # 1M pairs; 25-40 min on 2 cores
    python bench/data_memory.py --pairs 100000                   # this checkout only, a quick look

`--before DIR` is another checkout of this repository (`git worktree add DIR <commit>`); without
it only this checkout is measured. The pairs are synthetic (prompt / chosen / rejected texts of
random English words, 8-40 words each) in one local jsonl with a field mapping, written once under
`--work`. Every dataset row goes to one stage (`data_blend.split=0,1,0`, the reward-model stage:
two token sequences per pair, the largest examples of the three stages).

Each measurement is a fresh process that imports `pipeline` from the checkout under test and calls
`load_stage_data` as a stage does:
  build: rank 0 with an empty cache (read the file, tokenize, write the Arrow cache, load it);
  read:  a rank that finds the cache built (what every other rank does; a resumed run too).
Figures: the process's peak RSS (VmHWM), the same less the RSS before load_stage_data (imports,
datasets included, and tokenizer; "data layer"), anonymous vs file-backed resident memory at the end (file-backed pages
of a memory-mapped cache are the page cache, shared by every rank of the node), the largest
tokenizer worker's peak (build with several processes), and the time. After the load, `read` also
walks one epoch of this rank's batches (`epoch_batches`, micro-batch 8) and reports RSS after it.
It prints a table and the before / after ratios (bench/RESULTS.md, "Data layer memory per rank").
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OPT_TOKENIZER = ROOT.parent / "shared" / "data" / "tokenizers" / "opt"
FIELDS = {"prompt": "question", "chosen": "good", "rejected": "bad"}
WORDS = ("the a of to and in is it you that he was for on are with as his they be at one have this from or had by "
         "word but what some we can out other were all there when up use your how said an each she which do their "
         "time if will way about many then them write would like so these her long make thing see him two has look "
         "more day could go come did number sound no most people my over know water than call first who may down "
         "side been now find any new work part take get place made live where after back little only round man year "
         "came show every good me give our under name very through just form sentence great think say help low line "
         "differ turn cause much mean before move right boy old too same tell does set three want air well also play "
         "small end put home read hand port large spell add even land here must big high such follow act why ask men "
         "change went light kind off need house picture try us again animal point mother world near build self earth "
         "father head stand own page should country found answer school grow study still learn plant cover food sun "
         "four between state keep eye never last let thought city tree cross farm hard start might story saw far sea "
         "draw left late run while press close night real life few north open seem together next white children "
         "begin got walk example ease paper group always music those both mark often letter until mile river car feet "
         "care second book carry took science eat room friend began idea fish mountain stop once base hear horse cut "
         "sure watch color face wood main enough plain girl usual young ready above ever red list though feel talk "
         "bird soon body dog family direct pose leave song measure door product black short numeral class wind "
         "question happen complete ship area half rock order fire south problem piece told knew pass since top whole "
         "king space heard best hour better true during hundred five remember step early hold west ground interest "
         "reach fast verb sing listen six table travel less morning ten simple several vowel toward war lay against "
         "pattern slow center love person money serve appear road map rain rule govern pull cold notice voice unit "
         "power town fine certain fly fall lead cry dark machine note wait plan figure star box noun field rest "
         "correct able pound done beauty drive stood contain front teach week final gave green oh quick develop "
         "ocean warm free minute strong special mind behind clear tail produce fact street inch multiply nothing "
         "course stay wheel full force blue object decide surface deep moon island foot system busy test record "
         "boat common gold possible plane stead dry wonder laugh thousand ago ran check game shape equate hot miss "
         "brought heat snow tire bring yes distant fill east paint language among").split()


def write_pairs(path: Path, n: int, seed: int = 0) -> Path:
    """n preference pairs {"question", "good", "bad"}, 8-40 random words each (deterministic)."""
    if path.exists():
        return path
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choices(WORDS, k=rng.randint(lo, hi)))

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as fh:
        for _ in range(n):
            fh.write(json.dumps({"question": f"{text(8, 24)} ?", "good": text(8, 40), "bad": text(8, 40)}) + "\n")
    tmp.replace(path)
    return path


def status_mib() -> dict[str, float]:
    """VmHWM (peak), VmRSS, RssAnon, RssFile of this process, in MiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[name] = int(value.split()[0]) / 1024
    return out


# --------------------------------------------------------------------------- child


def child(args: argparse.Namespace) -> None:
    """One measurement; prints one JSON line. `pipeline` comes from PYTHONPATH (the checkout under test)."""
    from functools import partial

    import datasets  # noqa: F401 - imported before the baseline: both sides use it, it is not data
    from transformers import AutoTokenizer

    import pipeline
    from pipeline.config import load_config
    from pipeline.data import load_stage_data
    from pipeline.data.collate import collate_pairs
    from pipeline.training import epoch_batches

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    cfg = load_config({"run": {"output_dir": str(args.out)}, "data_blend": {
        "datasets": [{"name": "local", "path": str(args.pairs_file), "fields": FIELDS}], "split": "0,1,0"}})
    before = status_mib()
    t0 = time.time()
    data = load_stage_data(cfg, args.stage, tokenizer)
    seconds = time.time() - t0
    loaded = status_mib()
    result = {"code": str(Path(pipeline.__file__).parent.parent), "role": args.child, "cache": data.cache,
              "train": len(data.train), "eval": len(data.eval), "seconds": seconds, "baseline_mib": before["VmRSS"],
              "peak_mib": loaded["VmHWM"], "data_mib": loaded["VmHWM"] - before["VmRSS"],
              "anon_mib": loaded["RssAnon"], "file_mib": loaded["RssFile"],
              "workers_peak_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}
    if args.child == "read":
        t0 = time.time()
        collate = partial(collate_pairs, pad_id=tokenizer.pad_token_id)
        batches = sum(1 for _ in epoch_batches(data.train, 8, collate, 1234, 0))
        after = status_mib()
        result.update(epoch_batches=batches, epoch_seconds=time.time() - t0, epoch_peak_mib=after["VmHWM"],
                      epoch_anon_mib=after["RssAnon"], epoch_file_mib=after["RssFile"])
    print(json.dumps(result), flush=True)


# --------------------------------------------------------------------------- parent


def measure(code: Path, role: str, args: argparse.Namespace, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", role, "--out", str(out), "--stage", args.stage,
           "--pairs-file", str(args.pairs_file), "--tokenizer", args.tokenizer]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(out.parent))
    if proc.returncode != 0:
        sys.exit(f"{code} {role} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(result["code"]).resolve() == code.resolve(), f"imported pipeline from {result['code']}, not {code}"
    assert result["cache"] == ("built" if role == "build" else "hit"), result
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=1_000_000)
    p.add_argument("--before", type=Path, help="another checkout to compare with (git worktree add DIR <commit>)")
    p.add_argument("--stage", default="rm", choices=["sft", "rm", "ppo"])
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_data_memory"))
    p.add_argument("--tokenizer", default=str(OPT_TOKENIZER) if OPT_TOKENIZER.exists() else None)
    p.add_argument("--child", choices=["build", "read"], help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--pairs-file", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    if args.tokenizer is None:  # no shared data: the demo's word-level tokenizer
        sys.path.insert(0, str(ROOT))
        from pipeline.data.builtin import save_tokenizer

        args.tokenizer = str(save_tokenizer(args.work / "tokenizer"))
    args.pairs_file = write_pairs(args.work / f"pairs-{args.pairs}.jsonl", args.pairs)
    sides = ([("before", args.before)] if args.before else []) + [("after", ROOT)]
    results: dict[str, dict[str, dict]] = {}
    for side, code in sides:
        out = args.work / side / "run"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        results[side] = {role: measure(code, role, args, out) for role in ("build", "read")}
        shutil.rmtree(out, ignore_errors=True)

    header = ["side", "role", "examples", "peak RSS MiB", "data layer MiB", "anon / file MiB at end",
              "workers peak MiB", "seconds", "after one epoch: peak, anon / file MiB"]
    print(f"{args.pairs} pairs, stage {args.stage}, tokenizer {Path(args.tokenizer).name}")
    print(" | ".join(header))
    for side, by_role in results.items():
        for role, r in by_role.items():
            epoch = (f"{r['epoch_peak_mib']:.0f}, {r['epoch_anon_mib']:.0f} / {r['epoch_file_mib']:.0f}"
                     if "epoch_peak_mib" in r else "-")
            print(f"{side} | {role} | {r['train']}+{r['eval']} | {r['peak_mib']:.0f} | {r['data_mib']:.0f} | "
                  f"{r['anon_mib']:.0f} / {r['file_mib']:.0f} | {r['workers_peak_mib']:.0f} | {r['seconds']:.0f} | {epoch}")
    if "before" in results:
        for role in ("build", "read"):
            b, a = results["before"][role], results["after"][role]
            print(f"{role}: peak RSS before / after = {b['peak_mib'] / a['peak_mib']:.1f}x, "
                  f"data layer before / after = {b['data_mib'] / max(a['data_mib'], 1):.1f}x")


if __name__ == "__main__":
    main()
