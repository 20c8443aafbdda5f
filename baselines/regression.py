"""Baselines for regression, where no softmax confidence exists (AppealNet App. D had none).

- ``mc_dropout``: the predictive spread of the plain little network under MC dropout
  (Gal & Ghahramani 2016): several stochastic passes with dropout on, and the less the
  outputs disagree, the more the answer is kept.
- ``error_head``: a separate error-predictor head trained after the fact on the frozen
  plain little network. It reads what AppealNet's head reads (shared features and
  output) and learns what AppealNet's head learns at its optimum (the expected loss
  given the input, App. A: ``q* = lambda / E[L | x]``), but without joint training; the
  gap between it and AppealNet is what training the two heads together adds.

Both score in [0, 1], higher = keep on the little network.
"""

from __future__ import annotations

from typing import Annotated, ClassVar

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from cascade import (
    METHODS,
    CascadeError,
    MethodContext,
    MethodOptions,
    Objective,
    Predictor,
    StageOutput,
    TaskKind,
    mlp,
)
from cascade.config import OptimConfig


class McDropoutOptions(MethodOptions):
    """``{name: mc_dropout, passes: 20}``: stochastic passes per input."""

    passes: Annotated[int, Field(ge=2)] = 10


@METHODS.register("mc_dropout")
class McDropoutScore(Predictor):
    """MC-dropout predictive spread: ``score = 1 / (1 + s)``, with ``s`` the RMS over the
    outputs of their standard deviation across ``passes`` stochastic passes.

    ``s`` is in the targets' units times the criterion's ``scale`` (pixels for
    keypoints), so a score of 0.5 means the passes disagree by one pixel (RMS).

    Options: ``passes``, stochastic forward passes per input (default 10).
    """

    Options = McDropoutOptions
    deterministic = False
    confidence_score = True  # predictive spread, nothing fitted

    def __init__(self, options: McDropoutOptions | None = None) -> None:
        super().__init__(options)
        self.scale = 1.0

    def network_problems(self, network: nn.Module) -> list[str]:
        """The network must have a dropout layer with a positive rate to sample."""
        if any(isinstance(m, nn.Dropout) and m.p > 0 for m in network.modules()):
            return []
        return ["methods: mc_dropout needs stage networks with dropout (e.g. little: {..., dropout: 0.1})"]

    def prepare(self, network: nn.Module, context: MethodContext) -> None:
        """Check that the network has dropout to sample, and read the output scale.

        Raises:
            CascadeError: the network has no dropout layer with a positive rate.
        """
        problems = self.network_problems(network)
        if problems:
            raise CascadeError(problems[0])
        self.scale = float(getattr(context.task.criterion, "scale", 1.0))

    def score(self, stage: StageOutput) -> Tensor:
        """Score from stochastic passes stacked as ``stage.output`` ``[T, B, D]`` (T >= 2)."""
        samples = stage.output.double()
        if samples.dim() != 3 or samples.shape[0] < 2:
            raise ValueError("mc_dropout scores need stage.output of shape [passes >= 2, B, D]")
        spread = samples.var(dim=0, unbiased=True).mean(dim=-1).sqrt() * self.scale  # [B]
        return 1.0 / (1.0 + spread)

    def score_batch(self, network: nn.Module, x: Tensor, out: StageOutput | None = None) -> Tensor:
        """``passes`` forward passes with only the dropout layers in training mode (``out``,
        the deterministic pass, is not used)."""
        dropouts = [m for m in network.modules() if isinstance(m, nn.Dropout)]
        modes = [m.training for m in dropouts]
        try:
            for m in dropouts:
                m.train()
            samples = torch.stack([network(x).output for _ in range(self.options.passes)])  # [T, B, D]
        finally:
            for m, mode in zip(dropouts, modes):
                m.train(mode)
        return self.score(StageOutput(output=samples))


