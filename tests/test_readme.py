"""The README's "library in a minute" runs as printed and prints what the README says it prints."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import jax
import numpy as np
import pytest

pytestmark = pytest.mark.slow  # ~10 s: the snippet trains 200 compiled steps

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def python_blocks(section: str) -> list[str]:
    """The ```python blocks of one ``## `` section of the README, in order."""
    start = README.index(f"## {section}\n")
    end = README.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", README[start:end if end > 0 else None], flags=re.S)


def run_minute() -> tuple[dict, str]:
    namespace: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(python_blocks("The library in a minute")[0], "README.md", "exec"), namespace)
    return namespace, out.getvalue()


@pytest.fixture(scope="module")
def minute():
    return run_minute()


def test_library_in_a_minute_prints_the_bound_beside_the_exact_log_likelihood(minute):
    _, printed = minute
    match = re.fullmatch(r"IWAE-64 bound (-?\d+\.\d+), exact log p\(x\) (-?\d+\.\d+) nats per example\n", printed)
    assert match, printed
    bound, exact = map(float, match.groups())
    assert abs(bound - exact) < 0.03, (bound, exact)  # the ELBO of this guide is 0.31 nats below
    # the numbers the README quotes are the ones the snippet prints
    quoted = re.search(r"It prints `IWAE-64 bound (-?\d+\.\d+), exact log p\(x\) (-?\d+\.\d+)", README)
    assert quoted, "the README no longer quotes the printed line"
    np.testing.assert_allclose([bound, exact], list(map(float, quoted.groups())), atol=0.002)


def test_numpyro_distributions_inside_model_and_guide_give_the_same_loss(minute):
    pytest.importorskip("numpyro")
    namespace, _ = minute
    plain_model, plain_guide = namespace["model"], namespace["guide"]
    block = python_blocks("The library in a minute")[1]
    exec(compile(block, "README.md", "exec"), namespace)  # redefines model and guide
    je, params, x = namespace["je"], namespace["params"], namespace["x"]
    assert namespace["model"] is not plain_model
    for estimator in ("reparam", "dreg"):
        ours = je.iwae(namespace["model"], namespace["guide"], num_samples=8, estimator=estimator)
        plain = je.iwae(plain_model, plain_guide, num_samples=8, estimator=estimator)
        (a, _), grad_a = jax.value_and_grad(ours, has_aux=True)(params, jax.random.key(3), x[:8])
        (b, _), grad_b = jax.value_and_grad(plain, has_aux=True)(params, jax.random.key(3), x[:8])
        np.testing.assert_allclose(a, b, rtol=1e-5)
        for ga, gb in zip(jax.tree_util.tree_leaves(grad_a), jax.tree_util.tree_leaves(grad_b), strict=True):
            np.testing.assert_allclose(ga, gb, rtol=1e-4, atol=1e-6)
