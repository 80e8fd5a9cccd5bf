"""Data layer: adapters, stage splits, weighted blends, cache (memory-mapped), errors, PTX blocks.

Real-file tests read ../shared/data (hh-rlhf, OPT tokenizer, tinyshakespeare) and skip when it
is absent; hub-format adapters are tested on local files written in each hub dataset's columns.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import shutil
from functools import partial
from pathlib import Path

import pytest
from conftest import run_cli

import pipeline.data
from pipeline.config import ConfigError, load_config
from pipeline.data import (
    DataError,
    Examples,
    blend_counts,
    format_prompt,
    load_ptx_data,
    load_stage_data,
    read_source,
    split_indices,
)
from pipeline.data.sources import Record
from pipeline.data_schema import DatasetSpec

SHARED = Path(__file__).parents[2] / "shared" / "data"
HH = SHARED / "hh-rlhf"
OPT = SHARED / "tokenizers" / "opt"
needs_hh = pytest.mark.skipif(not (HH / "helpful-base" / "test.jsonl.gz").exists() or not OPT.exists(),
                              reason=f"real hh-rlhf / OPT tokenizer not found under {SHARED}")


@pytest.fixture(scope="module")
def opt_tok():
    if not OPT.exists():
        pytest.skip(f"OPT tokenizer not found at {OPT}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(OPT))


@pytest.fixture(scope="module")
def builtin_tok(tmp_path_factory):
    from transformers import AutoTokenizer

    from pipeline.data.builtin import save_tokenizer

    return AutoTokenizer.from_pretrained(str(save_tokenizer(tmp_path_factory.mktemp("tok"))))


def cfg_of(tmp_path, datasets, **blend):
    return load_config({"run": {"output_dir": str(tmp_path / "run")},
                        "data_blend": {"datasets": datasets, **blend}})


def write_jsonl(path: Path, rows, gz: bool = False) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text)
    return path


def hh_row(q: str, a: str, b: str) -> dict:
    return {"chosen": f"\n\nHuman: {q}\n\nAssistant: {a}", "rejected": f"\n\nHuman: {q}\n\nAssistant: {b}"}


# --------------------------------------------------------------------------- splits and blends


def test_split_indices_disjoint_cover_and_deterministic():
    n = 1003
    parts = [split_indices(n, "2,4,4", s, 7, "ds") for s in ("sft", "rm", "ppo")]
    assert [len(p) for p in parts] == [201, 401, 401]
    assert sorted(sum(parts, [])) == list(range(n))  # disjoint and complete
    assert parts == [split_indices(n, "2,4,4", s, 7, "ds") for s in ("sft", "rm", "ppo")]
    assert parts[0] != split_indices(n, "2,4,4", "sft", 8, "ds")  # another seed, another split
    assert parts[0] != split_indices(n, "2,4,4", "sft", 7, "other")  # per dataset
    assert split_indices(n, "0,1,0", "sft", 7, "ds") == []


def test_blend_counts():
    assert blend_counts([100, 50], [None, None]) == [100, 50]
    assert blend_counts([100, 50], [1.0, 1.0]) == [75, 75]
    assert blend_counts([300, 100], [3.0, 1.0]) == [300, 100]
    assert blend_counts([100, 0], [1.0, 1.0]) == [100, 0]


@needs_hh
def test_stage_slices_disjoint_deterministic_on_hh(tmp_path, opt_tok):
    spec = [{"name": "hh-rlhf", "path": str(HH / "helpful-base" / "test.jsonl.gz"), "max_records": 400}]
    cfg = cfg_of(tmp_path, spec, max_prompt_len=1024)
    prompts = {}
    for stage in ("sft", "rm", "ppo"):
        data = load_stage_data(cfg, stage, opt_tok)
        s = data.stats[0]
        assert s.read == 400 and s.read == sum(s.dropped.values()) + s.other_stages + s.kept
        key = {"sft": "input_ids", "rm": "chosen_input_ids", "ppo": "prompt_input_ids"}[stage]
        prompts[stage] = {tuple(e[key][: e.get("prompt_len", len(e[key]))]) for e in [*data.train, *data.eval]}
    # 2,4,4 of the 400 valid-ish records; disjoint up to prompts that hh-rlhf repeats.
    assert len(prompts["sft"]) > 60 and len(prompts["rm"]) > 130
    assert len(prompts["sft"] & prompts["rm"]) <= 2 and len(prompts["rm"] & prompts["ppo"]) <= 2
    # Same seed, fresh cache: the same examples in the same order; another seed: a different split.
    again = load_stage_data(cfg_of(tmp_path / "b", spec, max_prompt_len=1024), "rm", opt_tok)
    first = load_stage_data(cfg, "rm", opt_tok)
    assert again.cache == "built" and first.cache == "hit" and list(again.train) == list(first.train)
    other = load_config({"run": {"output_dir": str(tmp_path / "c"), "seed": 99},
                         "data_blend": {"datasets": spec, "max_prompt_len": 1024}})
    assert list(load_stage_data(other, "rm", opt_tok).train) != list(first.train)


@needs_hh
def test_weighted_blend_proportions(tmp_path, opt_tok):
    specs = [{"name": "hh-rlhf", "path": str(HH / "helpful-base" / "test.jsonl.gz"), "max_records": 600, "weight": 3},
             {"name": "hh-rlhf", "path": str(HH / "helpful-online" / "test.jsonl.gz"), "max_records": 600, "weight": 1}]
    data = load_stage_data(cfg_of(tmp_path, specs, max_prompt_len=1024, split="1,1,1"), "ppo", opt_tok)
    base, online = data.stats
    total = len(data.train)
    assert total == base.train + online.train  # the blend keeps the total
    assert base.blended + online.blended == total
    assert abs(base.blended / total - 0.75) < 0.01 and abs(online.blended / total - 0.25) < 0.01
    assert f"in blend {base.blended} ({100 * base.blended / total:.1f}%)" in data.summary("ppo")


def test_weights_all_or_none(tmp_path):
    with pytest.raises(ConfigError, match=r"data_blend.datasets\[1\].weight=null"):
        cfg_of(tmp_path, [{"name": "builtin", "weight": 2}, {"name": "builtin"}])


# --------------------------------------------------------------------------- cache


@needs_hh
def test_cache_hit_miss_and_no_pickle(tmp_path, opt_tok, builtin_tok):
    src = tmp_path / "hh.jsonl.gz"
    shutil.copy(HH / "helpful-online" / "test.jsonl.gz", src)
    spec = [{"name": "hh-rlhf", "path": str(src), "max_records": 200}]
    cfg = cfg_of(tmp_path, spec)
    first = load_stage_data(cfg, "rm", opt_tok)
    assert first.cache == "built"
    second = load_stage_data(cfg, "rm", opt_tok)
    assert second.cache == "hit" and second.cache_path == first.cache_path and list(second.train) == list(first.train)
    assert "cache hit" in second.summary("rm")
    files = [p for p in Path(first.cache_path).rglob("*") if p.is_file()]
    assert files and all(p.suffix in (".arrow", ".json") for p in files)  # Arrow + JSON, no pickle
    # Anything that shapes the examples makes a new entry.
    for changed in (cfg_of(tmp_path, spec, max_prompt_len=128), cfg_of(tmp_path, spec, max_answer_len=64),
                    cfg_of(tmp_path, spec, split="1,1,1"), cfg_of(tmp_path, [{**spec[0], "max_records": 199}])):
        assert load_stage_data(changed, "rm", opt_tok).cache == "built"
    assert load_stage_data(cfg, "rm", builtin_tok).cache == "built"  # another tokenizer
    write_jsonl(src, [hh_row("hi", "hello there", "go away")] * 5, gz=True)  # the source changed
    rebuilt = load_stage_data(cfg, "sft", opt_tok)
    assert rebuilt.cache == "built" and rebuilt.stats[0].read == 5
    assert load_stage_data(cfg, "sft", opt_tok).cache == "hit"
    # cache_dir from the config.
    other = cfg_of(tmp_path, spec, cache_dir=str(tmp_path / "elsewhere"))
    assert load_stage_data(other, "ppo", opt_tok).cache_path.startswith(str(tmp_path / "elsewhere"))


# --------------------------------------------------------------------------- bad data


def test_malformed_json_names_file_and_line(tmp_path, builtin_tok):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(hh_row("a", "b", "c")) + "\n\n" + '{"chosen": "x", \n')
    with pytest.raises(DataError, match=rf"{path}:3: malformed JSON"):
        load_stage_data(cfg_of(tmp_path, [{"name": "hh-rlhf", "path": str(path)}]), "sft", builtin_tok)


def test_missing_field_names_field_file_and_record(tmp_path, builtin_tok):
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": "q1", "good": "a", "bad": "b"},
                                              {"question": "q2", "bad": "b"}])
    cfg = cfg_of(tmp_path, [{"name": "local", "path": str(path),
                             "fields": {"prompt": "question", "chosen": "good", "rejected": "bad"}}])
    with pytest.raises(DataError) as err:
        load_stage_data(cfg, "rm", builtin_tok)
    msg = str(err.value)
    assert f"{path}:2" in msg and "'good'" in msg and '"question": "q2"' in msg
    assert "data_blend.datasets[0].fields" in msg
    with pytest.raises(DataError, match=r"no such file or folder"):
        load_stage_data(cfg_of(tmp_path, [{"name": "hh-rlhf", "path": str(tmp_path / "nope.jsonl")}]), "sft", builtin_tok)
    with pytest.raises(DataError, match=r"data_blend.datasets\[0\].name=nonsense: unknown dataset"):
        load_stage_data(cfg_of(tmp_path, [{"name": "nonsense"}]), "sft", builtin_tok)


@needs_hh
def test_empty_after_filtering_reports_counts(tmp_path, opt_tok):
    cfg = cfg_of(tmp_path, [{"name": "hh-rlhf", "path": str(HH / "helpful-base" / "test.jsonl.gz"),
                             "max_records": 100}], max_prompt_len=5)
    with pytest.raises(DataError) as err:
        load_stage_data(cfg, "ppo", opt_tok)
    msg = str(err.value)
    assert "no ppo training examples" in msg and "read 100 records" in msg and "'prompt too long':" in msg
    assert "data_blend.max_prompt_len=5" in msg


@needs_hh
@pytest.mark.parametrize("part", ["helpful-base", "helpful-online"])
def test_hh_chosen_equal_rejected_dropped_and_counted(tmp_path, opt_tok, part):
    data = load_stage_data(cfg_of(tmp_path, [{"name": "hh-rlhf", "path": str(HH / part / "test.jsonl.gz")}]),
                           "rm", opt_tok)
    s = data.stats[0]
    assert s.read == {"helpful-base": 2354, "helpful-online": 1137}[part]
    assert s.dropped["chosen == rejected"] == 2
    assert s.read == sum(s.dropped.values()) + s.other_stages + s.kept
    assert all(e["chosen_input_ids"] != e["rejected_input_ids"] for e in [*data.train, *data.eval])
    summary = data.summary("rm")
    assert "chosen == rejected 2" in summary and f"read {s.read}" in summary and len(summary.splitlines()) <= 24


PREF_FIELDS = {"prompt": "q", "answer_a": "x", "answer_b": "y", "label": "pref"}


def prefs(path: Path, labels) -> Path:
    return write_jsonl(path, [{"q": f"what color is the cat {i} ?", "x": f"the cat is red {i} .",
                               "y": f"the dog {i}", "pref": label} for i, label in enumerate(labels)])


def test_unmapped_label_stops_with_value_file_and_line(tmp_path):
    # -1/+1 labels with a_wins/b_wins left at their defaults (0/1): the first -1 stops the run.
    path = prefs(tmp_path / "pref.jsonl", [1, 1.0, -1, 0])
    with pytest.raises(DataError) as err:
        read_source(DatasetSpec("local", path=str(path), fields=PREF_FIELDS), 0, "data_blend.datasets[0]")
    msg = str(err.value)
    assert msg.startswith(f"{path}:3: label pref=-1 is not mapped") and "\n" not in msg
    assert "set data_blend.datasets[0].fields.a_wins" in msg and "data_blend.datasets[0].on_unmapped_label=drop" in msg
    # Mapped to the data: -1 = answer_a won, 1 (1.0 in a float column) = answer_b, 0 = a tie, dropped as such.
    src = read_source(DatasetSpec("local", path=str(path), fields={**PREF_FIELDS, "a_wins": "-1", "b_wins": "1",
                                                                    "tie": "0"}), 0)
    assert [(r.chosen, r.rejected) for r in src.train] == [("the dog 0", "the cat is red 0 ."),
                                                           ("the dog 1", "the cat is red 1 ."),
                                                           ("the cat is red 2 .", "the dog 2")]
    assert src.dropped == {"tie": 1}
    # Asked to drop what is not mapped: counted under its own reason.
    src = read_source(DatasetSpec("local", path=str(path), fields=PREF_FIELDS, on_unmapped_label="drop"), 0)
    assert len(src.train) == 3 and src.dropped == {"unmapped label": 1}


def test_ties_counted_in_the_stage_summary(tmp_path, builtin_tok):
    path = prefs(tmp_path / "pref.jsonl", ["a", "b", "draw"] * 40)
    cfg = cfg_of(tmp_path, [{"name": "local", "path": str(path), "fields": {**PREF_FIELDS, "tie": "draw"}}])
    data = load_stage_data(cfg, "rm", builtin_tok)
    s = data.stats[0]
    assert s.dropped == {"tie": 40} and s.read == 120 and s.kept + s.other_stages == 80
    assert "dropped 40: tie 40" in data.summary("rm")


def test_label_mapping_checked_with_the_config(tmp_path):
    spec = {"name": "local", "path": str(tmp_path / "p.jsonl")}
    with pytest.raises(ConfigError, match=r"^data_blend.datasets\[0\].fields.tie=0 is also a value that means a win"):
        cfg_of(tmp_path, [{**spec, "fields": {**PREF_FIELDS, "tie": "0"}}])  # a_wins defaults to 0
    with pytest.raises(ConfigError, match=r"^data_blend.datasets\[0\].fields.ties=0 is not a field key; known: "):
        cfg_of(tmp_path, [{**spec, "fields": {**PREF_FIELDS, "ties": "0"}}])
    with pytest.raises(ConfigError, match=r"^data_blend.datasets\[0\].on_unmapped_label=skip must be error or drop"):
        cfg_of(tmp_path, [{**spec, "on_unmapped_label": "skip"}])


def test_non_utf8_line_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    good, bad = hh_row("hi", "hello", "go"), hh_row("café ?", "oui", "non")
    path.write_bytes((json.dumps(good) + "\n\n").encode() + json.dumps(bad, ensure_ascii=False).encode("latin-1") + b"\n")
    with pytest.raises(DataError) as err:
        read_source(DatasetSpec("hh-rlhf", path=str(path)), 0)
    assert re.fullmatch(rf"{re.escape(str(path))}:3: not UTF-8 text \(byte 0xe9 at byte \d+ of the line\); "
                        r"save the file as UTF-8", str(err.value))


def test_cut_gzip_names_file_and_last_line(tmp_path):
    from pipeline.data.sources import jsonl_rows

    text = "".join(json.dumps(hh_row(f"question {i} " + "word " * 30, "yes", "no")) + "\n" for i in range(3000))
    whole = gzip.compress(text.encode())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(whole[: len(whole) // 2])
    read: list[str] = []
    with pytest.raises(DataError) as err:
        for where, _ in jsonl_rows(path):
            read.append(where)
    m = re.fullmatch(rf"{re.escape(str(path))}: the gzip data is cut off or corrupt after line (\d+) \(.+\); "
                     r"download or compress the file again", str(err.value))
    assert m and 0 < int(m.group(1)) < 3000 and read[-1] == f"{path}:{m.group(1)}"  # the last line handed on
    with pytest.raises(DataError, match=rf"after line {m.group(1)} "):  # every line before it was read whole
        read_source(DatasetSpec("hh-rlhf", path=str(path)), 0)
    (tmp_path / "whole.jsonl.gz").write_bytes(whole)
    assert len(list(jsonl_rows(tmp_path / "whole.jsonl.gz"))) == 3000


def test_record_of_the_wrong_shape_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "webgpt.jsonl", [
        {"question": {"full_text": "why?"}, "answer_0": "a", "answer_1": "b", "score_0": 1.0, "score_1": 0.0},
        {"question": {"full_text": "how?"}, "answer_0": "a", "answer_1": "b", "score_0": "high", "score_1": 0.0}])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: cannot read this record as "
                                        r"openai/webgpt_comparisons \(ValueError: could not convert string to float"):
        read_source(DatasetSpec("openai/webgpt_comparisons", path=str(path)), 0)


def test_batch_larger_than_the_data_names_the_key():
    from pipeline.training import total_steps

    with pytest.raises(ConfigError) as err:
        total_steps(40, 64, 1, 3, None, "stage.sft")
    assert str(err.value) == ("stage.sft.per_device_train_batch_size=64: 40 training examples are fewer than one "
                              "step (64 x 1 x 1 ranks); lower it or add data")
    with pytest.raises(ConfigError, match=r"^stage.ppo.per_device_generation_batch_size=16: 20 training examples"):
        total_steps(20, 16, 2, 1, None, "stage.ppo")
    assert total_steps(40, 8, 2, 3, None, "stage.rm") == 6


def cli_error(proc) -> str:
    """The CLI's one-line error: exit status 2, the last stderr line, no traceback."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ")
    return last


