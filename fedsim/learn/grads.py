"""Real gradients of exactly what each device delivered, computed in as few passes as exactness allows.

A device that delivered depth d sends the gradients of the last d layers of its own mini-batch mean loss
(the training loss, `fedsim.learn.loss`: per-row losses, a device's loss the mean of its rows).
Three paths compute them (`training.grad_path`), all equal to the naive per-device loop up to rounding:

* `grouped`: devices that delivered the same depth share one forward/backward over their concatenated
  mini-batches (the gradient of a sum is the sum of the gradients, each sample weighted by 1 / its
  device's batch size), and autograd is asked only for the parameters of the last d layers (truncated
  backward: the same values, less work). Work is exactly the useful FLOPs: one forward per sample that
  counts, and each layer's backward only for the samples of devices that reached it. Sums only.
* `vmap`: `torch.func.vmap(grad(...))` over devices (grouped by depth and batch size), giving each
  device's own gradients (`per_device_grads`), the form several local steps or per-device metrics need.
  `layer_sums` through it sums them.
* `loop`: one forward/backward per device on the shared model (no copies). The only exact form for
  models whose samples interact inside a batch (BatchNorm in training mode).

`auto` picks `loop` when a module couples the samples of a batch (BatchNorm or anything holding running
statistics in training mode); otherwise `grouped` for sums (the fewest FLOPs: 1.3-2.4x faster than
`vmap` on the paper's CNN and MLP) and `vmap` for per-device gradients (1.6-2.2x faster than `loop`).
The choice depends only on the model's structure, never on timings, so runs stay reproducible.

Computing gradients has no side effect on the model: buffers that a training-mode forward updates
(BatchNorm running statistics) are restored, and `.grad` fields are never touched.

This is the only module (with `profile.py`) that touches autograd. No path sets torch's thread count:
that is the caller's choice (see docs/PERFORMANCE.md).
"""

from __future__ import annotations

import contextlib
import enum
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from fedsim.errors import FedsimError, NumericalError
from fedsim.learn.loss import CROSS_ENTROPY, Loss, cross_entropy_rows
from fedsim.learn.profile import ModelProfile
from fedsim.learn.rows import take_rows

__all__ = ["GradientEngine", "LayerSums", "DeviceGrads", "GradPath", "batch_coupled_modules", "check_depths", "cross_entropy_rows",
           "resolve_paths"]

# A grouped pass over more rows than this many forward FLOPs is split into chunks: bigger passes spill
# the caches (measured: the paper CNN 2.5x and the MLP 1.4-2x slower per sample in 67,000-row passes than
# in ~500-row ones). Splitting rows is exact: the loss is a sum over rows.
_CHUNK_FWD_FLOPS = 1.5e8
# vmap materialises one gradient per device: keep a chunk's gradients under this many elements.
_VMAP_CHUNK_ELEMENTS = 1 << 24


class GradPath(enum.Enum):
    AUTO = "auto"
    GROUPED = "grouped"   # one forward/backward per delivered depth, concatenated batches (sums only)
    VMAP = "vmap"         # torch.func vmap(grad) over devices: per-device gradients
    LOOP = "loop"         # one forward/backward per device: exact for every model


def check_depths(batches: list[np.ndarray], depths, n_layers: int) -> np.ndarray:
    """`depths` as int64, one per mini-batch, each in 0..n_layers, none from an empty mini-batch."""
    depths = np.asarray(depths, dtype=np.int64)
    if depths.ndim != 1 or len(depths) != len(batches):
        raise ValueError(f"need one depth per mini-batch, got {depths.shape} depths for {len(batches)} batches")
    if depths.size and (depths.min() < 0 or depths.max() > n_layers):
        raise ValueError(f"depths must lie in 0..{n_layers}, got {depths.min()}..{depths.max()}")
    empty = np.flatnonzero((depths > 0) & (np.fromiter(map(len, batches), np.int64, len(batches)) == 0))
    if empty.size:
        i = int(empty[0])
        raise FedsimError(f"device {i} delivered {depths[i]} layer(s) from an empty mini-batch")
    return depths


