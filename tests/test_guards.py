"""Nothing lost, nothing run, nothing silently wrong: the corners a careful user reaches in quantize, train, resume,
export and eval. Each test names the item of the adversarial review it covers; data-loss tests check the victims
byte for byte afterwards."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import patch_losses, train_config as config
from qzo2 import api, outputs, trainer
from qzo2.cli import main
from qzo2.config import FIELDS, ConfigError, TrainConfig, load_config


def one_error(capsys, argv, match, code=2):
    rc = main(argv)
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("qzo2")]
    assert rc == code and len(err) == 1 and "error" in err[0] and match in err[0], (rc, err)
    return err[0]


def tree(root: Path) -> dict:
    """Every file under root (hidden ones too) -> its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def small(tmp_path, q, data, out, **kw) -> TrainConfig:
    base = dict(output_dir=str(out), steps=2, eval_every=0, save_every=1, dev_file="")
    return config(tmp_path, q, data, **{**base, **kw})


def train_args(cfg: TrainConfig) -> list[str]:
    return ["train"] + [f"{k}={v}" for k, v in cfg.to_dict().items()]


def quantized(tmp_path, src, name="q4", *extra) -> Path:
    out = tmp_path / name
    assert main(["quantize", str(src), "-o", str(out), "-q", "--group-size", "32", *extra]) == 0
    return out


# ---- 1-3, 18: --overwrite replaces only its own kind of output, never an input, cwd, home or root ----------------
def test_1_export_overwrite_onto_the_parent_of_the_run_deletes_nothing(tiny, tmp_path, capsys):
    q, _, data = tiny
    par = tmp_path / "par"
    trainer.train(small(tmp_path, q, data, par / "run"))
    (par / "other.txt").write_text("x")
    before = tree(par)
    one_error(capsys, ["export", str(par / "run"), "-o", str(par), "--overwrite"], "contains the input")
    assert tree(par) == before


@pytest.mark.parametrize("verb", ["export", "quantize"])
def test_2_18_overwrite_onto_home_or_cwd_is_refused(verb, tiny, tmp_path, monkeypatch, capsys):
    q, src, data = tiny
    trainer.train(small(tmp_path, q, data, tmp_path / "run"))
    home, cwd = tmp_path / "h", tmp_path / "w"
    for d in (home, cwd):
        d.mkdir()
        (d / "precious.txt").write_text("years of work")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    what = [str(tmp_path / "run")] if verb == "export" else [str(src)]
    one_error(capsys, [verb, *what, "-o", str(home), "--overwrite"], "the home directory")
    one_error(capsys, [verb, *what, "-o", ".", "--overwrite"], "the current directory")
    one_error(capsys, [verb, *what, "-o", str(tmp_path), "--overwrite"], "a parent of")  # holds home and cwd
    for d in (home, cwd):
        assert tree(d) == {"precious.txt": b"years of work"}
    assert not [p for p in tmp_path.iterdir() if ".old-" in p.name or ".tmp-" in p.name]


def test_2_overwrite_replaces_a_qzo2_export_but_not_a_foreign_directory(tiny, tmp_path, capsys):
    q, _, data = tiny
    run = tmp_path / "run"
    trainer.train(small(tmp_path, q, data, run))
    foreign = tmp_path / "models"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    one_error(capsys, ["export", str(run), "-o", str(foreign), "--overwrite"], "not a checkpoint written by qzo2")
    assert tree(foreign) == {"config.json": b"{}"}
    out = tmp_path / "exp"
    assert main(["export", str(run), "-o", str(out)]) == 0
    assert json.loads((out / outputs.MARKER).read_text())["command"] == "export"
    assert main(["export", str(run), "-o", str(out), "--overwrite", "--format", "hf"]) == 0
    assert "qweight" not in " ".join(load_file(str(out / "model.safetensors")))


def test_3_train_overwrite_never_deletes_its_own_inputs(tiny, tmp_path, capsys):
    q, _, data = tiny
    a = tmp_path / "runs" / "a"
    trainer.train(small(tmp_path, q, data, a))
    one_error(capsys, ["export", str(a), "-o", str(a / "gptq")], "is inside the input")  # into the run it reads
    assert main(["export", str(a), "-o", str(tmp_path / "gptq")]) == 0
    shutil.move(tmp_path / "gptq", a / "gptq")  # the user moved it there
    shutil.copy(data, a / "d.jsonl")
    before = tree(a)
    cfg = small(tmp_path, a / "gptq", a / "d.jsonl", a, overwrite=True)
    one_error(capsys, train_args(cfg), "contains the input")
    assert tree(a) == before