def test_cli_unmapped_label_one_line_and_nothing_lost(tmp_path):
    path = prefs(tmp_path / "pref.jsonl", [1, 0] * 30 + [-1] * 20)
    out = tmp_path / "run"
    (out / "data_cache").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    line = cli_error(run_cli("+experiment=demo", f"run.output_dir={out}", "run.stages=[sft]", "data_blend=local",
                             f"data_blend.path={path}", "data_blend.fields.prompt=q", "data_blend.fields.answer_a=x",
                             "data_blend.fields.answer_b=y", "data_blend.fields.label=pref"))
    assert line.startswith(f"error: {path}:61: label pref=-1 is not mapped")
    assert (out / "notes.txt").read_text() == "mine" and not list((out / "data_cache").iterdir())  # no half entry


def test_cli_batch_larger_than_the_data_one_line(tmp_path):
    path = write_jsonl(tmp_path / "small.jsonl", [{"prompt": f"where does the cat {i} live ?",
                                                   "chosen": "in the city .", "rejected": "no"} for i in range(100)])
    out = tmp_path / "run"
    line = cli_error(run_cli("+experiment=demo", f"run.output_dir={out}", "run.stages=[sft]", "data_blend=local",
                             f"data_blend.path={path}", "stage.sft.per_device_train_batch_size=64"))
    assert line == ("error: stage.sft.per_device_train_batch_size=64: 18 training examples are fewer than one step "
                    "(64 x 1 x 1 ranks); lower it or add data")
    entries = list((out / "data_cache").iterdir())  # the data built before the error stays, whole, for the next run
    assert [e.name[:4] for e in entries] == ["sft-"] and (entries[0] / "train" / "state.json").exists()