@dataclass(frozen=True)
class LayerSums:
    sums: dict[str, torch.Tensor]   # per parameter: sum over contributing devices of their gradients
    counts: np.ndarray              # per layer (forward order): number of contributing devices
    loss_sum: float                 # sum of the contributing devices' mini-batch mean losses
    n_devices: int                  # devices that contributed to at least one layer

    @property
    def mean_loss(self) -> float | None:
        return self.loss_sum / self.n_devices if self.n_devices else None


@dataclass(frozen=True)
class DeviceGrads:
    grads: dict[str, torch.Tensor]  # per parameter: (n_devices, *shape); zero where a layer was not delivered
    losses: np.ndarray              # each device's mini-batch mean loss; NaN for devices with depth 0


def batch_coupled_modules(model: nn.Module) -> list[str]:
    """Names of modules whose output for one sample depends on the other samples of its batch.

    BatchNorm normalises with batch statistics in training mode (and always, without running stats);
    any other module holding `running_*` buffers in training mode is assumed to do the same.
    Concatenating devices' batches would mix their statistics: such models need the `loop` path.
    """
    coupled = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if module.training or not module.track_running_stats:
                coupled.append(name or type(module).__name__)
        elif module.training and any(b.startswith("running_") for b, _ in module.named_buffers(recurse=False)):
            coupled.append(name or type(module).__name__)
    return coupled


def resolve_paths(model: nn.Module, path: str | GradPath = "auto") -> tuple[GradPath, GradPath]:
    """(path of `layer_sums`, path of `per_device_grads`) for `model` and the requested `path`."""
    requested = GradPath(path)
    coupled = batch_coupled_modules(model)
    per_device = GradPath.LOOP if coupled else GradPath.VMAP
    if requested is GradPath.AUTO:
        return (GradPath.LOOP if coupled else GradPath.GROUPED), per_device
    if requested is GradPath.GROUPED:
        if coupled:
            raise FedsimError(
                f"training.grad_path = 'grouped' is not exact for {type(model).__name__}: module(s) "
                f"{', '.join(coupled)} normalise over the batch, so devices' concatenated batches would mix; "
                "use grad_path = 'loop' or 'auto'")
        return GradPath.GROUPED, per_device
    return requested, requested


def _accumulate(sums: dict[str, torch.Tensor], grads) -> None:
    """sums[name] += g, out of place: autograd may hand the same tensor to two parameters (x + a + b)."""
    for name, g in grads:
        sums[name] = sums[name] + g if name in sums else g