def test_overwrite_refuses_a_look_alike_holding_files_qzo2_did_not_write(tiny, tmp_path, capsys):
    """A directory that only looks like qzo2's output (config.yaml + checkpoints/, a model card naming qzo2, a run
    put inside a checkpoint, a recipe copied into a run) is not replaced: every file in it must be one qzo2 wrote."""
    q, src, data = tiny
    fh = tmp_path / "fh"  # another trainer's layout
    (fh / "checkpoints").mkdir(parents=True)
    (fh / "config.yaml").write_text("lr: 1\n")
    (fh / "notes.txt").write_text("mine")
    (fh / "checkpoints" / "epoch1.ckpt").write_text("w")
    before = tree(fh)
    one_error(capsys, train_args(small(tmp_path, q, data, fh, overwrite=True)), "which qzo2 did not write")
    assert tree(fh) == before
    proj = tmp_path / "proj"  # a model card that says "exported by qzo2" is no marker
    proj.mkdir()
    (proj / "README.md").write_text("models here were exported by qzo2")
    (proj / "serve.py").write_text("print()")
    before = tree(proj)
    one_error(capsys, ["quantize", str(src), "-o", str(proj), "--overwrite", "-q"], "not a checkpoint written by qzo2")
    assert tree(proj) == before
    qx = quantized(tmp_path, src, "qx")  # a run trained into a checkpoint directory
    trainer.train(small(tmp_path, q, data, qx / "myrun"))
    before = tree(qx)
    one_error(capsys, ["quantize", str(src), "-o", str(qx), "--overwrite", "-q", "--group-size", "32"],
              "myrun/")
    assert tree(qx) == before
    run = tmp_path / "run"  # a recipe kept inside the run directory it names
    trainer.train(small(tmp_path, q, data, run))
    (run / "recipe.yaml").write_text((run / "config.yaml").read_text().split("\n", 1)[1])
    before = tree(run)
    one_error(capsys, ["train", str(run / "recipe.yaml"), "overwrite=true"], "recipe.yaml")
    assert tree(run) == before
    marker = json.loads((qx / outputs.MARKER).read_text())  # a checkpoint of a qzo2 that did not list its files
    (qx / "myrun").rename(tmp_path / "myrun-moved")
    (qx / outputs.MARKER).write_text(json.dumps({k: v for k, v in marker.items() if k != "files"}))
    one_error(capsys, ["quantize", str(src), "-o", str(qx), "--overwrite", "-q"], "did not list its files")
    # what qzo2 wrote itself is still replaced
    assert main(["quantize", str(src), "-o", str(tmp_path / "q2"), "-q", "--group-size", "32"]) == 0
    assert main(["quantize", str(src), "-o", str(tmp_path / "q2"), "-q", "--group-size", "32", "--overwrite"]) == 0
    card = tmp_path / "q2" / "config.json"  # a listed file edited in place is not the file qzo2 wrote
    card.write_text(card.read_text().replace("{", '{"my_note": "edited",', 1))
    before = tree(tmp_path / "q2")
    one_error(capsys, ["quantize", str(src), "-o", str(tmp_path / "q2"), "-q", "--group-size", "32", "--overwrite"],
              "config.json (changed since qzo2 wrote it)")
    assert tree(tmp_path / "q2") == before
    trainer.train(small(tmp_path, q, data, tmp_path / "r2", report_to="jsonl"))
    trainer.train(small(tmp_path, q, data, tmp_path / "r2", overwrite=True, steps=3))


