"""Checkpoints that are checked before a resume: a damaged one (a file cut short, as a node crash or
a full disk leaves it) is passed over for the newest older one that is whole, with a warning; when
none is whole the stage stops with one line. A damaged manifest.json makes the stage run again. A
checkpoint written under another stage config is refused by key. A save that fills the disk stops
with one line and leaves every complete checkpoint as it was."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import run_cli
from safetensors import SafetensorError
from test_resume import timing_free, train_rows, weights

import pipeline.checkpoint as ckpt
import pipeline.resume as resume
from pipeline.checkpoint import LISTING, Checkpointer, CheckpointError, ConfigRecord, read_manifest, verify
from pipeline.config import ConfigError
from pipeline.tracking import MetricsLogger

ARGS = ["+experiment=demo", "run.stages=[sft]", "stage.sft.max_steps=6", "stage.sft.checkpoint.every_steps=2",
        "run.log_interval=1"]
MODEL_STATES = "actor/state/mp_rank_00_model_states.pt"


def cut_in_half(path: Path) -> tuple[int, int]:
    size = path.stat().st_size
    os.truncate(path, size // 2)
    return size, size // 2


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """An uninterrupted 6-step SFT run with checkpoints at steps 2, 4 and 6 (steps 4 and 6 kept)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    proc = run_cli(*ARGS, f"run.output_dir={out}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def copy_unfinished(finished: Path, to: Path, manifest: str | None = None) -> Path:
    """The finished run as if it was killed after its last checkpoint: no manifest (or a damaged one), no final."""
    shutil.copytree(finished, to)
    (to / "sft" / "manifest.json").unlink()
    shutil.rmtree(to / "sft" / "final")
    if manifest is not None:
        (to / "sft" / "manifest.json").write_text(manifest)
    return to


# ---------------------------------------------------------------------------- end to end


def test_saved_checkpoints_list_their_files(finished: Path):
    root = finished / "sft" / "checkpoints"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_000004", "step_000006"]
    for folder in root.glob("step_*"):
        listed = json.loads((folder / LISTING).read_text())["files"]
        on_disk = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != LISTING)
        assert sorted(listed) == on_disk and "state.json" in listed and MODEL_STATES in listed
        assert listed[MODEL_STATES]["bytes"] == (folder / MODEL_STATES).stat().st_size > 1_000_000
        assert all("sha256" in entry for entry in listed.values())  # every file of the tiny model is under 64 MiB
        assert verify(folder) is None
    assert not list(root.glob(".tmp_*"))


