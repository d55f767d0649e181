"""Data parallelism: sharded over 8 forced CPU devices, and over two processes x 4 devices.

Each case runs in a subprocess, because the number of CPU devices must be fixed
before JAX starts. The reference is the same computation on one device.
"""

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

# Shared by every case: a tiny VAE on digits, IWAE-DReG with K = 4, batch 16, 4 steps.
COMMON = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jaxelbo import registry
    from jaxelbo.app import data, sharding, training
    from jaxelbo.models import vae

    def setup():
        ds = data.load()
        net = vae.build(jax.random.key(0), ds.data_dim, hidden=(16,), latent_dim=3,
                        output_bias=vae.data_mean_logits(ds.train))
        loss_fn = registry.make("iwae", net.model, net.guide, estimator="dreg", num_samples=4)
        opt = training.make_optimizer(1e-2)
        return ds, net, loss_fn, opt

    def run_training(mesh):
        ds, net, loss_fn, opt = setup()
        params, state = net.params, opt.init(net.params)
        if mesh is not None:
            params, state = sharding.replicate(mesh, (params, state))
        it = data.BatchIterator(ds.train, 16, seed=0)
        step = training.make_train_step(loss_fn, opt)
        res = training.train(step, params, state, it, num_steps=4, seed=0, progress=False, log_every=1,
                             mesh=mesh)
        flat = jax.tree.leaves(sharding.gather(res.params))
        return flat, [r["loss"] for r in res.history]
""")

EIGHT_DEVICES = COMMON + textwrap.dedent("""
    import sys
    assert jax.device_count() == 8, jax.devices()
    ds, net, loss_fn, opt = setup()
    x = jnp.asarray(data.BatchIterator(ds.train, 16, seed=0).batch(0))
    vg = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    (loss1, _), g1 = vg(net.params, jax.random.key(1), x)
    mesh = sharding.data_mesh()
    xs = sharding.shard_batch(mesh, np.asarray(x))
    assert len(xs.sharding.device_set) == 8 and xs.addressable_shards[0].data.shape == (2, 64)
    (loss8, _), g8 = vg(sharding.replicate(mesh, net.params), jax.random.key(1), xs)
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g8), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    # the device-resident loop: training set split over the devices (padded), same result as one device
    rows = data.BatchIterator(ds.train, 16, seed=0).device_array(mesh)
    assert rows.shape[0] % 8 == 0 and rows.shape[0] - len(ds.train) < 8
    assert rows.addressable_shards[0].data.shape[0] == rows.shape[0] // 8
    flat8, losses8 = run_training(mesh)
    flat1, losses1 = run_training(None)
    np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
    for a, b in zip(flat8, flat1, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    print("OK")
""")

MULTI_PROCESS = COMMON + textwrap.dedent("""
    import sys
    coordinator, pid, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    sharding.initialize_distributed(coordinator, 2, pid)
    assert jax.device_count() == 8 and jax.local_device_count() == 4, jax.devices()
    flat, losses = run_training(sharding.data_mesh())
    if pid == 0:
        np.savez(out, losses=np.asarray(losses), *flat)
    print("OK", pid)
""")

SINGLE_PROCESS = COMMON + textwrap.dedent("""
    import sys
    flat, losses = run_training(None)
    np.savez(sys.argv[1], losses=np.asarray(losses), *flat)
""")


def _env(num_devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _script(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.slow  # 21 s in the cold gated CI of 2026-12-02 (load 4-7)
@pytest.mark.multidevice
def test_eight_devices_match_one(tmp_path):
    proc = subprocess.run([sys.executable, _script(tmp_path, "eight.py", EIGHT_DEVICES)], env=_env(8),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multidevice
@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    coordinator = f"127.0.0.1:{_free_port()}"
    multi = _script(tmp_path, "multi.py", MULTI_PROCESS)
    procs = [subprocess.Popen([sys.executable, multi, coordinator, str(pid), str(tmp_path / "multi.npz")],
                              env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for pid in range(2)]
    single = subprocess.run([sys.executable, _script(tmp_path, "single.py", SINGLE_PROCESS),
                             str(tmp_path / "single.npz")], env=_env(1), capture_output=True, text=True,
                            timeout=600)
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0 and "OK" in out, err[-3000:]
    assert single.returncode == 0, single.stderr[-3000:]
    a, b = np.load(tmp_path / "multi.npz"), np.load(tmp_path / "single.npz")
    np.testing.assert_allclose(a["losses"], b["losses"], rtol=1e-5)
    keys = [k for k in b.files if k != "losses"]
    assert keys and sorted(keys) == sorted(k for k in a.files if k != "losses")
    for k in keys:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5)


@pytest.mark.multidevice
@pytest.mark.slow
def test_cli_two_processes_match_one_process(tmp_path):
    """``jaxelbo train --coordinator ...`` end to end: orbax checkpoints, summary from process 0."""
    import json

    flags = ["--steps", "6", "--batch-size", "16", "--num-samples", "4", "--hidden", "16", "--latent-dim", "3",
             "--eval-num-samples", "100", "--eval-chunk-size", "50", "--eval-every", "3",
             "--checkpoint-every", "3", "--log-every", "3", "--no-progress", "--no-surgery"]
    cli = [sys.executable, "-m", "jaxelbo", "train", *flags]
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen([*cli, "--out", str(tmp_path / "multi"), "--coordinator", coordinator,
                               "--num-processes", "2", "--process-id", str(pid)], env=_env(4),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for pid in range(2)]
    single = subprocess.run([*cli, "--out", str(tmp_path / "single")], env=_env(1), capture_output=True,
                            text=True, timeout=600)
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    assert single.returncode == 0, single.stderr[-3000:]
    multi = json.loads((tmp_path / "multi" / "summary.json").read_text())
    one = json.loads((tmp_path / "single" / "summary.json").read_text())
    assert multi["device"]["device_count"] == 8 and multi["device"]["process_count"] == 2
    assert sorted(p.name for p in (tmp_path / "multi" / "checkpoints").iterdir() if p.name.isdigit()) == ["3", "6"]
    for key in ("log_likelihood", "iwae_64", "elbo"):
        np.testing.assert_allclose(multi["test"][key], one["test"][key], rtol=1e-4)