def test_a_file_put_into_the_old_output_while_the_job_ran_is_not_lost(tiny, tmp_path, monkeypatch, capsys):
    """The look-alike check is made again, under the lock, just before the old output is swapped out: quantize,
    export and train take minutes to hours, and a file written into the old output meanwhile stays."""
    import quant.checkpoint
    from qzo2 import run as run_module

    q, src, data = tiny
    old = quantized(tmp_path, src, "old")
    real = quant.checkpoint.quantize

    def quantize_and_meanwhile(*a, **kw):
        (old / "notes.txt").write_text("written during the job")
        return real(*a, **kw)

    monkeypatch.setattr(quant.checkpoint, "quantize", quantize_and_meanwhile)
    one_error(capsys, ["quantize", str(src), "-o", str(old), "--overwrite", "-q", "--group-size", "32"], "notes.txt")
    assert (old / "notes.txt").read_text() == "written during the job" and (old / outputs.MARKER).exists()
    run = tmp_path / "run"
    trainer.train(small(tmp_path, q, data, run))
    real_load = trainer.load_for_training

    def load_and_meanwhile(cfg):
        (run / "notes.txt").write_text("written during the load")
        return real_load(cfg)

    monkeypatch.setattr(trainer, "load_for_training", load_and_meanwhile)
    with pytest.raises(trainer.TrainingError, match="notes.txt"):
        trainer.train(small(tmp_path, q, data, run, overwrite=True))
    assert (run / "notes.txt").exists() and run_module.RunDir(run).steps()


def test_a_run_saved_with_a_unitless_gpu_memory_still_loads():
    """Runs saved before a size needed a unit keep loading (eval, export, resume): a bare number is bytes there."""
    cfg = TrainConfig.from_saved({**TrainConfig(task="sentiment").to_dict(), "gpu_memory": "200000"})
    assert cfg.gpu_memory == "200000B"
    with pytest.raises(ConfigError, match="no unit"):
        TrainConfig(task="sentiment", gpu_memory="200000")


def test_what_cannot_be_listed_or_a_long_run_is_judged_right(tmp_path, monkeypatch):
    from qzo2.run import is_own_run_entry

    assert is_own_run_entry("checkpoints/step-1000000/state.json")  # past step 999,999
    assert is_own_run_entry("checkpoints/.step-1000000.tmp-abcd1234/x")
    assert not is_own_run_entry("checkpoints/epoch1.ckpt") and not is_own_run_entry("notes.txt")
    run = tmp_path / "run"
    (run / "checkpoints" / "step-000001").mkdir(parents=True)
    (run / "config.yaml").write_text("x")
    real = os.scandir

    def scandir(path="."):
        if Path(path).name == "step-000001":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert outputs.foreign_entries(run, "run") == ["checkpoints/step-000001 (unreadable)"]


def test_file_outputs_never_replace_an_input_or_a_file_they_did_not_write(tiny, tmp_path, capsys):
    """eval --predictions and bench -o write only a new file or their own earlier output: never the task, the data,
    a model's files or any other file, never through a symlink."""
    q, _, data = tiny
    rows = tmp_path / "t.jsonl"
    rows.write_text("".join(json.dumps({"text": f"t{i}", "label": i % 2}) + "\n" for i in range(4)))
    task = tmp_path / "t.yaml"
    task.write_text("template: '{text} ->'\ncandidates: [' no', ' yes']\n")
    model_config = (q / "config.json").read_bytes()
    ev = ["eval", str(q), "--task", str(task), "--data", str(rows), "--batch-size", "2"]
    for victim in (rows, task, q / "config.json"):
        before = victim.read_bytes()
        one_error(capsys, ev + ["--predictions", str(victim)], "--predictions")
        assert victim.read_bytes() == before
    one_error(capsys, ev + ["--predictions", str(tmp_path)], "is a directory")
    lm = tmp_path / "lm"  # --lm-eval-task: a hand-written task file of the same name is not replaced
    lm.mkdir()
    lm_args = ["eval", str(q), "--task", str(task), "--data", str(rows), "--lm-eval-task"]
    assert main(lm_args + [str(lm)]) == 0
    assert main(lm_args + [str(lm)]) == 0  # its own files are rewritten
    mine = next(lm.glob("*.yaml"))
    mine.write_text("task: mine\n")
    one_error(capsys, lm_args + [str(lm)], "--lm-eval-task")
    assert mine.read_text() == "task: mine\n"
    one_error(capsys, lm_args + [str(q / "tasks")], "inside the input")
    run = tmp_path / "run"  # a run's base model is an input of its evaluation too
    trainer.train(small(tmp_path, q, data, run))
    one_error(capsys, ["eval", str(run), "--checkpoint", "last", "--task", str(task), "--data", str(rows),
                       "--predictions", str(q / "p.jsonl")], "inside the input")
    assert not (q / "p.jsonl").exists()
    preds = tmp_path / "p.jsonl"
    assert main(ev + ["--predictions", str(preds)]) == 0
    assert main(ev + ["--predictions", str(preds)]) == 0  # its own output is replaced
    assert json.loads(preds.read_text().splitlines()[0])["index"] == 0
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    (tmp_path / "b.jsonl").symlink_to(victim)
    bench = ["bench", "--shape", "tiny", "--mode", "qzo", "--seq", "8", "--steps", "1", "--warmup", "0", "--device",
             "cpu"]
    one_error(capsys, bench + ["-o", str(tmp_path / "b.jsonl")], "-o")
    one_error(capsys, bench[:2] + [str(q)] + bench[3:] + ["-o", str(q / "config.json")], "the input")
    one_error(capsys, bench[:2] + [str(q / "config.json")] + bench[3:] + ["-o", str(q / "b.jsonl")], "the input")
    assert victim.read_text() == "keep" and (q / "config.json").read_bytes() == model_config
    out = tmp_path / "bench.jsonl"
    assert main(bench + ["-o", str(out)]) == 0 and main(bench + ["-o", str(out)]) == 0
    assert [json.loads(line)["mode"] for line in out.read_text().splitlines()] == ["qzo", "qzo"]