# --------------------------------------------------------------------------- adapters


@needs_hh
def test_hh_folder_gzip_and_plain_agree(tmp_path):
    src = HH / "helpful-online" / "test.jsonl.gz"
    plain = tmp_path / "plain" / "test.jsonl"
    plain.parent.mkdir()
    plain.write_bytes(gzip.decompress(src.read_bytes()))
    a = read_source(DatasetSpec("hh-rlhf", path=str(src), max_records=50), 0)
    b = read_source(DatasetSpec("hh-rlhf", path=str(plain.parent), max_records=50), 0)
    assert a.train == b.train and len(a.train) == 50 - sum(a.dropped.values())
    rec = a.train[0]
    assert rec.messages[-1]["role"] == "user" and rec.chosen and rec.rejected
    # Whole folder: three files, no train/test naming -> one pool.
    whole = read_source(DatasetSpec("hh-rlhf", path=str(HH)), 0)
    assert whole.read == 2354 + 2312 + 1137 and not whole.test


def test_hh_prompt_is_up_to_last_assistant(builtin_tok):
    row = {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: color?\n\nAssistant: red",
           "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: color?\n\nAssistant: blue"}
    from pipeline.data.sources import adapt_hh_raw

    rec = adapt_hh_raw(row, "x", DatasetSpec("hh-rlhf"), "k")
    assert rec.chosen == "red" and rec.rejected == "blue"
    assert format_prompt(rec.messages, builtin_tok, "human_assistant") == \
        "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: color?\n\nAssistant:"
    assert format_prompt(rec.messages, builtin_tok, "chat_template") == \
        "Human: hi Assistant: hello Human: color? Assistant:"


