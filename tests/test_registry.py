"""The method registry: a method is one file. A toy method defined here alone (heavy-ball SGD, with one key of its
own and momentum buffers as state) trains, checkpoints, resumes bit for bit, exports, benches and shows in --help
through `qzo2` with no other file touched; and no method name is written outside qzo2/methods/."""
from __future__ import annotations

import json
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qzo2 import objective
from qzo2.cli import main
from qzo2.config import ConfigError, TrainConfig, _f
from qzo2.methods import BenchMode, Method, register, registry, unregister
from qzo2.methods.base import store


@dataclass
class ToyOptions:
    toy_momentum: float = _f(0.9, "toy: momentum of the heavy-ball SGD", range="[0, 1)")


class Toy(Method):
    """theta -= lr * b, b = momentum * b + grad: needs its buffers back on resume to continue bit for bit."""

    def __init__(self, model, cfg, targets, kind):
        super().__init__(model, cfg, targets, kind)
        self.name = "toy"
        self.buf = {t.path: torch.zeros(t.tensor.shape, dtype=torch.float32) for t in targets}
        for t in targets:
            t.tensor.requires_grad_(True)

    def step(self, batch, step):
        sums, _ = objective.chunk_sums(self.model, self.kind, batch, 1)
        loss = sums[0] / objective.loss_weight(self.kind, batch).clamp(min=1.0)
        loss.backward()
        with torch.no_grad():
            for t in self.targets:
                b = self.buf[t.path].mul_(self.cfg.toy_momentum).add_(t.tensor.grad.float())
                t.tensor.grad = None
                store(t, t.tensor.float() - self.lr_at(step) * b, step, self.cfg.scale_floor)
        return {"loss": float(loss.detach())}

    def state_tensors(self):
        return {f"{p}.toy_buf": b for p, b in self.buf.items()}

    def close(self):
        for t in self.targets:
            t.tensor.grad = None
            t.tensor.requires_grad_(False)


@pytest.fixture
def toy():
    register("toy", help="Toy: heavy-ball SGD (a test method).", options=ToyOptions, first_order=True,
             accumulates="a toy step is one batch", bench={"toy-bench": BenchMode(quantized=True)})(Toy)
    yield
    unregister("toy")


