"""Both integrations log the penalty and the sparsity where people look at their runs.

Lightning: read back from a ``CSVLogger``'s file. Hugging Face: from ``trainer.state.log_history`` and
from a callback standing for a ``report_to`` integration. Each logged value is compared with the
penalty and zero counts computed by hand from the weights at that step (recorded by a test callback).
The cost: torchreg reads the device exactly once per log and never on other steps, counted by
wrapping every tensor-to-host method while training.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import os
import warnings
from typing import Dict, List

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchreg
import torchreg._metrics

TORCHREG_DIR = os.path.dirname(torchreg.__file__)
HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy", "cpu")


@contextlib.contextmanager
def torchreg_host_reads():
    """Count the tensor-to-host reads (``.item()``, ``.tolist()``, ``float(t)``, ...) made by torchreg's
    own code, i.e. the host synchronizations it causes on an accelerator."""
    counts: List[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def wrap(name, original):
        def counted(self, *args, **kwargs):
            caller = __import__("sys")._getframe(1).f_code.co_filename
            if caller.startswith(TORCHREG_DIR):
                counts.append(f"{name} in {os.path.basename(caller)}")
            return original(self, *args, **kwargs)
        return counted

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(name, original))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


# -- what the values must be, by hand -------------------------------------------------------------------
LAM1, LAM_G = 1e-2, 0.3


def expected_values(net: nn.Module) -> Dict[str, float]:
    """net[0]: GroupLasso(dim=1, proximal), net[3]: L1 (gradient mode); formulas typed out here."""
    w0, w3 = net[0].weight.detach().double(), net[3].weight.detach().double()
    norms = w0.pow(2).sum(0).sqrt()
    group = LAM_G * norms.sum().item()
    l1 = LAM1 * w3.abs().sum().item()
    zeros = (w0 == 0).sum().item()
    return {"reg_penalty": group + l1, "reg_zero_fraction": zeros / w0.numel(),
            "reg_zero_group_fraction": (norms == 0).sum().item() / norms.numel(),
            "reg_penalty/GroupLasso": group, "reg_penalty/L1": l1,
            "reg_zero_fraction/GroupLasso": zeros / w0.numel(),
            "reg_zero_group_fraction/GroupLasso": (norms == 0).sum().item() / norms.numel()}


def rules():
    return {"net.0": torchreg.GroupLasso(lam=LAM_G, dim=1, proximal=True), "net.3": torchreg.L1(lam=LAM1)}


def data(n: int = 24):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 6, generator=g)
    x[:, 4:] *= 0.01  # two nearly useless inputs: the group lasso zeroes their columns
    return x, x[:, :2].sum(1, keepdim=True)


def test_values_match_the_hand_formulas_and_torchreg_penalty():
    torch.manual_seed(0)
    model = nn.Module()
    model.net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Identity(), nn.Linear(8, 1))
    torchreg.apply_regularization(model, rules())
    with torch.no_grad():
        model.net[0].weight[:, 4:] = 0.0
    ours = torchreg._metrics.values(model, per_rule=True)
    assert ours == pytest.approx(expected_values(model.net), rel=1e-6)
    assert ours["reg_zero_group_fraction"] == 2 / 6
    assert ours["reg_penalty"] == pytest.approx(torchreg.penalty(model).item(), rel=1e-6)
    assert set(torchreg._metrics.values(model)) == {"reg_penalty", "reg_zero_fraction", "reg_zero_group_fraction"}
    with torchreg_host_reads() as reads:
        torchreg._metrics.values(model, per_rule=True)
    assert reads == ["tolist in _metrics.py"]  # one read, however many rules and parameters


def test_rule_names_count_up_per_class_and_gradient_rules_log_no_sparsity():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
    torchreg.apply_regularization(model, {"0": torchreg.L2(0.1), "1": torchreg.L2(0.2), "2": torchreg.L2(0.1)})
    assert list(torchreg._metrics.rule_names(model)) == ["L2", "L2_2", "L2_3"]
    assert set(torchreg._metrics.values(model, per_rule=True)) == {"reg_penalty", "reg_penalty/L2",
                                                                   "reg_penalty/L2_2", "reg_penalty/L2_3"}


# ======================================================================================================
# Lightning
# ======================================================================================================
def lightning_module_class(L):
    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Identity(), nn.Linear(8, 1))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.5)

    return Net


def fit_lightning(tmp_path, callback, logger=True, steps_logged=2):
    L = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.loggers import CSVLogger

    class Record(L.Callback):  # the reference: values by hand after every optimizer step
        def __init__(self):
            self.at: Dict[int, Dict[str, float]] = {}

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.at[trainer.global_step] = expected_values(module.net)

    record = Record()
    x, y = data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on num_workers etc.
        trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=2, accumulate_grad_batches=2,
                            log_every_n_steps=steps_logged,
                            logger=CSVLogger(str(tmp_path)) if logger else False, callbacks=[callback, record],
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(lightning_module_class(L)(), DataLoader(TensorDataset(x, y), batch_size=4))
    return trainer, record


def read_csv(tmp_path) -> List[Dict[str, str]]:
    """The rows of the CSVLogger's file (none when nothing was logged: it writes no file then)."""
    rows = []
    for path in glob.glob(str(tmp_path / "**" / "metrics.csv"), recursive=True):
        with open(path) as f:
            rows.extend(csv.DictReader(f))
    return rows