def test_hub_format_adapters_on_local_files(tmp_path):
    import datasets

    # Dahoas/rm-static layout: data/train-*.parquet + data/test-*.parquet.
    rm = tmp_path / "rm-static" / "data"
    rm.mkdir(parents=True)
    rows = [{"prompt": f"\n\nHuman: q{i}\n\nAssistant:", "response": f" a{i}", "chosen": f" a{i}",
             "rejected": f" b{i}"} for i in range(30)]
    datasets.Dataset.from_list(rows[:20]).to_parquet(str(rm / "train-00000-of-00001.parquet"))
    datasets.Dataset.from_list(rows[20:]).to_parquet(str(rm / "test-00000-of-00001.parquet"))
    src = read_source(DatasetSpec("Dahoas/rm-static", path=str(rm.parent)), 0)
    assert len(src.train) == 20 and len(src.test) == 10
    assert src.train[0] == Record([{"role": "user", "content": "q0"}], "a0", "b0")
    # openai/webgpt_comparisons: scores pick the winner, ties dropped, citations removed.
    web = write_jsonl(tmp_path / "webgpt.jsonl", [
        {"question": {"full_text": "why?"}, "answer_0": "because [1] so", "answer_1": "no", "score_0": 1.0, "score_1": -1.0},
        {"question": {"full_text": "how?"}, "answer_0": "x", "answer_1": "y", "score_0": 0.0, "score_1": 0.0},
        {"question": {"full_text": "who?"}, "answer_0": "x", "answer_1": "y", "score_0": -0.5, "score_1": 0.5}])
    src = read_source(DatasetSpec("openai/webgpt_comparisons", path=str(web)), 0)
    assert [(r.chosen, r.rejected) for r in src.train] == [("because so", "no"), ("y", "x")]
    assert src.dropped == {"tie (no preference)": 1}
    # stanfordnlp/SHP: labels 1 = A preferred.
    shp = write_jsonl(tmp_path / "shp.jsonl", [
        {"history": "h", "human_ref_A": "A", "human_ref_B": "B", "labels": 1},
        {"history": "h", "human_ref_A": "A", "human_ref_B": "B", "labels": 0}])
    assert [r.chosen for r in read_source(DatasetSpec("stanfordnlp/SHP", path=str(shp)), 0).train] == ["A", "B"]
    # synthetic-instruct-gptj-pairwise and yitingxie/rlhf-reward-datasets.
    syn = write_jsonl(tmp_path / "syn.jsonl", [{"prompt": "Do x", "chosen": "ok", "rejected": "no"}])
    assert read_source(DatasetSpec("Dahoas/synthetic-instruct-gptj-pairwise", path=str(syn)), 0).train == \
        [Record([{"role": "user", "content": "Do x"}], "ok", "no")]
    yx = write_jsonl(tmp_path / "yx.jsonl", [{"prompt": "\n\nHuman: hey\n\n", "chosen": "Assistant: good",
                                              "rejected": "Assistant: bad"}])
    assert read_source(DatasetSpec("yitingxie/rlhf-reward-datasets", path=str(yx)), 0).train == \
        [Record([{"role": "user", "content": "hey"}], "good", "bad")]
    # SFT-only (no rejected).
    zh = write_jsonl(tmp_path / "zh.jsonl", [{"INSTRUCTION": "i", "RESPONSE": "r"}])
    assert read_source(DatasetSpec("wangrui6/Zhihu-KOL", path=str(zh)), 0).train[0].rejected is None
    # DeepSpeed-Chat's other SFT-only sets, in their published columns.
    mk = write_jsonl(tmp_path / "mkqa.jsonl", [
        {"query": "who?", "queries": {"ja": "誰？", "zh_cn": "谁？"},
         "answers": {"ja": [{"type": "entity", "text": "太郎"}], "zh_cn": [{"type": "entity", "text": "太郎"}]}},
        {"query": "when?", "queries": {"ja": "いつ？", "zh_cn": "何时？"}, "answers": {"ja": [], "zh_cn": []}}])
    ja = read_source(DatasetSpec("mkqa-Japanese", path=str(mk)), 0)
    assert ja.train == [Record([{"role": "user", "content": "誰？"}], "太郎")] and ja.dropped == {"no ja query or answer": 1}
    assert read_source(DatasetSpec("mkqa-Chinese", path=str(mk)), 0).train[0].messages[0]["content"] == "谁？"
    qg = write_jsonl(tmp_path / "qg.jsonl", [{"question": "q?", "sentence": "s.", "paragraph": "p"}])
    assert read_source(DatasetSpec("lmqg/qg_jaquad", path=str(qg)), 0).train == [Record([{"role": "user", "content": "q?"}], "s.")]
    qag = write_jsonl(tmp_path / "qag.jsonl", [{"questions": ["q1?", "q2?"], "paragraph": "p."}, {"questions": [], "paragraph": "x"}])
    src = read_source(DatasetSpec("lmqg/qag_jaquad", path=str(qag)), 0)
    assert src.train == [Record([{"role": "user", "content": "q1?"}], "p.")] and src.dropped == {"no question": 1}
    vic = write_jsonl(tmp_path / "vicuna.jsonl", [
        {"prompt": "USER: hi ASSISTANT: hello USER: and? ASSISTANT:", "label": " more"},
        {"prompt": "USER: hi ASSISTANT: hello", "label": "x"},
        {"prompt": "A chat. USER: hi ASSISTANT:", "label": "yes"}])
    src = read_source(DatasetSpec("pvduy/sharegpt_alpaca_oa_vicuna_format", path=str(vic)), 0)
    assert src.train == [Record([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                                 {"role": "user", "content": "and?"}], "more"),
                         Record([{"role": "system", "content": "A chat."}, {"role": "user", "content": "hi"}], "yes")]
    assert src.dropped == {"prompt does not end with a USER turn, or empty label": 1}


