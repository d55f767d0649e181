"""What a new user meets first: importance resampling of one example or a batch, --version and --help,
py.typed, and the data-file messages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxelbo as je
from jaxelbo.models import linear_gaussian as lg

MU = jnp.array([0.3, -0.5, 1.0])
MODEL, GUIDE = lg.model(), lg.guide()


def off_params():
    p = lg.optimal_params(MU)
    p["guide"]["b"] = p["guide"]["b"] + 0.8
    p["guide"]["log_scale"] = jnp.zeros((), jnp.float32)
    return p


@pytest.mark.slow  # ~8 s: 800,000 proposals
def test_importance_resample_takes_a_batch_and_each_row_targets_its_own_posterior():
    params = off_params()
    x = lg.sample_data(jax.random.key(7), MU, 4)
    draws = jax.jit(lambda p: je.importance_resample(MODEL, GUIDE, p, jax.random.key(1), x, num_samples=100,
                                                     num_draws=2000, batched=True))(params)
    chex.assert_shape(draws, (4, 2000, 3))
    post_mean = jax.vmap(lambda xb: lg.posterior(params["model"], xb)[0])(x)
    guide_mean = x @ params["guide"]["A"].T + params["guide"]["b"]
    assert np.max(np.abs(draws.mean(1) - post_mean)) < 0.07, draws.mean(1) - post_mean
    assert np.min(np.abs(guide_mean - post_mean)) > 0.3  # the guide alone would be far off
    np.testing.assert_allclose(draws.var(1), 0.5, atol=0.08)  # the posterior variance (the guide's is 1)
    # one example keeps its one-example form
    one = je.importance_resample(MODEL, GUIDE, params, jax.random.key(1), x[0], num_samples=4, num_draws=5)
    chex.assert_shape(one, (5, 3))


@pytest.mark.slow  # three programs and four refusals (~10 s; 37 s under load)
def test_importance_resample_takes_x_as_one_example_whatever_its_shape():
    """The documented call: x is one example even when its shape also reads as a batch."""
    params = off_params()
    square = jnp.ones((3, 3)) * jnp.array([0.5, -1.0, 2.0])  # a batch of three 3-vectors, or one 3x3 example
    resample = jax.jit(je.importance_resample, static_argnums=(0, 1),
                       static_argnames=("num_samples", "num_draws", "batched"))
    one = resample(MODEL, GUIDE, params, jax.random.key(0), square, num_samples=4, num_draws=2)
    chex.assert_shape(one, (2, 3, 3))  # (num_draws, *z) with z = A x + b + s eps of shape (3, 3)
    # the one-example reading is x[None] as a batch of one, on the same key
    as_batch_of_one = resample(MODEL, GUIDE, params, jax.random.key(0), square[None], num_samples=4, num_draws=2,
                               batched=True)
    np.testing.assert_array_equal(one, as_batch_of_one[0])
    rows = resample(MODEL, GUIDE, params, jax.random.key(0), square, num_samples=4, num_draws=2, batched=True)
    chex.assert_shape(rows, (3, 2, 3))
    # a batch that is not one example: the error says so and names batched=True
    with pytest.raises(ValueError, match="not one example .* fits a batch .* pass batched=True"):
        je.importance_resample(MODEL, GUIDE, params, jax.random.key(0), jnp.ones((4, 3)), num_samples=4,
                               num_draws=2)
    with pytest.raises(ValueError, match="taken as one example .* refuse it"):
        je.importance_resample(MODEL, GUIDE, params, jax.random.key(0), jnp.ones((2, 5)), num_samples=4,
                               num_draws=2)
    with pytest.raises(ValueError, match="is x a batch with a leading axis B"):
        je.importance_resample(MODEL, GUIDE, params, jax.random.key(0), jnp.ones((2, 5)), num_samples=4,
                               num_draws=2, batched=True)
    with pytest.raises(TypeError, match="batched must be True or False"):
        je.importance_resample(MODEL, GUIDE, params, jax.random.key(0), square, num_samples=4, num_draws=2,
                               batched=None)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jaxelbo", *args], capture_output=True, text=True, check=False)


def test_version_and_plain_help():
    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"jaxelbo {je.__version__}"
    help_text = run_cli("--help").stdout
    assert "``" not in help_text and "train" in help_text and "--version" in help_text


def test_help_and_version_import_no_jax():
    """The console script (jaxelbo_cli:main) parses --help and --version without importing JAX, and a
    command's module only when that command is named."""
    script = ("import sys, jaxelbo_cli\n"
              "for argv in (['--help'], ['--version'], ['bogus']):\n"
              "    try:\n"
              "        jaxelbo_cli.main(argv)\n"
              "    except SystemExit:\n"
              "        pass\n"
              "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'jaxelbo', 'numpy'))\n"
              "print('HEAVY', heavy, file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stderr, proc.stderr[-2000:]
    assert "train" in proc.stdout and "evaluate" in proc.stdout and "snr" in proc.stdout
    assert "invalid choice: 'bogus'" in proc.stderr


@pytest.mark.parametrize("code, torn_down", [(0, True), (2, True), (130, False), (143, False)])
def test_the_process_entry_skips_the_teardown_only_after_a_signal(code, torn_down):
    """``jaxelbo_cli.entry`` (the script and ``python -m jaxelbo``) exits a command stopped by a
    signal (128 + signum) with ``os._exit`` once its output is flushed: XLA work cut short may
    still run, and the interpreter's teardown under it segfaulted about one run in ten (the
    SIGTERM-during-evaluation test of test_faults). Every other exit tears down normally."""
    script = ("import atexit, sys, jaxelbo_cli\n"
              "atexit.register(lambda: print('TORN DOWN'))\n"
              f"jaxelbo_cli.main = lambda argv=None: (print('the last line', file=sys.stderr), {code})[1]\n"
              "jaxelbo_cli.entry()\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert proc.returncode == code, proc.stderr
    assert proc.stderr == "the last line\n"  # flushed before os._exit
    assert ("TORN DOWN" in proc.stdout) == torn_down
    pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert 'jaxelbo = "jaxelbo_cli:entry"' in pyproject


def test_py_typed_ships_with_the_package():
    assert (Path(je.__file__).parent / "py.typed").is_file()
    pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert 'jaxelbo = ["py.typed"]' in pyproject


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_missing_data_message_names_each_file_once(tmp_path, name):
    from jaxelbo.app import data

    with pytest.raises(FileNotFoundError) as info:
        data.load(name, tmp_path)
    message = str(info.value)
    assert message.count(f"{name}.npz") == 1, message
    assert f"{name}.npz / {name}.npz" not in message
    assert message.count(str(tmp_path / name) + " ") <= 1


def test_running_mean_is_the_trailing_window_mean():
    from jaxelbo.app.plotting import running_mean

    values = np.array([1.0, 3.0, 5.0, 7.0, 100.0])
    np.testing.assert_allclose(running_mean(values, 2), [1.0, 2.0, 4.0, 6.0, 53.5])
    np.testing.assert_allclose(running_mean(values, 1), values)
    np.testing.assert_allclose(running_mean(values, 10), np.cumsum(values) / np.arange(1, 6))
    with pytest.raises(ValueError, match="window"):
        running_mean(values, 0)


def test_figures_carry_their_captions(tmp_path, monkeypatch):
    """curves.png: running mean and the ELBO-vs-IWAE note; reconstructions.png: one draw from the guide."""
    import matplotlib.figure

    from jaxelbo.app import plotting

    texts: dict[str, list[str]] = {}

    def record(fig, path, **kwargs):
        texts[Path(path).name] = [t.get_text() for t in fig.texts] + [
            line.get_label() for ax in fig.axes for line in ax.get_lines()] + [ax.get_title() for ax in fig.axes]

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    rng = np.random.default_rng(0)
    records = [{"step": i, "split": "train", "bound": -90.0 + i / 100 + rng.normal()} for i in range(200)]
    records += [{"step": i, "split": "validation", "elbo": -95.0 - i / 200, "iwae_64": -90 + i / 100}
                for i in range(0, 200, 50)]
    plotting.plot_curves(records, tmp_path / "curves.png")
    assert any("running mean of 10 records" in t for t in texts["curves.png"])
    assert plotting.ELBO_VS_IWAE_NOTE in texts["curves.png"]
    plotting.plot_curves(records[:200], tmp_path / "train_only.png")  # no validation: no note
    assert plotting.ELBO_VS_IWAE_NOTE not in texts["train_only.png"]
    x = rng.random((4, 64))
    plotting.plot_reconstructions(x, x, (8, 8), tmp_path / "reconstructions.png")
    assert any("ONE draw z ~ q(z|x)" in t for t in texts["reconstructions.png"])