def test_bad_model_files_and_settings_found_by_the_review_are_one_line(tiny, tmp_path, capsys):
    q, src, data = tiny
    bad = tmp_path / "bad"
    shutil.copytree(q, bad)
    (bad / "config.json").write_text("{oops")
    for argv in (["eval", str(bad)], ["plan", str(bad)]):
        assert str(bad / "config.json") in one_error(capsys, argv, "cannot read")
    (bad / "config.json").write_text("[1, 2]")
    one_error(capsys, ["eval", str(bad)], "is not a JSON object")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    one_error(capsys, ["quantize", str(src), "-o", str(tmp_path / "g"), "--method", "gptq", "--calib", str(empty)],
              "is empty")
    assert not (tmp_path / "g").exists()
    one_error(capsys, ["eval", str(q), "--seqlen", "100000"], "positions")
    cfg = small(tmp_path, q, data, tmp_path / "long", max_length=100000)
    one_error(capsys, train_args(cfg), "max_length=")
    assert not (tmp_path / "long").exists()
    mis = tmp_path / "mis"  # weights that config.json does not describe
    shutil.copytree(src, mis)
    c = json.loads((mis / "config.json").read_text())
    c["intermediate_size"] += 32
    (mis / "config.json").write_text(json.dumps(c))
    one_error(capsys, ["eval", str(mis)], "do not match its config.json")
    one_error(capsys, ["quantize", str(mis), "-o", str(tmp_path / "qmis"), "-q", "--group-size", "32"],
              "config.json says")
    assert not (tmp_path / "qmis").exists()
    for layers, needle in ((1, "does not describe"), (3, "has no tensor")):  # a layer count edited either way
        c = json.loads((src / "config.json").read_text())
        c["num_hidden_layers"] = layers
        (mis / "config.json").write_text(json.dumps(c))
        one_error(capsys, ["quantize", str(mis), "-o", str(tmp_path / "qmis"), "-q", "--group-size", "32"], needle)
        one_error(capsys, ["eval", str(mis)], "config.json")
    assert not (tmp_path / "qmis").exists()


# ---- 4: one writer per output ---------------------------------------------------------------------------------------
def test_4_a_second_writer_is_refused_for_train_export_and_quantize(tiny, tmp_path, capsys):
    q, src, data = tiny
    run = tmp_path / "run"
    trainer.train(small(tmp_path, q, data, run))
    before = tree(run)
    with outputs.locked(run, "train"):  # another process is training into it
        one_error(capsys, train_args(small(tmp_path, q, data, run, steps=4)), "being written by another qzo2 process")
    assert tree(run) == before
    with outputs.locked(tmp_path / "exp", "export"):
        one_error(capsys, ["export", str(run), "-o", str(tmp_path / "exp")], "being written by another")
    with outputs.locked(tmp_path / "q8", "quantize"):
        one_error(capsys, ["quantize", str(src), "-o", str(tmp_path / "q8"), "-q"], "being written by another")
    assert not (tmp_path / "exp").exists() and not (tmp_path / "q8").exists()
    assert main(train_args(small(tmp_path, q, data, run, steps=4))) == 0  # the lock is gone with its holder
    assert not list(tmp_path.glob(".*.lock"))


