"""The trainer alone: accumulation, the non-finite guard, role-agnosticism."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator

from accel_distill.config.schema import TrainingConfig
from accel_distill.errors import DataError
from accel_distill.families.base import ModelAdapter
from accel_distill.methods.base import DistillMethod
from accel_distill.noise import RectifiedFlow
from accel_distill.roles import ModelBundle, RoleHandle
from accel_distill.trainer import Callback, Trainer, TrainingDiverged


class NoModelAdapter(ModelAdapter):
    def _forward(self, module, dtype, x_t, t, cond):
        return module(x_t)


class Regression(DistillMethod):
    """Least squares on a linear 'student': the smallest method the contract allows."""

    name = "regression"
    required_roles = ("student",)

    def __init__(self, accelerator: Accelerator, *, poison: set[int] = frozenset(), blow_up: set[int] = frozenset()):
        model = torch.nn.Linear(4, 1, bias=False)
        torch.nn.init.zeros_(model.weight)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model, opt = accelerator.prepare(model, opt)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        bundle = ModelBundle(
            {
                "student": RoleHandle(
                    "student",
                    {"transformer": model},
                    True,
                    torch.float32,
                    1e9,
                    {"transformer": opt},
                    {"transformer": sched},
                )
            }
        )
        cfg = SimpleNamespace(training=SimpleNamespace(seed=0), method_config=None)
        super().__init__(bundle, NoModelAdapter(RectifiedFlow(1.0), 4), cfg, device=accelerator.device)
        self.poison, self.blow_up, self.calls = poison, blow_up, 0

    def train_step(self, batch, iteration):
        self.calls += 1
        pred = self.bundle["student"].transformer(batch["x"]).squeeze(-1)
        loss = ((pred - batch["y"]) ** 2).mean()
        if iteration in self.poison:
            loss = loss * float("nan")
        if iteration in self.blow_up:  # finite in fp32, but x the loss scale it overflows
            loss = loss * 1e35
        return {"total_loss": loss}, {}


def batches(batch_size: int):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=gen)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
    i = 0
    while True:
        idx = torch.arange(i, i + batch_size) % 64
        i += batch_size
        yield {"x": x[idx], "y": y[idx]}


def training(**kw) -> TrainingConfig:
    return TrainingConfig(output_dir="unused", data_path="unused", **kw)


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


def test_accumulation_equals_one_big_batch(accelerator):
    """G micro-batches of b (loss / G, one step) == one batch of G*b: no double counting."""
    small = Regression(accelerator)
    Trainer(accelerator, small, batches(2), training(gradient_accumulation_steps=4, max_train_steps=5)).run()
    big = Regression(accelerator)
    Trainer(accelerator, big, batches(8), training(gradient_accumulation_steps=1, max_train_steps=5)).run()
    assert small.calls == 20 and big.calls == 5
    w_small, w_big = small.bundle["student"].transformer.weight, big.bundle["student"].transformer.weight
    torch.testing.assert_close(w_small, w_big, rtol=1e-6, atol=1e-7)
    assert not torch.equal(w_big, torch.zeros_like(w_big))


def test_non_finite_steps_are_skipped_and_counted(accelerator, tmp_path):
    method = Regression(accelerator, poison={1, 2})
    trainer = Trainer(accelerator, method, batches(4), training(max_train_steps=5), metrics_file=tmp_path / "m.jsonl")
    weights = []
    for _ in range(5):
        trainer.step()
        weights.append(method.bundle["student"].transformer.weight.detach().clone())
    assert torch.equal(weights[0], weights[1]) and torch.equal(weights[1], weights[2])  # skipped
    assert not torch.equal(weights[2], weights[3])  # training goes on
    assert trainer.state.skipped_steps == 2 and trainer.state.consecutive_nonfinite == 0
    assert all(math.isfinite(v) for v in weights[-1].flatten().tolist())


def test_a_non_finite_input_stops_before_the_update_naming_its_row(accelerator):
    """An inf in the second micro-batch: the device flag joins the iteration's one sync, the host copy
    names the sample (its row_sources entry), and no optimizer step runs, not even for the first one."""

    def named(source):
        for k, b in enumerate(source):
            if k == 3:
                b["x"] = b["x"].clone()
                b["x"][1, 2] = float("inf")
            yield {**b, "row_sources": [f"data.parquet row {2 * k + i}" for i in range(len(b["x"]))]}

    method = Regression(accelerator)
    trainer = Trainer(
        accelerator, method, named(batches(2)), training(gradient_accumulation_steps=2, max_train_steps=4)
    )
    trainer.step()
    before = method.bundle["student"].transformer.weight.detach().clone()
    with pytest.raises(DataError) as e:
        trainer.step()  # micro-batches 2 and 3
    assert str(e.value) == "data.parquet row 7: x has 1 non-finite values (NaN or inf)"
    assert torch.equal(method.bundle["student"].transformer.weight, before)
    assert trainer.state.iteration == 1 and trainer.state.skipped_steps == 0


def test_too_many_consecutive_non_finite_steps_stop_with_a_clear_error(accelerator):
    method = Regression(accelerator, poison=set(range(2, 100)))
    trainer = Trainer(accelerator, method, batches(4), training(max_train_steps=50, max_consecutive_nonfinite=3))
    with pytest.raises(TrainingDiverged, match="3 consecutive iterations .* at iteration 4"):
        trainer.run()
    assert trainer.state.iteration == 4 and trainer.state.skipped_steps == 3


def test_trainer_names_no_role_and_no_method():
    """The loop is algorithm-agnostic: no role or method name appears in its code."""
    source = (Path(__file__).parents[1] / "accel_distill" / "trainer" / "loop.py").read_text()
    strings = {n.value for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    names = {n.id for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Name)}
    for word in ("student", "teacher", "critic", "dmd2", "finetune"):
        assert not any(word in s for s in strings) and word not in names


class ConstantMetric(Callback):
    name = "constant"

    def on_step_end(self, trainer, iteration, stepped):
        return {"callback_metric": 0.5}


def test_no_tensor_is_created_off_the_accelerator_device(accelerator, tmp_path):
    """Tensors the loop makes must name the accelerator's device (a CUDA run died on CPU metric tensors).

    Under a ``meta`` default device, any tensor created without a device lands on meta and
    mixing it with the losses fails, which is what a CPU tensor among CUDA losses does on a GPU.
    """
    method = Regression(accelerator)
    data = [next(batches(4)) for _ in range(4)]  # made before the default device changes
    trainer = Trainer(
        accelerator,
        method,
        iter(data),
        training(max_train_steps=4, log_every=2),
        callbacks=[ConstantMetric()],
        metrics_file=tmp_path / "m.jsonl",
    )
    with torch.device("meta"):
        trainer.run()
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [2, 4]
    assert all(r["callback_metric"] == 0.5 and math.isfinite(r["total_loss"]) for r in rows)


def fp16_accelerator() -> Accelerator:
    """An accelerator with a real GradScaler and fp16 autocast on the CPU (accelerate gives neither there)."""
    acc = Accelerator(cpu=True)
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    acc.native_amp = True
    return acc


def test_fp16_overflow_is_skipped_with_a_lower_loss_scale_and_training_goes_on(tmp_path, monkeypatch):
    """An fp16 gradient overflow skips the update, halves the scale, and the next iteration trains.

    Before the fix, the skipped iteration never reached ``scaler.update()``, so the next
    ``unscale_`` raised: dynamic loss scaling could not survive its first overflow.
    """
    monkeypatch.setattr(Accelerator, "mixed_precision", property(lambda self: "fp16"))
    acc = fp16_accelerator()
    method = Regression(acc, blow_up={1})
    trainer = Trainer(acc, method, batches(4), training(max_train_steps=4), metrics_file=tmp_path / "m.jsonl")
    weights, scales = [], []
    for _ in range(4):
        trainer.step()
        weights.append(method.bundle["student"].transformer.weight.detach().clone())
        scales.append(acc.scaler.get_scale())
    assert not torch.equal(weights[0], torch.zeros_like(weights[0]))  # iteration 0 stepped
    assert torch.equal(weights[0], weights[1])  # the overflow was skipped
    assert not torch.equal(weights[1], weights[2]) and not torch.equal(weights[2], weights[3])
    assert scales[1] == scales[0] / 2 and scales[2] == scales[1] == scales[3]
    # a scaler finding its range is not divergence; the skip is still counted
    assert trainer.state.skipped_steps == 1 and trainer.state.consecutive_nonfinite == 0
    assert all(math.isfinite(v) for v in weights[-1].flatten().tolist())
