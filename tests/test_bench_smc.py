"""benchmarks/smc.py: its hand-written lax.scan reference is a real reference (same value and
gradient as ``je.smc_bound`` on the same key)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_smc", ROOT / "benchmarks" / "smc.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)  # benchmarks/ is not a package; a unique name avoids clashing with jaxelbo.smc


@pytest.fixture(scope="module")
def case():
    params, x = bench.problem(num_steps=6, batch=2)
    fns = bench.contenders(num_particles=3)
    vg = {n: jax.jit(jax.value_and_grad(fns[n], has_aux=True)) for n in ("reference", "jaxelbo reparam")}
    return params, x, vg


def test_reference_equals_smc_bound_on_the_same_key(case):
    params, x, vg = case
    key = jax.random.key(4)
    (_, aux_ref), g_ref = vg["reference"](params, key, x)
    (_, aux), g = vg["jaxelbo reparam"](params, key, x)
    np.testing.assert_allclose(aux_ref["bound"], aux["bound"], rtol=0, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # negative control: another key gives another value, so the equality above is not vacuous
    (_, aux_other), _ = vg["jaxelbo reparam"](params, jax.random.key(5), x)
    assert np.min(np.abs(np.asarray(aux_other["bound"] - aux_ref["bound"]))) > 1e-3