def test_local_field_mappings(tmp_path, builtin_tok):
    import datasets

    # Two answers + a label column, in csv.
    csv = tmp_path / "pref.csv"
    datasets.Dataset.from_list([{"q": f"what color is the cat {i} ?", "x": "the cat is red .", "y": "the dog",
                                 "win": ["x", "y", "tie"][i % 3]} for i in range(30)]).to_csv(str(csv), index=False)
    spec = DatasetSpec("local", path=str(csv), fields={"prompt": "q", "answer_a": "x", "answer_b": "y",
                                                       "label": "win", "a_wins": "x", "b_wins": "y"})
    src = read_source(spec, 0)
    assert len(src.train) == 20 and src.dropped == {"tie": 10}  # "tie" is a tie without fields.tie
    assert src.train[0].chosen == "the cat is red ." and src.train[1].chosen == "the dog"
    # Multi-turn message lists (ShareGPT keys too), jsonl; the last assistant turn is chosen.
    msgs = write_jsonl(tmp_path / "chat.jsonl", [
        {"conv": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                  {"role": "user", "content": "bye"}, {"role": "assistant", "content": "see you"}], "bad": "what"},
        {"conv": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}], "bad": "c"}])
    src = read_source(DatasetSpec("local", path=str(msgs), fields={"messages": "conv", "rejected": "bad"}), 0)
    assert src.train[0].messages[-1] == {"role": "user", "content": "bye"} and src.train[0].chosen == "see you"
    assert src.train[1] == Record([{"role": "user", "content": "a"}], "b", "c")
    # Auto-detected prompt/chosen/rejected in parquet, through the stages.
    pq = tmp_path / "pcr.parquet"
    datasets.Dataset.from_list([{"prompt": "where does the cat live ?", "chosen": "the cat lives in the city .",
                                 "rejected": f"cat {i}"} for i in range(50)]).to_parquet(str(pq))
    cfg = cfg_of(tmp_path, [{"name": "local", "path": str(pq)}], max_prompt_len=32, max_answer_len=4)
    rm = load_stage_data(cfg, "rm", builtin_tok)
    e = rm.train[0]
    eos = builtin_tok.eos_token_id
    assert e["chosen_input_ids"][-1] == eos and len(e["chosen_input_ids"]) - e["prompt_len"] == 4  # 3 + eos
    sft = load_stage_data(cfg, "sft", builtin_tok)
    assert sft.train[0]["input_ids"][-1] == eos and "prompt_len" in sft.train[0]
    ppo = load_stage_data(cfg, "ppo", builtin_tok).train[0]
    assert list(ppo) == ["prompt_input_ids", "reference"] and ppo["reference"] == "the cat lives in the city ."