def test_damaged_latest_checkpoint_and_manifest_resume_from_the_one_before(finished: Path, tmp_path: Path):
    whole_manifest = (finished / "sft" / "manifest.json").read_text()
    out = copy_unfinished(finished, tmp_path / "run", manifest=whole_manifest[: len(whole_manifest) // 2])
    bad = out / "sft" / "checkpoints" / "step_000006"
    size, cut = cut_in_half(bad / MODEL_STATES)

    proc = run_cli(*ARGS, f"run.output_dir={out}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"warning: {out / 'sft' / 'manifest.json'} is damaged" in proc.stderr
    assert "treating sft as unfinished" in proc.stderr
    assert f"warning: [sft] checkpoint {bad} is damaged ({MODEL_STATES} is {cut} bytes, {size} expected)" in proc.stderr
    assert f"[sft] resumed from {out / 'sft' / 'checkpoints' / 'step_000004'} at step 4" in proc.stdout
    # The same steps and the same final weights as the uninterrupted run; the damaged checkpoint written anew.
    assert timing_free(train_rows(out / "sft" / "metrics.jsonl")) == timing_free(train_rows(finished / "sft" / "metrics.jsonl"))
    a, b = weights(out / "sft" / "final"), weights(finished / "sft" / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "sft" / "manifest.json").read_text())["status"] == "done"
    assert verify(bad) is None and (bad / MODEL_STATES).stat().st_size == size


def test_no_whole_checkpoint_stops_with_one_line_and_deletes_nothing(finished: Path, tmp_path: Path):
    out = copy_unfinished(finished, tmp_path / "run")
    root = out / "sft" / "checkpoints"
    cuts = {name: cut_in_half(root / name / MODEL_STATES) for name in ("step_000004", "step_000006")}

    proc = run_cli(*ARGS, f"run.output_dir={out}")
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = last_line(proc.stderr)
    assert line.startswith(f"error: no checkpoint of sft in {root} can be resumed (step_000006: {MODEL_STATES} is ")
    assert f"step_000004: {MODEL_STATES} is {cuts['step_000004'][1]} bytes, {cuts['step_000004'][0]} expected" in line
    assert line.endswith(f"run.resume=never starts sft over in {out / 'sft'}")
    assert "Traceback" not in proc.stderr
    for name, (_, cut) in cuts.items():
        assert (root / name / MODEL_STATES).stat().st_size == cut
    assert not (out / "sft" / "manifest.json").exists()


def _mount_tmpfs(path: Path, size: int) -> None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a full disk needs a small tmpfs: not root here (the save errors are tested without one below)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")


def test_disk_full_during_a_save_stops_with_one_line_and_keeps_the_complete_ones(finished: Path, tmp_path: Path):
    """The real thing: checkpoints on a tmpfs with room for two of them; the third save fills it."""
    one = sum(p.stat().st_size for p in (finished / "sft" / "checkpoints" / "step_000006").rglob("*") if p.is_file())
    out = tmp_path / "run"
    root = out / "sft" / "checkpoints"
    root.mkdir(parents=True)
    _mount_tmpfs(root, int(2.5 * one))
    try:
        proc = run_cli(*ARGS, f"run.output_dir={out}")
        assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
        line = last_line(proc.stderr)
        assert line.startswith(f"error: sft checkpoint step_000006 not saved: no space left on device writing "
                               f"{root / '.tmp_step_000006'} (")
        assert line.endswith(f"the last complete checkpoint, {root / 'step_000004'}, is kept; "
                             f"free some space and run the same command to resume")
        assert "Traceback" not in proc.stderr
        assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000002", "step_000004"]
        assert (root / "latest").read_text() == "step_000004"
        assert verify(root / "step_000002") is None and verify(root / "step_000004") is None
        assert not (out / "sft" / "manifest.json").exists() and not (out / "sft" / "final").exists()
    finally:
        subprocess.run(["umount", str(root)], check=False)


# ---------------------------------------------------------------------------- in process


class Holder:
    """A per-rank tensor state, as the EMA is (state_dict / load_state_dict)."""

    def __init__(self, value: float):
        self.tensor = torch.full((4, 4), value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"t": self.tensor}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensor = tensors["t"]


class FailingEngine:
    """An engine whose save_checkpoint writes part of its file, then fails as torch or the OS does."""

    def __init__(self, error: BaseException):
        self.error = error

    def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool) -> None:
        os.makedirs(f"{save_dir}/{tag}")
        with open(f"{save_dir}/{tag}/mp_rank_00_model_states.pt", "wb") as fh:
            fh.write(b"\0" * 4096)
        raise self.error


def record(lr: float) -> ConfigRecord:
    sections = {"model.actor": "tiny-opt", "stage.sft": {"optim": {"learning_rate": lr, "betas": [0.9, 0.95]},
                                                         "max_steps": 6}, "run.seed": 1234}
    return ConfigRecord(hash=f"h{lr}", sections=sections)


def resume_cfg(out: Path, mode: str = "auto") -> SimpleNamespace:
    return SimpleNamespace(run=SimpleNamespace(resume=mode), output_dir=out)


def saved(tmp_path: Path, steps=(2, 4), config: ConfigRecord | None = None) -> Checkpointer:
    saver = Checkpointer(tmp_path / "sft", every_steps=2, every_minutes=0, keep=5, config=config)
    for step in steps:
        saver.save(step, {}, {"epoch": 0}, {"ema": Holder(float(step))})
    return saver


def test_verify_names_the_damaged_file(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(ckpt, "HASHED_UP_TO", 100)  # the 64-byte-plus tensors file gets its size only
    folder = saved(tmp_path, steps=(2,)).root / "step_000002"
    listed = json.loads((folder / LISTING).read_text())["files"]
    assert sorted(listed) == ["ema_rank0.safetensors", "rng_rank0.json", "rng_rank0.safetensors", "state.json"]
    assert "sha256" in listed["state.json"] and "sha256" not in listed["ema_rank0.safetensors"]
    assert verify(folder) is None

    state = (folder / "state.json").read_bytes()
    (folder / "state.json").write_bytes(state.replace(b'"step": 2', b'"step": 8'))  # same size, other content
    assert verify(folder) == (f"state.json has {len(state)} bytes as expected but not the content that was written "
                              f"(sha256 differs)")
    (folder / "state.json").write_bytes(state)
    ema = folder / "ema_rank0.safetensors"
    size, cut = cut_in_half(ema)
    assert verify(folder) == f"ema_rank0.safetensors is {cut} bytes, {size} expected"
    ema.unlink()
    assert verify(folder) == "ema_rank0.safetensors is missing"
    (folder / LISTING).write_text('{"files": {"st')
    assert verify(folder).startswith(f"{LISTING} is unreadable (JSONDecodeError")
    # Written before listings: accepted as before, as long as state.json is there.
    (folder / LISTING).unlink()
    assert verify(folder) is None
    (folder / "state.json").unlink()
    assert verify(folder) == "state.json is missing"


def test_resume_falls_back_past_a_damaged_checkpoint_to_the_newest_whole_one(tmp_path: Path, capsys):
    saver = saved(tmp_path, steps=(2, 4, 6))
    root = saver.root
    cut_in_half(root / "step_000006" / "ema_rank0.safetensors")
    (root / "step_000004" / "rng_rank0.json").unlink()
    logger = MetricsLogger(tmp_path / "sft", "sft", True, loggers=[])
    holder = Holder(0.0)
    state = resume.resume_stage(resume_cfg(tmp_path), saver, "sft", logger, {}, {"ema": holder})
    assert state["step"] == 2 and torch.equal(holder.tensor, torch.full((4, 4), 2.0))
    err = capsys.readouterr().err
    assert f"warning: [sft] checkpoint {root / 'step_000006'} is damaged (ema_rank0.safetensors is " in err
    assert f"warning: [sft] checkpoint {root / 'step_000004'} is damaged (rng_rank0.json is missing)" in err

    # An explicit run.resume falls back to older steps only, never to a later one.
    assert resume.resume_point(resume_cfg(tmp_path, str(root / "step_000004")), saver) == root / "step_000002"
    (root / "step_000002" / "state.json").unlink()
    with pytest.raises(CheckpointError) as stop:
        resume.resume_point(resume_cfg(tmp_path), saver)
    assert str(stop.value) == (f"no checkpoint of sft in {root} can be resumed (step_000006: ema_rank0.safetensors is "
                               f"{(root / 'step_000006' / 'ema_rank0.safetensors').stat().st_size} bytes, "
                               f"{json.loads((root / 'step_000006' / LISTING).read_text())['files']['ema_rank0.safetensors']['bytes']}"
                               f" expected; step_000004: rng_rank0.json is missing; step_000002: state.json is missing); "
                               f"run.resume=never starts sft over in {tmp_path / 'sft'}")
    assert sorted(p.name for p in root.glob("step_*")) == ["step_000002", "step_000004", "step_000006"]


def test_ranks_that_choose_different_checkpoints_stop(tmp_path: Path, monkeypatch):
    saver = saved(tmp_path, steps=(2,))
    assert resume.resume_point(resume_cfg(tmp_path), saver) == saver.root / "step_000002"
    monkeypatch.setattr(resume, "all_reduce_mean", lambda values, weight: [values[0] / 2])  # another rank chose none
    with pytest.raises(CheckpointError, match=r"the ranks see different checkpoints in .* \(this rank, 0, chose step_000002\)"):
        resume.resume_point(resume_cfg(tmp_path), saver)


def test_a_checkpoint_of_another_config_is_refused_by_key(tmp_path: Path, capsys):
    saved(tmp_path, steps=(2,), config=record(1e-3))
    logger = MetricsLogger(tmp_path / "sft", "sft", True, loggers=[])
    same = Checkpointer(tmp_path / "sft", 2, 0, 5, config=record(1e-3))
    assert resume.resume_stage(resume_cfg(tmp_path), same, "sft", logger, {}, {"ema": Holder(0.0)})["step"] == 2

    other = Checkpointer(tmp_path / "sft", 2, 0, 5, config=record(2e-3))
    with pytest.raises(ConfigError) as refused:
        resume.resume_stage(resume_cfg(tmp_path), other, "sft", logger, {}, {"ema": Holder(0.0)})
    assert str(refused.value) == (f"{other.root / 'step_000002'} was written under another sft config "
                                  f"(stage.sft.optim.learning_rate 0.001 -> 0.002): set it back to resume from it, "
                                  f"or run.resume=never to start sft over")
    moved = ConfigRecord("h-other", {**record(1e-3).sections, "model.dropout": 0.1})
    with pytest.raises(ConfigError, match=r"\(model.dropout \(absent\) -> 0.1\)"):
        resume.check_written_under(other.root / "step_000002", moved, "sft")

    # Written before checkpoints recorded their config: resumed, with a warning.
    old = other.root / "step_000002"
    (old / "config.json").unlink()
    (old / LISTING).unlink()
    capsys.readouterr()
    assert resume.resume_stage(resume_cfg(tmp_path), other, "sft", logger, {}, {"ema": Holder(0.0)})["step"] == 2
    assert f"warning: [sft] checkpoint {old} records no config (written by an earlier version)" in capsys.readouterr().err


@pytest.mark.parametrize("error, full", [
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"), True),
    (RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"), True),
    (SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"), True),
    (OSError(errno.ENOSPC, "No space left on device"), False),
])
def test_a_save_that_fills_the_disk_stops_with_one_line(tmp_path: Path, monkeypatch, error, full):
    """torch and safetensors report a full disk without errno: the free space says it (here faked
    where the error has no errno, real free space where it has ENOSPC)."""
    saver = saved(tmp_path, steps=(2, 4))
    before = {p: p.read_bytes() for p in saver.root.rglob("*") if p.is_file()}
    if full:
        monkeypatch.setattr(ckpt, "_free_bytes", lambda folder: 12 * 2**20)
    with pytest.raises(CheckpointError) as stop:
        saver.save(6, {"actor": FailingEngine(error)}, {"epoch": 0})
    tmp = saver.root / ".tmp_step_000006"
    assert str(stop.value).startswith(f"sft checkpoint step_000006 not saved: no space left on device writing {tmp} (")
    assert str(stop.value).endswith(f"MiB free); the last complete checkpoint, {saver.root / 'step_000004'}, is kept; "
                                    f"free some space and run the same command to resume")
    assert not tmp.exists()
    assert {p: p.read_bytes() for p in saver.root.rglob("*") if p.is_file()} == before


def test_a_save_failing_for_another_reason(tmp_path: Path):
    saver = saved(tmp_path, steps=(2,))
    with pytest.raises(CheckpointError, match=r"not saved: writing .*\.tmp_step_000004 failed \(PermissionError: "
                                              r"\[Errno 13\] Permission denied\); the last complete checkpoint, "
                                              r".*step_000002, is kept; fix that"):
        saver.save(4, {"actor": FailingEngine(PermissionError(errno.EACCES, "Permission denied"))}, {})
    with pytest.raises(RuntimeError, match="^a bug$"):  # not the disk: the error itself, with its traceback
        saver.save(4, {"actor": FailingEngine(RuntimeError("a bug"))}, {})
    assert sorted(p.name for p in saver.root.iterdir()) == ["latest", "step_000002"]


def test_a_save_drops_later_folders_of_an_abandoned_attempt(tmp_path: Path):
    """After run.resume=never (or a fall-back past a damaged checkpoint) the folders of later steps
    are an abandoned attempt's: they go, and `keep` counts this run's own."""
    saver = saved(tmp_path, steps=(2, 4, 6))
    saver.keep = 2
    saver.save(2, {}, {}, {"ema": Holder(9.0)})
    assert sorted(p.name for p in saver.root.glob("step_*")) == ["step_000002"]
    saver.save(4, {}, {})
    saver.save(6, {}, {})
    assert sorted(p.name for p in saver.root.glob("step_*")) == ["step_000004", "step_000006"]
    assert saver.folders()[0].name == "step_000006"


def test_a_damaged_manifest_reads_as_unfinished(tmp_path: Path, capsys):
    (tmp_path / "manifest.json").write_text('{"status": "done", "config_ha')
    assert read_manifest(tmp_path) is None
    assert capsys.readouterr().err.startswith(f"warning: {tmp_path / 'manifest.json'} is damaged (JSONDecodeError: ")
    (tmp_path / "manifest.json").write_bytes(b"\xff\xfe")
    assert read_manifest(tmp_path) is None and "UnicodeDecodeError" in capsys.readouterr().err
    (tmp_path / "manifest.json").write_text("[1, 2]")
    assert read_manifest(tmp_path) is None and "(not a JSON object)" in capsys.readouterr().err


def test_the_run_refuses_a_checkpoint_written_under_another_stage_config(finished: Path, tmp_path: Path):
    """As when another run wrote into this folder: the stage's marker says the new config, its checkpoints
    were written under the old one. The resume is refused naming the key, and nothing is deleted."""
    from test_config import compose_with

    from pipeline.config import finalize, load_config
    from pipeline.planner import plan_run
    from pipeline.runner import stage_hash

    run = copy_unfinished(finished, tmp_path / "run")
    changed = ["stage.sft.optim.learning_rate=0.001"]
    cfg = load_config(compose_with("hardware=cpu", *ARGS, f"run.output_dir={run}", *changed))
    cfg = finalize(cfg, plan_run(cfg))  # the run hashes its config with the plan's choices in
    (run / "sft" / "config_hash").write_text(stage_hash(cfg, "sft"))
    before = sorted(p.name for p in (run / "sft" / "checkpoints").iterdir())
    proc = run_cli(*ARGS, f"run.output_dir={run}", *changed)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = last_line(proc.stderr)
    assert line.startswith("error: ") and "stage.sft.optim.learning_rate" in line and "run.resume=never" in line, line
    assert sorted(p.name for p in (run / "sft" / "checkpoints").iterdir()) == before