class _ErrorRegressor(nn.Module):
    """An MLP on standardized ``[features, output]`` predicting ``log L`` per input."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...], mean: Tensor, std: Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.net = mlp([in_dim, *hidden, 1])

    def forward(self, z: Tensor) -> Tensor:
        return self.net((z - self.mean) / self.std).squeeze(-1)  # [B]


class _LogLossObjective(Objective):
    """Squared error between the predicted and the actual ``log L``."""

    def __call__(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        z, target = batch
        return {"loss": ((model(z) - target) ** 2).mean()}


@METHODS.register("error_head")
class ErrorHeadScore(Predictor):
    """A post-hoc error predictor on the frozen plain network.

    After the plain little network is trained, a small MLP on its shared features and its
    output (the inputs of AppealNet's head) is fitted by least squares to
    ``log L(f0(x), y)`` on the training split, with the network frozen. The score is
    ``sigmoid(log L_ref - predicted log L)`` with ``L_ref`` the median training loss, so
    it is higher for inputs predicted to have a lower loss (0.5 at the median).

    Attributes:
        hidden: the MLP's hidden widths.
        optim: its training phase.
    """

    default_for = frozenset({TaskKind.REGRESSION})
    hidden: ClassVar[tuple[int, ...]] = (32,)
    optim: ClassVar[OptimConfig] = OptimConfig(epochs=30, batch_size=128, lr=1e-3, weight_decay=1e-4)
    #: floor on the loss before the log, so that an exact answer is not minus infinity
    eps: ClassVar[float] = 1e-8

    def __init__(self, options: MethodOptions | None = None) -> None:
        super().__init__(options)
        self.regressor: _ErrorRegressor | None = None
        self.reference = 0.0

    @staticmethod
    def _inputs(stage: StageOutput) -> Tensor:
        if stage.features is None:
            raise ValueError("error_head needs a network that exposes its features (a cascade.FeatureNet)")
        return torch.cat([stage.features, stage.output], dim=-1).float()  # [B, F + D]

    @torch.no_grad()
    def _training_pairs(self, network: nn.Module, context: MethodContext) -> tuple[Tensor, Tensor, Tensor]:
        """Head inputs ``[N, F + D]``, losses ``[N]`` and whether each input has a target ``[N]``."""
        network.eval()
        zs, losses, observed = [], [], []
        for x, y in DataLoader(context.train, batch_size=512, shuffle=False):
            stage = network(x.to(context.device))
            zs.append(self._inputs(stage).cpu())
            losses.append(context.task.criterion.per_sample(stage.output, y.to(context.device)).float().cpu())
            # regression targets may be all-NaN (nothing labelled); class labels never are
            has = (~torch.isnan(y)).flatten(1).any(dim=1) if y.is_floating_point() else torch.ones(len(y), dtype=torch.bool)
            observed.append(has)
        return torch.cat(zs), torch.cat(losses), torch.cat(observed)

    def prepare(self, network: nn.Module, context: MethodContext) -> None:
        """Fit the error regressor on the training split, the network frozen.

        Raises:
            CascadeError: fewer than two training inputs carry a target.
        """
        z, loss, observed = self._training_pairs(network, context)
        # an input with no labelled target has loss 0 by convention: it says nothing
        # about the error, so it is left out of the fit
        z, loss = z[observed], loss[observed]
        if len(z) < 2:
            raise CascadeError("error_head: fewer than 2 training inputs with a target")
        target = (loss + self.eps).log()
        self.reference = float(target.median())
        std = z.std(dim=0).clamp_min(1e-6)
        with torch.random.fork_rng(devices=[]):  # a fixed init that leaves the run's RNG alone
            torch.manual_seed(context.seed)
            self.regressor = _ErrorRegressor(z.shape[1], self.hidden, z.mean(dim=0), std).to(context.device)
        context.fit(self.regressor, _LogLossObjective(), TensorDataset(z, target), self.optim, "error_head")
        self.regressor.eval().requires_grad_(False)

    def score(self, stage: StageOutput) -> Tensor:
        if self.regressor is None:
            raise RuntimeError("error_head is not fitted: call prepare() first")
        z = self._inputs(stage).to(self.regressor.mean.device)
        return torch.sigmoid(self.reference - self.regressor(z).double())

