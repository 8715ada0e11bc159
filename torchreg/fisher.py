"""The diagonal empirical Fisher information of a model: the importance of each weight for EWC.

Elastic weight consolidation (Kirkpatrick et al., PNAS 2017) keeps the weights that mattered for a
previous task close to their values after it, each in proportion to its importance ``F``, estimated
by the diagonal of the Fisher information at those weights. :func:`fisher_diagonal` computes the
*empirical* Fisher: the mean over samples of the squared per-sample gradient of the loss at the
observed targets. Pass it to :class:`torchreg.L2` as ``importance=``, with ``center=`` the weights it
was computed at.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Tuple

import torch
from torch import Tensor, nn

from . import _activity_engine, _registry

__all__ = ["fisher_diagonal"]


def fisher_diagonal(
    model: nn.Module,
    batches: Iterable[Tuple[Any, Tensor]],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
) -> Dict[str, Tensor]:
    """The diagonal empirical Fisher of ``model``: ``F = mean_n (d loss_n / d w) ** 2``.

    The mean is over *samples*: each sample's gradient is computed on its own (with ``torch.func``:
    ``vmap`` of ``grad`` of ``functional_call``, one batch at a time) and squared before averaging.
    This is not the square of a batch's mean gradient, which is smaller by about the batch size and
    loses the per-sample information EWC relies on.

    Assumptions:

    * ``batches`` yields ``(inputs, targets)`` pairs whose first dimension is the sample (a
      ``DataLoader`` over a labelled data set); ``inputs`` is a tensor, or a tuple of tensors passed as
      ``model(*inputs)``. Every batch contributes each of its samples once; the mean divides by the
      total number of samples.
    * ``loss_fn(output, target)`` is the loss of **one** sample: it is called with the model's output
      for a batch of one (shape ``(1, ...)``) and that sample's target (shape ``(1, ...)``), and must
      return a 0-dim tensor (e.g. ``torch.nn.functional.cross_entropy`` with its default mean
      reduction). For a classifier this is the empirical Fisher, at the observed labels.
    * The model runs as it is, once per sample: samples must not interact. Put it in eval mode
      (``model.eval()``), as after training a task; a BatchNorm layer in training mode (which mixes a
      batch's samples and updates running statistics) is refused with ``ValueError``. Dropout in
      training mode draws an independent mask per sample.
    * Weight regularization applied by torchreg does not enter the result (the Fisher is of the loss
      alone); activity regularization would (its hooks act on the outputs), and is refused.
    * Memory: the per-sample gradients of one batch exist at once (batch size times the trainable
      parameters); use smaller batches to use less.

    Args:
        model: the model, at the weights the importance is wanted for (a previous task's solution).
        batches: an iterable of ``(inputs, targets)`` pairs, e.g. a ``DataLoader``.
        loss_fn: ``loss_fn(output, target) -> 0-dim tensor``, the loss of one sample.

    Returns:
        ``{name: tensor}`` for every trainable parameter (``requires_grad=True``), named as in
        ``model.named_parameters()``, each of its parameter's shape, dtype and device, ``>= 0``.
        The model and its parameters' ``.grad`` are left unchanged.

    Raises:
        TypeError: ``model`` is no ``nn.Module``, ``loss_fn`` is not callable, a batch is not an
            ``(inputs, targets)`` pair, or the loss is not a tensor.
        ValueError: no trainable parameter, no sample in ``batches``, a BatchNorm layer in training
            mode, activity regularization on the model (its term would enter the Fisher), inputs and
            targets with different numbers of samples, or a loss that is not 0-dim.

    Example::

        >>> import torch, torchreg
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.fill_(0.0)
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> y = torch.tensor([[1.0], [1.0]])
        >>> loss = lambda out, target: 0.5 * ((out - target) ** 2).sum()
        >>> # per-sample gradients (w x - y) x: [-1, 0] and [0, -2]; their squares averaged
        >>> torchreg.fisher_diagonal(model, [(x, y)], loss)
        {'weight': tensor([[0.5000, 2.0000]])}
    """
    from torch.func import functional_call, grad, vmap

    if not isinstance(model, nn.Module):
        raise TypeError(f"fisher_diagonal expects an nn.Module as model, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"fisher_diagonal expects a callable loss_fn(output, target), got {loss_fn!r}")
    for path, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.training and (
            isinstance(module, nn.modules.batchnorm._BatchNorm) or module.track_running_stats
        ):
            raise ValueError(
                f"fisher_diagonal: {type(module).__name__} {path or '(the model)'!r} is in training mode, "
                "where it mixes the samples of a batch or updates its running statistics, so per-sample "
                "gradients are not defined; call model.eval() first"
            )
    paths = {id(m): path for path, m in model.named_modules()}
    activity = [repr(paths.get(id(entry.module), entry.name)) if paths.get(id(entry.module)) else "the model"
                for unit in _registry.units_in(model, _activity_engine.KIND) for entry in unit.entries]
    if activity:  # its forward hooks would add the output penalty's gradient to every sample's
        raise ValueError(
            f"fisher_diagonal: {type(model).__name__} carries activity regularization (on {', '.join(activity[:3])}"
            f"{', ...' if len(activity) > 3 else ''}), whose term would enter the Fisher of the loss; compute the "
            "Fisher before applying it, or after torchreg.remove_regularization(model)"
        )
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise ValueError(f"fisher_diagonal: {type(model).__name__} has no trainable parameter (requires_grad=True)")
    frozen = {name: p.detach() for name, p in model.named_parameters() if not p.requires_grad}
    buffers = {name: b for name, b in model.named_buffers()}

    def sample_loss(weights: Dict[str, Tensor], inputs: Tuple[Tensor, ...], target: Tensor) -> Tensor:
        batch = tuple(x.unsqueeze(0) for x in inputs)
        output = functional_call(model, ({**frozen, **buffers}, weights), batch)
        loss = loss_fn(output, target.unsqueeze(0))
        if not isinstance(loss, Tensor):
            raise TypeError(f"fisher_diagonal: loss_fn returned {type(loss).__name__}, not a tensor")
        if loss.ndim != 0:
            raise ValueError(
                f"fisher_diagonal: loss_fn returned a tensor of shape {tuple(loss.shape)} for one sample; it must "
                "return a 0-dim tensor (reduce it, e.g. with .sum() or the default reduction='mean')"
            )
        return loss

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0), randomness="different")
    weights = {name: p.detach() for name, p in trainable.items()}
    # Sums in at least float32 (a float16 model's squares would lose precision or overflow), real for a
    # complex parameter (|g| ** 2).
    total = {name: torch.zeros(p.shape, device=p.device, dtype=_accumulator(p.dtype)) for name, p in weights.items()}
    count = 0
    for index, batch in enumerate(batches):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(
                f"fisher_diagonal: batch {index} is {type(batch).__name__}"
                f"{f' of length {len(batch)}' if isinstance(batch, (tuple, list)) else ''}; each batch must "
                "be an (inputs, targets) pair"
            )
        inputs, target = batch
        inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        if not all(isinstance(x, Tensor) for x in inputs) or not isinstance(target, Tensor):
            raise TypeError(f"fisher_diagonal: batch {index}: inputs and targets must be tensors")
        sizes = {x.shape[0] if x.ndim else None for x in (*inputs, target)}
        if len(sizes) != 1 or None in sizes:
            raise ValueError(
                f"fisher_diagonal: batch {index}: inputs and targets must share their first (sample) dimension; "
                f"got shapes {[tuple(x.shape) for x in (*inputs, target)]}"
            )
        n = sizes.pop()
        if n == 0:
            continue
        grads = per_sample(weights, inputs, target)
        for name, g in grads.items():
            total[name].add_((g.abs() if g.is_complex() else g).square().sum(0, dtype=total[name].dtype))
        count += n
    if count == 0:
        raise ValueError("fisher_diagonal: batches held no sample")
    return {name: t.div_(count).to(_real(weights[name].dtype)) for name, t in total.items()}


def _real(dtype: torch.dtype) -> torch.dtype:
    return dtype.to_real() if dtype.is_complex else dtype


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(_real(dtype), torch.float32)