def test_4_a_lock_held_by_a_killed_process_is_free(tmp_path):
    out = tmp_path / "run"
    code = f"import sys, time; from qzo2.outputs import locked\nwith locked({str(out)!r}, 'train'):\n" \
           f"    print('held', flush=True); time.sleep(60)"
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    with pytest.raises(outputs.OutputError, match="being written by another qzo2 process"):
        with outputs.locked(out, "train"):
            pass
    p.send_signal(signal.SIGKILL)
    p.wait()
    with outputs.locked(out, "train"):  # kill -9 released it
        pass


# ---- 6: no write through a planted symlink ---------------------------------------------------------------------------
def test_6_symlinks_planted_in_a_run_are_never_written_through(tiny, tmp_path):
    q, _, data = tiny
    run = tmp_path / "run"
    trainer.train(small(tmp_path, q, data, run, steps=2))
    victim = tmp_path / "victim"
    victim.write_text("do not touch")
    for name in (".config.yaml.tmp", "config.yaml", "metrics.png"):
        target = run / name
        if target.exists():
            target.unlink()
        target.symlink_to(victim)
    trainer.train(small(tmp_path, q, data, run, steps=4))  # resume
    assert victim.read_text() == "do not touch"
    assert not (run / "config.yaml").is_symlink() and not (run / "metrics.png").is_symlink()
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(victim)
    config_before = (run / "config.yaml").read_bytes()
    with pytest.raises(trainer.TrainingError, match="symbolic link"):
        trainer.train(small(tmp_path, q, data, run, steps=6))
    assert (run / "config.yaml").read_bytes() == config_before  # refused before anything of the run changed
    with pytest.raises(OSError):  # appending refuses the link (O_NOFOLLOW) instead of writing to its target
        trainer.RunDir(run).log({"step": 7})
    assert victim.read_text() == "do not touch"