def test_lightning_logs_at_the_logging_interval_read_back_from_csv(tmp_path):
    import torchreg.lightning

    callback = torchreg.lightning.Regularization(rules(), log_per_rule=True)
    with torchreg_host_reads() as reads:
        trainer, record = fit_lightning(tmp_path, callback)
    assert trainer.global_step == 6  # 12 batches, accumulation 2
    rows = read_csv(tmp_path)
    assert len(glob.glob(str(tmp_path / "**" / "metrics.csv"), recursive=True)) == 1
    logged = [row for row in rows if row.get("reg_penalty")]
    # every 2nd optimizer step (2, 4, 6); Lightning's CSV "step" counts steps before this one
    assert [int(row["step"]) for row in logged] == [1, 3, 5]
    for row in logged:
        expected = record.at[int(row["step"]) + 1]
        got = {key: float(value) for key, value in row.items() if key.startswith("reg_")}
        assert got == pytest.approx(expected, rel=1e-6)  # Lightning stores float32
    assert float(logged[-1]["reg_zero_group_fraction"]) > 0  # the group lasso zeroed some inputs
    assert reads == ["tolist in _metrics.py"] * 3  # one host read per log, none on the other 9 batches


def test_lightning_log_off_and_no_logger_compute_nothing(tmp_path, monkeypatch):
    import torchreg.lightning

    calls = []
    original = torchreg._metrics.values
    monkeypatch.setattr(torchreg._metrics, "values", lambda *a, **k: calls.append(1) or original(*a, **k))
    fit_lightning(tmp_path / "off", torchreg.lightning.Regularization(rules(), logging=False))
    assert not any(key.startswith("reg_") for row in read_csv(tmp_path / "off") for key in row)
    fit_lightning(tmp_path / "none", torchreg.lightning.Regularization(rules()), logger=False)
    assert calls == []


def test_lightning_repr_and_a_yaml_rules_list():
    import torchreg.lightning

    callback = torchreg.lightning.Regularization({nn.Linear: torchreg.L2(lam=1e-4)}, log_per_rule=True)
    assert repr(callback) == ("torchreg.lightning.Regularization(rules={<class 'torch.nn.modules.linear.Linear'>: "
                              "L2(lam=0.0001)}, strict=False, logging=True, log_per_rule=True)")
    config = [{"match": {"type": "Linear"}, "regularizer": {"type": "L2", "lam": 1e-4}}]
    with pytest.raises(TypeError) as error:
        torchreg.lightning.Regularization(config)
    assert str(error.value) == (
        "torchreg.lightning.Regularization: rules must be a mapping from module class or name pattern to "
        "regularizer; got a list. A list of {match: ..., regularizer: ...} entries, as in a YAML or JSON config, "
        "is plain data: turn it into rules first with torchreg.rules_from_config(config)")
    assert list(torchreg.lightning.Regularization(torchreg.rules_from_config(config)).rules) == [nn.Linear]
    with pytest.raises(TypeError, match=r"logging must be True or False, got 'yes' \(str\)"):
        torchreg.lightning.Regularization(logging="yes")


# ======================================================================================================
# Hugging Face Trainer
# ======================================================================================================
class Regression(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Identity(), nn.Linear(8, 1))

    def forward(self, x, labels=None):
        out = self.net(x)
        return {"loss": nn.functional.mse_loss(out, labels), "logits": out}