def test_sft_only_and_rm_without_rejected(tmp_path, builtin_tok):
    extra = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "what color is the fox ?", "chosen": "the fox is red ."}] * 40)
    cfg = load_config({"run": {"output_dir": str(tmp_path / "run")}, "data_blend": {
        "datasets": [{"name": "builtin", "max_records": 200}], "sft_only": [{"name": "local", "path": str(extra)}],
        "max_prompt_len": 32, "max_answer_len": 24}})
    sft = load_stage_data(cfg, "sft", builtin_tok)
    assert [s.name for s in sft.stats] == ["builtin", "local"] and sft.stats[1].kept == 40  # not split
    assert [s.name for s in load_stage_data(cfg, "rm", builtin_tok).stats] == ["builtin"]
    only = cfg_of(tmp_path, [{"name": "local", "path": str(extra)}])
    with pytest.raises(DataError, match=r"'no rejected answer': \d+"):
        load_stage_data(only, "rm", builtin_tok)


def digest(rows) -> str:
    """Of the token ids (ppo rows' reference text, added later, left out: the ids are what is pinned)."""
    return hashlib.sha256(json.dumps([{k: v for k, v in r.items() if k != "reference"} for r in rows]).encode()).hexdigest()[:16]


def test_builtin_demo_blend_unchanged(tmp_path, builtin_tok):
    """The built-in task's examples: sizes, and every token id in order (train digest, eval digest);
    renewed when the task held one phrasing per fact out and gained contested facts (cache version 3)."""
    cfg = cfg_of(tmp_path, [{"name": "builtin", "max_records": 4000}], max_prompt_len=32, max_answer_len=24)
    seen = {st: (len(d.train), len(d.eval), digest(d.train), digest(d.eval)) for st in ("sft", "rm", "ppo")
            for d in [load_stage_data(cfg, st, builtin_tok)]}
    assert seen == {"sft": (720, 80, "3704f637cd1caaa9", "f89edae5dc8b7192"),
                    "rm": (1440, 160, "25db5a91fd7db6d0", "bce554d4efb4de38"),
                    "ppo": (1440, 160, "cc6aecfe7b2914f2", "aee06a962edeccb9")}