# ---- 7, 8, 19, 23: values parsed by their key's type, ranges, regexes, duplicate keys ------------------------------
def test_7_values_are_parsed_by_the_type_of_their_key(tmp_path):
    cfg = load_config(None, ["task=sentiment", "output_dir=010", "trainable=[01]", "offload=on", "progress=no"])
    assert (cfg.output_dir, cfg.trainable, cfg.offload, cfg.progress) == ("010", "[01]", "on", False)
    assert load_config(None, ["task=sentiment", "output_dir=no"]).output_dir == "no"
    assert load_config(None, ["task=sentiment", "steps=1e3", "lr=2e-5"]).steps == 1000
    for bad in ("steps=true", "steps=1.5", "lr=fast", "progress=maybe"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(None, ["task=sentiment", bad])
    with pytest.raises(ConfigError, match="steps expects int"):
        api.make_config(steps=True)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("task: sentiment\noutput_dir: 010\ntrainable: '[01]'\noffload: off\nlr: 1e-3\nprogress: false\n")
    cfg = load_config(str(recipe))
    assert (cfg.output_dir, cfg.trainable, cfg.offload, cfg.lr, cfg.progress) == ("010", "[01]", "off", 1e-3, False)
    recipe.write_text("task: sentiment\ntrainable: [01]\n")
    with pytest.raises(ConfigError, match="trainable expects text"):
        load_config(str(recipe))


FLOATS = [("lr", "inf"), ("lr", "nan"), ("clip", "nan"), ("eps", "inf"), ("scale_floor", "-1"),
          ("weight_decay", "inf"), ("clip_grad_norm", "nan"), ("grass_scale", "0"), ("zo_track", "nan"),
          ("dev_fraction", "nan"), ("zo_mask_fraction", "inf"), ("zo_rms_beta", "1"), ("clip_grad_value", "-1"),
          ("seed", "1e30"), ("seed", "-1e20")]


@pytest.mark.parametrize("key,value", FLOATS)
def test_8_non_finite_or_out_of_range_numbers_are_refused(key, value, capsys):
    method = {"clip_grad_norm": "lomo", "clip_grad_value": "adamw", "grass_scale": "grass"}.get(key, "qzo")
    with pytest.raises(ConfigError, match=f"^{key} must be"):
        load_config(None, ["task=sentiment", f"method={method}", f"{key}={value}"])
    one_error(capsys, ["train", "task=sentiment", f"method={method}", f"{key}={value}"], f"{key} must be")


def test_8_every_numeric_key_has_a_range():
    numeric = [n for n, f in FIELDS.items() if f.type in ("int", "float")]
    assert numeric and all(FIELDS[n].metadata["range"] for n in numeric), \
        [n for n in numeric if not FIELDS[n].metadata["range"]]
    TrainConfig(task="sentiment")  # the defaults lie in their ranges


@pytest.mark.parametrize("pattern", ["[", "*proj"])
def test_19_a_bad_trainable_regex_is_one_line(pattern, capsys):
    one_error(capsys, ["train", "task=sentiment", f"trainable={pattern}"], "not a valid regular expression")


def test_23_a_key_given_twice_in_a_recipe_is_refused(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("task: sentiment\nlr: 1e-3\nsteps: 5\nlr: 5e-3\n")
    one_error(capsys, ["train", str(recipe), "--print-config"], "'lr' is given twice (line 4)")


def test_21_a_binary_recipe_names_the_file(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(b"\xff\xfe" + "lr: 1e-3\n".encode("utf-16-le"))
    one_error(capsys, ["train", str(recipe)], f"{recipe} is not UTF-8 text")


# ---- 9: an empty dev set ---------------------------------------------------------------------------------------------
def test_9_an_empty_dev_file_is_an_error(tiny, tmp_path, capsys):
    q, _, data = tiny
    empty = tmp_path / "dev.jsonl"
    empty.write_text("")
    one_error(capsys, train_args(small(tmp_path, q, data, tmp_path / "run", dev_file=str(empty))), "dev.jsonl")
    assert not (tmp_path / "run" / "checkpoints").exists()


# ---- 10, 13, 14, 21: what is loaded is checked: finite, right shape, readable, present ------------------------------
def edit_tensor(path: Path, name: str, fn):
    tensors = load_file(str(path))
    tensors[name] = fn(tensors[name])
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_10_13_a_base_with_nan_or_misshapen_scales_is_refused_everywhere(tiny, tmp_path, capsys):
    q, _, data = tiny
    bad = tmp_path / "bad"
    shutil.copytree(q, bad)
    name = "model.layers.0.mlp.down_proj.scales"

    def nan(t):
        t = t.clone()
        t[0, 0] = float("nan")
        return t

    edit_tensor(bad / "model.safetensors", name, nan)
    for argv in (train_args(small(tmp_path, bad, data, tmp_path / "r1")), ["eval", str(bad), "--nseq", "1"],
                 ["export", str(bad), "-o", str(tmp_path / "o1"), "--format", "hf"]):
        one_error(capsys, argv, "NaN/inf")
    edit_tensor(bad / "model.safetensors", name, lambda t: t[:, :-1].contiguous())
    for argv in (train_args(small(tmp_path, bad, data, tmp_path / "r2")), ["eval", str(bad), "--nseq", "1"]):
        one_error(capsys, argv, "has shape")
    assert not (tmp_path / "r1" / "checkpoints").exists() and not (tmp_path / "o1").exists()


def test_10_13_14_21_a_damaged_run_checkpoint_is_one_line_in_eval_export_and_resume(tiny, tmp_path, capsys):
    q, _, data = tiny
    run = tmp_path / "run"
    cfg = small(tmp_path, q, data, run, steps=2)
    trainer.train(cfg)
    ckpt = run / "checkpoints" / "step-000002"
    trained = ckpt / "trained.safetensors"
    good = trained.read_bytes()
    name = sorted(load_file(str(trained)))[0]
    uses = lambda: [["eval", str(run), "--checkpoint", "last", "--nseq", "1"],  # noqa: E731
                    ["export", str(run), "-o", str(tmp_path / "o")], train_args(small(tmp_path, q, data, run, steps=3))]
    edit_tensor(trained, name, lambda t: t * float("inf"))  # 10: non-finite
    for argv in uses():
        one_error(capsys, argv, "NaN/inf")
    trained.write_bytes(good)
    edit_tensor(trained, name, lambda t: torch.cat([t, t]))  # 13: wrong shape
    for argv in uses():
        one_error(capsys, argv, "has shape")
    trained.write_bytes(good[: len(good) // 2])  # 14: truncated
    for argv in uses():
        one_error(capsys, argv, "truncated or corrupt")
    trained.write_bytes(good)
    (ckpt / "state.json").write_text('{"step": 2, oops}')  # 21: corrupt state.json
    for argv in uses():
        one_error(capsys, argv, "state.json is corrupt")
    assert not (tmp_path / "o").exists()


def test_21_export_of_a_run_whose_base_is_gone_says_so(tiny, tmp_path, capsys):
    q, _, data = tiny
    base = tmp_path / "base"
    shutil.copytree(q, base)
    trainer.train(small(tmp_path, base, data, tmp_path / "run"))
    shutil.rmtree(base)
    one_error(capsys, ["export", str(tmp_path / "run"), "-o", str(tmp_path / "o")], "does not exist (moved or deleted?)")


# ---- 11: best/ is never behind the checkpoint that points at it ----------------------------------------------------
def test_11_a_kill_after_a_new_best_checkpoint_leaves_best_at_that_step(tiny, tmp_path, monkeypatch):
    q, _, data = tiny
    cfg = config(tmp_path, q, data, method="adamw", steps=6, eval_every=1, save_every=100, lr=1e-2)
    real = trainer.save_checkpoint

    class Killed(BaseException):
        pass

    def save_then_die(run, targets, method_state, state, keep_last):
        out = real(run, targets, method_state, state, keep_last)
        if state["step"] >= 2 and state["best_step"] == state["step"]:
            raise Killed  # as a kill -9 right after the checkpoint that records a new best
        return out

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        trainer.train(cfg)
    run = trainer.RunDir(cfg.output_dir)
    last = json.loads((run.checkpoint("last") / "state.json").read_text())
    best = json.loads((run.path / "best" / "state.json").read_text())
    assert last["best_step"] == last["step"] == best["step"] >= 2
    monkeypatch.setattr(trainer, "save_checkpoint", real)
    done = trainer.train(cfg)
    best = json.loads((run.path / "best" / "state.json").read_text())
    assert best["step"] == done.best_step and best["best_metric"] == done.best_metric


# ---- 12: inputs changed under the same path -------------------------------------------------------------------------
def test_12_resume_and_export_refuse_a_base_or_data_changed_in_place(tiny, tmp_path, capsys):
    q, src, data = tiny
    base = quantized(tmp_path, src)
    run = tmp_path / "run"
    trainer.train(small(tmp_path, base, data, run, steps=2))
    assert main(["quantize", str(src), "-o", str(base), "-q", "--group-size", "32", "--overwrite", "--asym"]) == 0
    one_error(capsys, train_args(small(tmp_path, base, data, run, steps=3)), "changed since")
    one_error(capsys, ["export", str(run), "-o", str(tmp_path / "o")], "changed since")
    assert main(["quantize", str(src), "-o", str(base), "-q", "--group-size", "32", "--overwrite"]) == 0
    assert main(["export", str(run), "-o", str(tmp_path / "o")]) == 0  # the same base again: accepted
    shutil.copy(data, tmp_path / "d.jsonl")
    run2 = tmp_path / "run2"
    trainer.train(small(tmp_path, base, tmp_path / "d.jsonl", run2, steps=2))
    with open(tmp_path / "d.jsonl", "a") as f:
        f.write(json.dumps({"prompt": "a new", "completion": " row"}) + "\n")
    one_error(capsys, train_args(small(tmp_path, base, tmp_path / "d.jsonl", run2, steps=3)), "train_file")


# ---- 15: a run that died before its first checkpoint ---------------------------------------------------------------
def test_15_a_run_without_a_checkpoint_restarts_or_is_replaced(tiny, tmp_path, monkeypatch):
    q, _, data = tiny
    run = tmp_path / "run"
    cfg = small(tmp_path, q, data, run, steps=3)

    class Killed(BaseException):
        pass

    def die(n, losses):
        raise Killed

    with monkeypatch.context() as mp:
        patch_losses(mp, die)
        with pytest.raises(Killed):
            trainer.train(cfg)
    assert (run / "config.yaml").exists() and not trainer.RunDir(run).steps()
    with pytest.raises(trainer.TrainingError, match="lr"):
        trainer.train(small(tmp_path, q, data, run, steps=3, lr=5e-3))  # a different run: refused
    out = trainer.train(cfg)  # the same config: starts again from step 0
    assert out.step == 3 and trainer.RunDir(run).steps() == [2, 3]
    steps = [r["step"] for r in trainer.RunDir(run).read_metrics() if "loss" in r]
    assert steps == sorted(set(steps))
    shutil.rmtree(run / "checkpoints")
    out = trainer.train(small(tmp_path, q, data, run, steps=2, lr=5e-3, overwrite=True))
    assert out.step == 2


# ---- 16, 17: a read-only or full disk is one line; the last checkpoint stays intact ---------------------------------
def fail_writes_under(monkeypatch, root: Path, code: int):
    """os.open / os.mkdir of anything under root fail with OSError `code` (a read-only or full filesystem)."""
    real_open, real_mkdir = os.open, os.mkdir

    def check(path):
        if str(os.path.abspath(path)).startswith(str(root)):
            raise OSError(code, os.strerror(code), str(path))

    def fake_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            check(path)
        return real_open(path, flags, *a, **k)

    def fake_mkdir(path, *a, **k):
        check(path)
        return real_mkdir(path, *a, **k)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)


def test_16_a_read_only_output_is_one_line_naming_it(tiny, tmp_path, monkeypatch, capsys):
    q, src, data = tiny
    run = tmp_path / "run"
    trainer.train(small(tmp_path, q, data, run))
    ro = tmp_path / "ro"
    ro.mkdir()
    fail_writes_under(monkeypatch, ro, errno.EROFS)
    for argv in (["quantize", str(src), "-o", str(ro / "q"), "-q"], ["export", str(run), "-o", str(ro / "e")],
                 train_args(small(tmp_path, q, data, ro / "run"))):
        line = one_error(capsys, argv, "Read-only file system")
        assert str(ro) in line
    assert list(ro.iterdir()) == []


def test_17_a_full_disk_names_the_failed_write_and_keeps_the_last_checkpoint(tiny, tmp_path, monkeypatch, capsys):
    q, _, data = tiny
    run = tmp_path / "run"
    cfg = small(tmp_path, q, data, run, steps=4, save_every=2)
    trainer.train(dataclass_replace(cfg, steps=2))
    kept = tree(run / "checkpoints" / "step-000002")
    fail_writes_under(monkeypatch, run / "checkpoints", errno.ENOSPC)
    line = one_error(capsys, train_args(cfg), "No space left on device")
    assert "step-000004" in line and "step-000002 is intact" in line
    assert trainer.RunDir(run).steps() == [2] and tree(run / "checkpoints" / "step-000002") == kept
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000002"]  # no temporary left


def dataclass_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


# ---- 22: a rerun removes what a killed run of the same command left ------------------------------------------------
def test_22_stale_temporaries_of_a_killed_writer_are_removed_by_the_next_run(tiny, tmp_path):
    q, src, data = tiny
    run = tmp_path / "run"
    trainer.train(small(tmp_path, q, data, run, steps=2))
    stale = [run / "checkpoints" / ".step-000003.tmp-ab12cd_3", run / ".best.tmp-zz99yy00",
             run / ".config.yaml.tmp-k3j4h5g6", tmp_path / ".q8.tmp-0a1b2c3d", tmp_path / ".q8.old-0a1b2c3d"]
    for s in stale:
        s.mkdir()
        (s / "trained.safetensors").write_bytes(b"x" * 1000)
    mine = run / "checkpoints" / ".step-notes"  # not a temporary's name: kept
    mine.write_text("mine")
    trainer.train(small(tmp_path, q, data, run, steps=3))
    assert api.quantize(src, tmp_path / "q8", bits=8, group_size=32)
    assert not any(s.exists() for s in stale) and mine.read_text() == "mine"


# ---- the lock itself -------------------------------------------------------------------------------------------------
def test_a_lock_left_beside_a_finished_output_is_removed_by_the_refusal(tiny, tmp_path, capsys):
    """quantize/export killed after the output was in place but before the lock was removed: the next command,
    which refuses the existing output, removes the free lock; a lock a live process holds stays."""
    q, _, _ = tiny
    out = tmp_path / "q8"
    assert main(["quantize", str(q.parent / "llama-src"), "-o", str(out), "-q"]) == 0
    (tmp_path / ".q8.lock").write_text("pid 1, qzo2 quantize\n")  # what the killed writer left
    one_error(capsys, ["quantize", str(q.parent / "llama-src"), "-o", str(out)], "already exists")
    assert not (tmp_path / ".q8.lock").exists()
    code = f"import time; from qzo2.outputs import locked\nwith locked({str(out)!r}, 'quantize'):\n" \
           f"    print('held', flush=True); time.sleep(60)"
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        outputs.clear_stale_lock(out)
        assert (tmp_path / ".q8.lock").exists()  # held: left alone
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()



def test_lock_file_is_beside_the_output_and_says_who_holds_it(tmp_path):
    with outputs.locked(tmp_path / "out", "quantize"):
        text = (tmp_path / ".out.lock").read_text()
        assert f"pid {os.getpid()}" in text and "quantize" in text
    assert not (tmp_path / ".out.lock").exists()
