"""torchreg: Keras-style regularization of PyTorch layers, by gradient hooks.

The regularization gradient (``lam * sign(w)`` for L1, ``lam * w`` for L2, as ``torch.optim``'s
``weight_decay``) is added to ``w.grad`` during backward; the loss and the training loop stay as
they are. Also: Elastic-Net, group lasso and orthogonality penalties, proximal (exactly sparse) L1,
Elastic-Net and group lasso applied after each optimizer step, penalties on a layer's outputs
(``ActivityL1``, ``ActivityL2``), rules as plain data, and optimizer parameter groups from the same
selection, :func:`is_regularized`, and :func:`lambda_max` (the strength from which an L1 or group-lasso
layer is all zero). Integrations: ``torchreg.lightning``, ``torchreg.hf`` (imported only when asked for).

>>> import torch, torchreg
>>> net = torch.nn.Sequential(torchreg.L1(torch.nn.Linear(8, 8), lam=1e-4), torch.nn.ReLU(),
...                           torchreg.L2(torch.nn.Linear(8, 1), lam=1e-3))
"""

from .activity import ActivityL1, ActivityL2
from .config import rules_from_config, rules_to_config
from .constraints import Constraint, MaxNorm, MinMaxNorm, NonNeg, UnitNorm
from ._registry import is_regularized
from .fisher import fisher_diagonal
from .groups import param_groups
from .regularizers import ElasticNet, GroupLasso, L1, L2, Orthogonal, Regularizer
from .report import Sparsity, Summary, penalty, sparsity, summary
from .training import configure
from .tuning import lambda_max
from .walker import apply_regularization, remove_regularization

__version__ = "0.1.0"

__all__ = [
    "ActivityL1",
    "ActivityL2",
    "Constraint",
    "ElasticNet",
    "GroupLasso",
    "L1",
    "L2",
    "MaxNorm",
    "MinMaxNorm",
    "NonNeg",
    "Orthogonal",
    "Regularizer",
    "Sparsity",
    "Summary",
    "UnitNorm",
    "__version__",
    "apply_regularization",
    "configure",
    "fisher_diagonal",
    "is_regularized",
    "lambda_max",
    "param_groups",
    "penalty",
    "remove_regularization",
    "rules_from_config",
    "rules_to_config",
    "sparsity",
    "summary",
]