def test_a_stage_with_no_share_takes_only_sft_only_data(tmp_path, builtin_tok):
    """The demo's blend: split 0,1,1 gives SFT nothing of the preference pairs, only the SFT
    demonstrations (builtin-sft); without sft_only, SFT's empty share is refused naming the key."""
    cfg = cfg_of(tmp_path, [{"name": "builtin", "max_records": 400}], split="0,1,1", max_prompt_len=32, max_answer_len=24,
                 sft_only=[{"name": "builtin-sft", "max_records": 100}])
    sft = load_stage_data(cfg, "sft", builtin_tok)
    assert [(s.name, s.kept) for s in sft.stats] == [("builtin-sft", 100)] and (len(sft.train), len(sft.eval)) == (90, 10)
    rm = load_stage_data(cfg, "rm", builtin_tok)
    assert [(s.name, s.kept) for s in rm.stats] == [("builtin", 200)]
    with pytest.raises(DataError, match=r"^data_blend.split=0,1,1 gives the sft stage no data and data_blend.sft_only "
                                        r"is empty; give it a share above 0$"):
        load_stage_data(cfg_of(tmp_path, [{"name": "builtin", "max_records": 400}], split="0,1,1"), "sft", builtin_tok)


def test_stage_data_memory_mapped_and_batches_as_from_a_list(tmp_path, builtin_tok, monkeypatch):
    import datasets
    import torch

    from pipeline.data.collate import collate_pairs
    from pipeline.training import accumulation_batches, epoch_batches, eval_batches

    cfg = cfg_of(tmp_path, [{"name": "builtin", "max_records": 600}], max_prompt_len=32, max_answer_len=24)
    data = load_stage_data(cfg, "rm", builtin_tok)
    assert isinstance(data.train, Examples) and isinstance(data.train.table, datasets.Dataset)
    mapped = [f["filename"] for part in (data.train, data.eval) for f in part.table.cache_files]
    assert len(mapped) == 2 and all(f.startswith(data.cache_path) for f in mapped)  # Arrow files of the entry
    rows, eval_rows = data.train.table.to_list(), data.eval.table.to_list()  # the old list path
    assert len(rows) == 216 and list(data.train) == rows and list(data.eval) == eval_rows
    assert data.train[5] == rows[5] and data.train[-1] == rows[-1] and data.train[3:6] == rows[3:6]

    def same(batches, from_list):
        batches, from_list = list(batches), list(from_list)
        assert len(batches) == len(from_list) > 0
        for a, b in zip(batches, from_list):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    collate = partial(collate_pairs, pad_id=builtin_tok.pad_token_id)
    same(epoch_batches(data.train, 8, collate, 3, 1, skip=2), epoch_batches(rows, 8, collate, 3, 1, skip=2))
    same(accumulation_batches(data.train, 4, 2, collate, 3, 1, step=30, per_epoch=27),
         accumulation_batches(rows, 4, 2, collate, 3, 1, step=30, per_epoch=27))
    same(eval_batches(data.eval, 7, collate), eval_batches(eval_rows, 7, collate))
    # Tokenized by two processes (the path of large sets): the same examples in the same order.
    monkeypatch.setattr(pipeline.data, "MAP_ROWS_PER_PROC", 50)
    assert pipeline.data._map_procs(216) == min(2, pipeline.data._map_procs(10**9))
    two = load_stage_data(cfg_of(tmp_path / "two", [{"name": "builtin", "max_records": 600}], max_prompt_len=32,
                                 max_answer_len=24), "rm", builtin_tok)
    assert two.cache == "built" and list(two.train) == rows and list(two.eval) == eval_rows


