"""Federated gradient-boosted trees across organisations with the same features (horizontal).

Histogram-based boosting (XGBoost's `hist` method) where every histogram the coordinator sees is
a sum over the members, computed by Veil's secure aggregation (SecAgg masking), optionally with
Gaussian noise that the members add (accounted). The modules, bottom up:

* `binning`: bin edges from declared public bounds (never from the records);
* `objectives`: gradients and hessians of the logistic, softmax and squared losses, clipped to
  declared bounds;
* `histograms`: one member's gradient and hessian histograms per frontier node, feature and bin;
* `split`: XGBoost's split gain, the best split of a node, leaf weights;
* `tree`: one regression tree in XGBoost's array layout, and its prediction;
* `booster`: the ensemble, its margins, and its export as an XGBoost JSON model / `Booster`;
* `secure_sum`: one secure sum of the members' vectors through the SecAgg protocol objects;
* `federated`: the members, the coordinator and the training loop (one tree per round).

Nothing here reads the run config: `veil.assembly.trees` turns it into these parameters.
The vertical SecureBoost (`veil.vertical.boosting`) uses `objectives`, `histograms` and
`split` too: one copy of the boosting math for both.
"""
