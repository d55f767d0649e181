"""The jaxelbo application: everything built on the core.

The core (``jaxelbo`` itself: types, log-weights, estimators, objectives, diagnostics, the SNR
engine and the linear-Gaussian toy) needs only jax and numpy. This subpackage builds on it with
flax models, data sets, the optax training loop, evaluation, plotting, sharding, the Rainforth
SNR experiment and the ``jaxelbo`` command line. The core never imports from here.
"""
