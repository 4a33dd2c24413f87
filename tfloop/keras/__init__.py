"""tfloop for `model.fit` users: precise BN before validation, owned BN in `fit`.

- `PreciseBN(dataset, num_batches=...)`: a callback that recalibrates BN
  statistics before every validation inside `fit` (and every `evaluate` it is
  passed to) and prints the binary's `BN statistics were stale: ...` line;
  the counterpart of fvcore's PreciseBN hook.
- `FitModel(model, loss_fn=...)`: wraps a model so that `fit` trains it with
  tfloop's train step (`step.replica_fn`): BN statistics owned by the step,
  zero-debiased and identical on every replica, with the loss averaged over
  the global batch and metrics reduced across replicas.
"""

from tfloop.keras.callbacks import PreciseBN
from tfloop.keras.fit_model import FitModel

__all__ = ["FitModel", "PreciseBN"]
