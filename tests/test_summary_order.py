"""``summary()`` lists rows in module order: an activity row right after its module's weight row."""

from __future__ import annotations

from torch import nn

import torchreg


def test_activity_rows_come_in_module_order():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    torchreg.apply_regularization(model, {"0": torchreg.ActivityL1(1e-3), nn.Linear: torchreg.L2(1e-2),
                                          "3": torchreg.ActivityL2(1e-3)})
    rows = [(r["module"], r["regularizer"]) for r in torchreg.summary(model).records]
    assert rows == [("0", "L2(lam=0.01)"), ("0", "ActivityL1(lam=0.001)"), ("2", "L2(lam=0.01)"),
                    ("3", "ActivityL2(lam=0.001)"), ("4", "L2(lam=0.01)")]
    assert all(r["tied"] == {} for r in torchreg.summary(model).records)