class GradientEngine:
    """Gradients of the model's current parameters on devices' mini-batches."""

    def __init__(self, model: nn.Module, profile: ModelProfile, x_train: torch.Tensor, y_train: torch.Tensor,
                 path: str | GradPath = "auto", loss: Loss = CROSS_ENTROPY):
        self.model = model
        self.loss = loss
        self.requested_path = GradPath(path)
        self.path, self.per_device_path = resolve_paths(model, self.requested_path)
        self.profile = profile
        dtype = next(model.parameters()).dtype
        self.x = x_train.to(dtype)
        self.y = y_train
        self._sample_shape = tuple(self.x.shape[1:])
        # a view when x is contiguous: rows gather as one copy (None: rows made on demand, fedsim.learn.rows)
        self._x_rows = self.x.reshape(len(self.x), -1) if isinstance(self.x, torch.Tensor) else None
        self._xbuf = torch.empty(0, dtype=dtype)       # reused gather buffer (fresh pages cost page faults)
        self.params = dict(model.named_parameters())
        self.layer_of_param = profile.layer_of_param()
        n = profile.n_layers
        # the parameters of the last d layers, for each depth d
        self._suffix_params = [
            [p for layer in profile.layers[n - d:] for p in layer.param_names] for d in range(n + 1)
        ]
        self._fwd_flops_per_sample = max(profile.fwd_flops_per_sample, 1.0)
        self._stateful = any(True for _ in model.buffers())
        self._vmap_by_depth = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())

    # -- public API -------------------------------------------------------------------------------
    def layer_sums(self, batches: list[np.ndarray], depths: np.ndarray,
                   weights: np.ndarray | None = None) -> LayerSums:
        """Sum of the gradients of device i's mini-batch mean loss over its last `depths[i]` layers, each
        multiplied by `weights[i]` if given (e.g. its batch size; `loss_sum` stays unweighted)."""
        depths = self._check(batches, depths)
        self._resolve()
        w = None if weights is None else np.asarray(weights, dtype=np.float64)
        with self._buffers_restored(), torch.enable_grad():
            if self.path is GradPath.GROUPED:
                return self._grouped_sums(batches, depths, w)
            if self.path is GradPath.VMAP:
                return self._vmap_sums(batches, depths, w)
            return self._loop_sums(batches, depths, w)

    def per_device_grads(self, batches: list[np.ndarray], depths: np.ndarray) -> dict[str, torch.Tensor]:
        """Each device's gradients, stacked on a leading device axis; zeros where a layer was not delivered."""
        return self.per_device(batches, depths).grads

    def per_device(self, batches: list[np.ndarray], depths: np.ndarray) -> DeviceGrads:
        """`per_device_grads` plus each device's mini-batch mean loss."""
        depths = self._check(batches, depths)
        self._resolve()
        with self._buffers_restored(), torch.enable_grad():
            if self.per_device_path is GradPath.VMAP:
                return self._vmap_per_device(batches, depths)
            return self._loop_per_device(batches, depths)

    # -- shared helpers ---------------------------------------------------------------------------
    def _resolve(self) -> None:
        """Re-decide the paths: the model may have switched between train() and eval() since the last call."""
        self.path, self.per_device_path = resolve_paths(self.model, self.requested_path)

    def _check(self, batches: list[np.ndarray], depths: np.ndarray) -> np.ndarray:
        return check_depths(batches, depths, self.profile.n_layers)

    @contextlib.contextmanager
    def _buffers_restored(self) -> Iterator[None]:
        """A training-mode forward updates BatchNorm running statistics: gradients must not."""
        if not self._stateful:
            yield
            return
        saved = [(b, b.detach().clone()) for b in self.model.buffers()]
        try:
            yield
        finally:
            with torch.no_grad():
                for b, value in saved:
                    b.copy_(value)

    def _gather(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows `idx` of the training set, copied into a buffer reused across calls (or made on demand)."""
        if self._x_rows is None:
            return take_rows(self.x, self.y, idx)
        index = torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64))
        n, width = len(index), self._x_rows.shape[1]
        if self._xbuf.numel() < n * width:
            self._xbuf = torch.empty(n * width, dtype=self.x.dtype)
        rows = self._xbuf[: n * width].view(n, width)
        torch.index_select(self._x_rows, 0, index, out=rows)
        return rows.view(n, *self._sample_shape), self.y[index]

    @staticmethod
    def _checked(loss: torch.Tensor, what: str) -> float:
        value = float(loss.detach().sum()) if loss.dim() else float(loss.detach())
        if not math.isfinite(value):
            raise NumericalError(f"non-finite loss ({value}) in the mini-batches of {what}")
        return value

    def _counts(self, depths: np.ndarray) -> np.ndarray:
        """Per layer (forward order): devices that reached it, i.e. of depth >= n_layers - layer."""
        at_least = np.cumsum(np.bincount(depths, minlength=self.profile.n_layers + 1)[::-1])[::-1]
        return at_least[1:][::-1].astype(np.int64)

    # -- grouped ----------------------------------------------------------------------------------
    def _grouped_sums(self, batches: list[np.ndarray], depths: np.ndarray, w: np.ndarray | None) -> LayerSums:
        live = np.flatnonzero(depths)
        if live.size == 0:
            return LayerSums({}, np.zeros(self.profile.n_layers, dtype=np.int64), 0.0, 0)
        order = live[np.argsort(-depths[live], kind="stable")]   # deepest first: each depth one block
        sizes = np.fromiter(map(len, map(batches.__getitem__, order.tolist())), dtype=np.int64, count=len(order))
        x, y = self._gather(np.concatenate(list(map(batches.__getitem__, order.tolist()))))
        uniform = w is None and bool((sizes == sizes[0]).all())
        weights = None if uniform else torch.from_numpy(np.repeat(1.0 / sizes, sizes)).to(x.dtype)
        # the rows of device i weigh w_i / its batch size in the loss differentiated, 1 / its batch size in loss_sum
        scaled = None if w is None else torch.from_numpy(np.repeat(w[order] / sizes, sizes)).to(x.dtype)
        row_end = np.cumsum(sizes)
        chunk_rows = max(1, int(_CHUNK_FWD_FLOPS // self._fwd_flops_per_sample))
        sums: dict[str, torch.Tensor] = {}
        loss_sum = 0.0
        ordered_depths = depths[order]
        first = 0
        for d in np.unique(ordered_depths)[::-1]:
            last = first + int(np.count_nonzero(ordered_depths == d))       # devices first..last-1
            lo, hi = (0 if first == 0 else int(row_end[first - 1])), int(row_end[last - 1])
            names = self._suffix_params[int(d)]
            params = [self.params[p] for p in names]
            for start in range(lo, hi, chunk_rows):
                stop = min(hi, start + chunk_rows)
                losses = self.loss.rows(self.model(x[start:stop]), y[start:stop])
                loss = losses.sum() / float(sizes[0]) if uniform else (losses * weights[start:stop]).sum()
                loss_sum += self._checked(loss, f"the devices at depth {d}")
                if scaled is not None:
                    loss = (losses * scaled[start:stop]).sum()
                _accumulate(sums, zip(names, torch.autograd.grad(loss, params)))
            first = last
        return LayerSums(sums, self._counts(depths), loss_sum, int(live.size))

    # -- vmap -------------------------------------------------------------------------------------
    def _vmap_chunks(self, batches: list[np.ndarray], depths: np.ndarray
                     ) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor], torch.Tensor]]:
        """(devices, their stacked gradients, zero where not delivered; their losses), chunk by chunk.

        vmap needs one batch shape per call, so devices are grouped by batch size, and for convnets
        also by depth, so each call differentiates only the delivered layers: vmapped convolution
        backward is costly (one call for every depth is 2.2x slower on the paper CNN). For other
        models one call for every depth is faster (1.15-1.3x on the paper MLP) despite the extra
        backward work; the layers a device did not deliver are then zeroed.
        """
        live = np.flatnonzero(depths)
        coupled = bool(batch_coupled_modules(self.model))
        buffers = dict(self.model.named_buffers())
        model, mean_loss = self.model, self.loss.mean
        n_layers = self.profile.n_layers

        def device_loss(diff, rest, bufs, x, y):
            loss = mean_loss(functional_call(model, (diff, rest, bufs), (x,)), y)
            return loss, loss.detach()

        # each device gets its own copy of the running statistics to update (then dropped)
        buffer_dim = 0 if coupled else None
        grad_fn = vmap(grad(device_loss, has_aux=True), in_dims=(None, None, buffer_dim, 0, 0),
                       randomness="different")
        sizes = np.fromiter(map(len, batches), dtype=np.int64, count=len(batches))
        keys = depths if self._vmap_by_depth else np.full(len(batches), n_layers)
        for d, size in sorted({(int(keys[i]), int(sizes[i])) for i in live}, reverse=True):
            members = live[(keys[live] == d) & (sizes[live] == size)]
            names = set(self._suffix_params[d])
            diff = {k: p.detach() for k, p in self.params.items() if k in names}
            rest = {k: p.detach() for k, p in self.params.items() if k not in names}
            step = max(1, _VMAP_CHUNK_ELEMENTS // max(1, sum(p.numel() for p in diff.values())))
            for c in range(0, len(members), step):
                chunk = members[c:c + step]
                x, y = self._gather(np.concatenate([batches[i] for i in chunk]))
                x = x.view(len(chunk), size, *self._sample_shape)
                y = y.view(len(chunk), size)
                bufs = ({k: b.unsqueeze(0).expand(len(chunk), *b.shape).clone() for k, b in buffers.items()}
                        if coupled else buffers)
                grads, losses = grad_fn(diff, rest, bufs, x, y)
                self._checked(losses, f"{len(chunk)} devices with batches of {size}")
                chunk_depths = depths[chunk]
                for name, value in grads.items():
                    reached = chunk_depths >= n_layers - self.layer_of_param[name]
                    if not reached.all():
                        mask = torch.from_numpy(reached).to(value.dtype)
                        value.mul_(mask.view(-1, *([1] * (value.dim() - 1))))
                yield chunk, grads, losses

    def _vmap_per_device(self, batches: list[np.ndarray], depths: np.ndarray) -> DeviceGrads:
        n = len(batches)
        out = {name: torch.zeros((n, *p.shape), dtype=p.dtype) for name, p in self.params.items()}
        losses = np.full(n, np.nan)
        for chunk, grads, chunk_losses in self._vmap_chunks(batches, depths):
            index = torch.from_numpy(chunk)
            for name, value in grads.items():
                out[name].index_copy_(0, index, value)
            losses[chunk] = chunk_losses.double().numpy()
        return DeviceGrads(out, losses)

    def _vmap_sums(self, batches: list[np.ndarray], depths: np.ndarray, w: np.ndarray | None) -> LayerSums:
        sums: dict[str, torch.Tensor] = {}
        loss_sum = 0.0
        for chunk, grads, losses in self._vmap_chunks(batches, depths):
            loss_sum += float(losses.double().sum())
            if w is not None:
                cw = torch.from_numpy(w[chunk])
                grads = {n: v * cw.to(v.dtype).view(-1, *([1] * (v.dim() - 1))) for n, v in grads.items()}
            _accumulate(sums, ((name, value.sum(dim=0)) for name, value in grads.items()))
        return LayerSums(sums, self._counts(depths), loss_sum, int(np.count_nonzero(depths)))

    # -- loop -------------------------------------------------------------------------------------
    def _device_grads(self, batch: np.ndarray, d: int, i: int) -> tuple[list[str], tuple[torch.Tensor, ...], float]:
        x, y = self._gather(batch)
        loss = self.loss.mean(self.model(x), y)
        value = self._checked(loss, f"device {i}")
        names = self._suffix_params[d]
        return names, torch.autograd.grad(loss, [self.params[p] for p in names]), value

    def _loop_sums(self, batches: list[np.ndarray], depths: np.ndarray, w: np.ndarray | None) -> LayerSums:
        sums: dict[str, torch.Tensor] = {}
        loss_sum = 0.0
        live = np.flatnonzero(depths)
        for i in live:
            names, grads, value = self._device_grads(batches[i], int(depths[i]), int(i))
            loss_sum += value
            if w is not None:
                grads = tuple(g * float(w[i]) for g in grads)
            _accumulate(sums, zip(names, grads))
        return LayerSums(sums, self._counts(depths), loss_sum, int(live.size))

    def _loop_per_device(self, batches: list[np.ndarray], depths: np.ndarray) -> DeviceGrads:
        n = len(batches)
        out = {name: torch.zeros((n, *p.shape), dtype=p.dtype) for name, p in self.params.items()}
        losses = np.full(n, np.nan)
        for i in np.flatnonzero(depths):
            names, grads, losses[i] = self._device_grads(batches[i], int(depths[i]), int(i))
            for name, g in zip(names, grads):
                out[name][i] = g
        return DeviceGrads(out, losses)