# --------------------------------------------------------------------------- PTX


@pytest.mark.skipif(not (SHARED / "tinyshakespeare" / "input.txt").exists(), reason="tinyshakespeare not found")
def test_ptx_blocks_cached(tmp_path, opt_tok):
    import numpy as np

    cfg = load_config({"run": {"output_dir": str(tmp_path)},
                       "data_blend": {"ptx_path": str(SHARED / "tinyshakespeare" / "input.txt"), "ptx_max_blocks": 50}})
    blocks = load_ptx_data(cfg, opt_tok, 128)
    assert isinstance(blocks.blocks, np.memmap)  # read from the cache file, not held in memory
    assert len(blocks) == 50 and all(len(b["input_ids"]) == 128 for b in blocks)
    assert opt_tok.decode(blocks[0]["input_ids"][:3]).startswith("First Citizen")
    assert list(load_ptx_data(cfg, opt_tok, 128)) == list(blocks)
    assert len(list((tmp_path / "data_cache").glob("ptx-*/blocks.npy"))) == 1
    assert len(load_ptx_data(cfg, opt_tok, 64)) == 50
    table = write_jsonl(tmp_path / "t.jsonl", [{"body": "hello world " * 50}] * 3)
    bad = load_config({"run": {"output_dir": str(tmp_path)}, "data_blend": {"ptx_path": str(table)}})
    with pytest.raises(DataError, match=rf"{table}:1: record has no field 'text'"):
        load_ptx_data(bad, opt_tok, 16)


# --------------------------------------------------------------------------- presets


@pytest.mark.parametrize("overrides,first", [
    (["data_blend=builtin"], "builtin"),
    (["data_blend=hh-rlhf", "data_blend.path=/x/hh.jsonl.gz"], "hh-rlhf"),
    (["data_blend=rm-static"], "Dahoas/rm-static"),
    (["data_blend=deepspeed-chat"], "Dahoas/rm-static"),
    (["data_blend=local", "data_blend.path=/x/f.csv", "data_blend.fields.prompt=q"], "local"),
])
def test_presets_compose(overrides, first):
    from hydra import compose, initialize_config_dir

    from pipeline.config import register_resolvers

    register_resolvers()
    conf = Path(__file__).parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base=None):
        cfg = load_config(compose("config", overrides=overrides + ["hardware=cpu"]))
    assert cfg.data_blend.datasets[0].name == first
    if "deepspeed-chat" in overrides[0]:
        assert len(cfg.data_blend.datasets) == 6
    if "local" in overrides[0]:
        assert cfg.data_blend.datasets[0].path == "/x/f.csv" and cfg.data_blend.datasets[0].fields["prompt"] == "q"


# --------------------------------------------------------------------------- distributed


def _two_rank_worker(rank: int, tmp: str, port: int) -> None:
    import torch.distributed as dist
    from transformers import AutoTokenizer

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        tok = AutoTokenizer.from_pretrained(f"{tmp}/tok")
        cfg = load_config({"run": {"output_dir": f"{tmp}/run"}, "data_blend": {
            "datasets": [{"name": "builtin", "max_records": 300}], "max_prompt_len": 32, "max_answer_len": 24}})
        data = load_stage_data(cfg, "rm", tok)
        Path(f"{tmp}/rank{rank}.json").write_text(json.dumps({"cache": data.cache, "train": list(data.train)}))
        bad = cfg_of(Path(tmp), [{"name": "hh-rlhf", "path": f"{tmp}/bad.jsonl"}])
        try:
            load_stage_data(bad, "sft", tok)
        except DataError as err:  # every rank gets rank 0's error instead of hanging
            Path(f"{tmp}/err{rank}.txt").write_text(str(err))
    finally:
        dist.destroy_process_group()


def test_two_ranks_build_once_and_share_errors(tmp_path):
    import socket

    import torch.multiprocessing as mp

    from pipeline.data.builtin import save_tokenizer

    save_tokenizer(tmp_path / "tok")
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_rank_worker, args=(str(tmp_path), port), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["cache"] == "built" and r1["cache"] == "hit" and r0["train"] == r1["train"]
    assert len(list((tmp_path / "run" / "data_cache").glob("rm-*"))) == 1
    e0, e1 = ((tmp_path / f"err{r}.txt").read_text() for r in (0, 1))
    assert e0 == e1 and "bad.jsonl:1: malformed JSON" in e0
