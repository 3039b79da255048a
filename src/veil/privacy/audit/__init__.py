"""Privacy audit: measure what a model and its updates leak, next to what the accountant claims.

- `membership`: loss-threshold attack (Yeom et al. 2018) and LiRA (Carlini et al. 2022).
- `inversion`: gradient inversion, DLG (Zhu et al. 2019) and Inverting Gradients (Geiping et
  al. 2020); `quality` scores reconstructions (relative error, SSIM).
- `canaries` and `bounds`: the one-run canary audit and its ε lower bound (Steinke, Nasr &
  Jagielski 2023), with Clopper–Pearson confidence.
- `recipe`: retraining with Veil's own trainers, as the audited run trained.
- `target` and `runner`: `audit_run`, behind `veil audit RUN_DIR`.
"""

from veil.privacy.audit.bounds import clopper_pearson_lower, epsilon_lower_bound, p_value
from veil.privacy.audit.canaries import CanaryAudit, audit_with_canaries
from veil.privacy.audit.membership import AttackMetrics, lira, loss_threshold
from veil.privacy.audit.recipe import DPSGDMechanism, TrainingRecipe
from veil.privacy.audit.runner import AuditSettings, audit_run

__all__ = [
    "AttackMetrics",
    "AuditSettings",
    "CanaryAudit",
    "DPSGDMechanism",
    "TrainingRecipe",
    "audit_run",
    "audit_with_canaries",
    "clopper_pearson_lower",
    "epsilon_lower_bound",
    "lira",
    "loss_threshold",
    "p_value",
]