class Rows(torch.utils.data.Dataset):
    def __init__(self):
        x, y = data()
        self.rows = [{"x": x[i], "labels": y[i]} for i in range(len(x))]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def hf_trainer(tmp_path, **arguments):
    transformers = pytest.importorskip("transformers")
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                    num_train_epochs=2, learning_rate=0.2, use_cpu=True, report_to=[], save_strategy="no",
                    logging_steps=2, disable_tqdm=True, seed=0, dataloader_num_workers=0, lr_scheduler_type="constant",
                    eval_strategy="steps", eval_steps=3)
    settings.update(arguments)

    class Record(transformers.TrainerCallback):  # the reference, and a stand-in for a report_to integration
        def __init__(self):
            self.at: Dict[int, Dict[str, float]] = {}
            self.seen: List[Dict[str, float]] = []

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.at[state.global_step] = expected_values(model.net)

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.seen.append(dict(logs))

    record = Record()
    model = Regression()
    # SGD: Adam's proximal group-lasso operator reads the host in its own right (not a logging cost)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = transformers.Trainer(model=model, args=transformers.TrainingArguments(**settings),
                                       train_dataset=Rows(), eval_dataset=Rows(), callbacks=[record],
                                       optimizers=(optimizer, None))
    return trainer, record


def train(trainer):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()


def test_hf_log_history_and_report_to_callbacks_get_the_keys_at_logging_steps(tmp_path):
    import torchreg.hf

    trainer, record = hf_trainer(tmp_path)
    torchreg.hf.attach(trainer, rules(), log_per_rule=True)
    with torchreg_host_reads() as reads:
        train(trainer)
    assert trainer.state.global_step == 6
    logged = [h for h in trainer.state.log_history if "reg_penalty" in h]
    assert [h["step"] for h in logged] == [2, 4, 6]
    for h in logged:
        assert {k: v for k, v in h.items() if k.startswith("reg_")} == pytest.approx(record.at[h["step"]], rel=1e-6)
        assert "loss" in h  # the training log, not the evaluation's
    assert not any("reg_penalty" in h for h in trainer.state.log_history if "eval_loss" in h or "train_loss" in h)
    # a callback added before attach (as report_to integrations are) sees them too
    assert [h["reg_penalty"] for h in record.seen if "reg_penalty" in h] == [h["reg_penalty"] for h in logged]
    assert logged[-1]["reg_zero_group_fraction"] > 0
    assert reads == ["tolist in _metrics.py"] * 3  # one host read per log, none on other steps


def test_hf_log_off_and_removed_callback_add_nothing(tmp_path):
    import torchreg.hf

    trainer, _ = hf_trainer(tmp_path / "off")
    torchreg.hf.attach(trainer, rules(), logging=False)
    train(trainer)
    assert trainer.state.log_history and not any("reg_penalty" in h for h in trainer.state.log_history)
    trainer, _ = hf_trainer(tmp_path / "removed")
    callback = torchreg.hf.attach(trainer, rules())
    trainer.remove_callback(callback)
    torchreg.configure(trainer.model, accumulation_steps=2)
    train(trainer)
    assert not any("reg_penalty" in h for h in trainer.state.log_history)


def test_hf_repr_and_a_yaml_rules_list(tmp_path):
    import torchreg.hf

    trainer, _ = hf_trainer(tmp_path)
    callback = torchreg.hf.attach(trainer, {nn.Linear: torchreg.L2(lam=1e-4)})
    assert repr(callback) == ("torchreg.hf.RegularizationCallback(rules={<class 'torch.nn.modules.linear.Linear'>: "
                              "L2(lam=0.0001)}, strict=False, logging=True, log_per_rule=False)")
    trainer, _ = hf_trainer(tmp_path)
    with pytest.raises(TypeError, match=r"torchreg\.hf\.attach: rules must be a mapping .* got a list\. .*"
                                        r"torchreg\.rules_from_config\(config\)"):
        torchreg.hf.attach(trainer, [{"match": {"type": "Linear"}, "regularizer": None}])
    assert not any(True for _ in torchreg._engine.units_in(trainer.model))  # nothing changed
    with pytest.raises(TypeError, match=r"log_per_rule must be True or False, got 1 \(int\)"):
        torchreg.hf.attach(trainer, {nn.Linear: torchreg.L2(lam=1e-4)}, log_per_rule=1)
    assert not any(True for _ in torchreg._engine.units_in(trainer.model))


def test_hf_attach_keeps_no_reference_cycle_to_the_trainer(tmp_path):
    """The wrapped trainer.log refers to the trainer weakly: dropping the trainer frees it at once,
    without waiting for the garbage collector (a Trainer holds the model and the optimizer)."""
    import gc
    import weakref

    import torchreg.hf

    trainer, _ = hf_trainer(tmp_path)
    torchreg.hf.attach(trainer, rules())
    ref = weakref.ref(trainer)
    gc.disable()
    try:
        del trainer
        assert ref() is None
    finally:
        gc.enable()