def test_a_method_defined_in_one_file_trains_resumes_exports_and_benches(toy, tiny, tmp_path, capsys):
    q, _, data = tiny
    # --help lists it with its key; the config takes its key flat and refuses it for another method
    try:
        code = main(["train", "--help"])
    except SystemExit as e:
        code = e.code
    assert code == 0
    help_text = capsys.readouterr().out
    assert re.search(r"^  toy +Toy: heavy-ball SGD", help_text, re.M) and "keys of method toy:" in help_text
    assert "toy_momentum" in help_text
    assert TrainConfig(method="toy", toy_momentum=0.5).toy_momentum == 0.5
    with pytest.raises(ConfigError, match="toy_momentum is a key of method toy, not of method=adalomo"):
        TrainConfig(method="adalomo", toy_momentum=0.5)
    with pytest.raises(ConfigError, match="gradient_accumulation_steps > 1 does not work with method=toy: a toy"):
        TrainConfig(method="toy", gradient_accumulation_steps=2)

    common = [f"model={q}", "method=toy", "toy_momentum=0.5", "task=", f"train_file={data}", f"dev_file={data}",
              "batch_size=2", "lr=1e-3", "max_length=32", "eval_every=2", "save_every=2", "log_every=1",
              "progress=false"]
    assert main(["train", "--print-config", *common]) == 0
    printed = capsys.readouterr().out
    assert "toy_momentum: 0.5" in printed and not re.search("^eps:", printed, re.M)  # no other method's keys
    assert main(["train", *common, "steps=6", f"output_dir={tmp_path / 'a'}"]) == 0
    assert main(["train", *common, "steps=4", f"output_dir={tmp_path / 'b'}"]) == 0
    assert main(["train", *common, "steps=6", f"output_dir={tmp_path / 'b'}"]) == 0  # resumed from step 4
    a, b = (tmp_path / r / "checkpoints" / "step-000006" for r in ("a", "b"))
    for f in ("trained.safetensors", "method.safetensors"):
        ta, tb = load_file(str(a / f)), load_file(str(b / f))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), f
    assert any(k.endswith(".toy_buf") for k in load_file(str(a / "method.safetensors")))
    trained = load_file(str(a / "trained.safetensors"))
    base = {k: v for f in Path(q).glob("*.safetensors") for k, v in load_file(str(f)).items() if k.endswith(".scales")}
    assert any(not torch.equal(trained[k].half(), base[k]) for k in trained)  # it trained
    assert json.loads((a / "state.json").read_text())["config"]["toy_momentum"] == 0.5

    # exported: a GPTQ checkpoint whose scales are the trained ones
    out = tmp_path / "export"
    assert main(["export", str(tmp_path / "a"), "-o", str(out), "--checkpoint", "last"]) == 0
    exported = {k: v for f in out.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    assert all(torch.equal(exported[k], trained[k].half()) for k in trained)
    assert "Method: toy" in (out / "README.md").read_text()

    # bench mode from the registry
    capsys.readouterr()
    assert main(["bench", "--shape", "tiny", "--mode", "toy-bench", "--batch", "1", "--seq", "16", "--steps", "1",
                 "--warmup", "0", "--device", "cpu"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["mode"] == "toy-bench" and record["step_ms"] > 0


def test_registering_a_clashing_method_is_refused():
    @dataclass
    class Clash:
        eps: float = _f(0.5, "another eps")

    with pytest.raises(ValueError, match="key eps is also a key of method"):
        register("clash", help="x", options=Clash)(Toy)
    with pytest.raises(ValueError, match="bench mode qzo belongs to method qzo"):
        register("clash", help="x", bench={"qzo": BenchMode(quantized=True)})(Toy)
    with pytest.raises(ValueError, match="trains must be"):
        register("clash", help="x", trains=("codes",))(Toy)
    assert "clash" not in registry.names()


def test_no_method_is_named_outside_the_methods_package():
    """config, trainer, cli and api read the registry; the default method is named once, as the default."""
    root = Path(__file__).resolve().parents[1] / "qzo2"
    names = registry.names()
    pattern = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, names)) + r")(?![\w-])")
    found = {f: pattern.findall((root / f).read_text()) for f in ("config.py", "trainer.py", "cli.py", "api.py")}
    default = TrainConfig().method
    assert found == {"config.py": [default], "trainer.py": [], "cli.py": [], "api.py": []}


def test_the_example_method_of_the_architecture_doc_runs(tiny, tmp_path):
    """docs/architecture.md's 'Adding a method' example, as printed, registers and trains."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text()
    code = re.search(r"```python\n(# qzo2/methods/(\w+)\.py\n.*?)```", doc, re.S)
    source = re.sub(r"from \.\.? ?import", "from qzo2 import", code.group(1))
    source = re.sub(r"from \.\.(\w+) import", r"from qzo2.\1 import", source)
    source = re.sub(r"from \.(\w+) import", r"from qzo2.methods.\1 import", source)
    name = code.group(2)
    module = types.ModuleType(f"doc_{name}")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    try:
        exec(compile(source, "docs/architecture.md", "exec"), module.__dict__)
        q, _, data = tiny
        assert main(["train", f"model={q}", f"method={name}", "task=", f"train_file={data}", "steps=2",
                     "batch_size=2", "lr=1e-4", "max_length=32", "eval_every=0", "progress=false",
                     f"output_dir={tmp_path / 'run'}"]) == 0
        trained = load_file(str(tmp_path / "run" / "checkpoints" / "step-000002" / "trained.safetensors"))
        base = {k: v for f in Path(q).glob("*.safetensors") for k, v in load_file(str(f)).items()}
        assert any(not torch.equal(trained[k].half(), base[k]) for k in trained)
    finally:
        unregister(name)
        sys.modules.pop(module.__name__, None)
