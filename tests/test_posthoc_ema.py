"""Post-hoc EMA (EDM2): the power-function profiles, the reconstruction against EMAs computed directly, the callback's
snapshots and resume, and ``python -m diffexp.ema`` as typed."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffexp.posthoc import (combine, gamma_to_sigma_rel, posthoc_coefficients, power_beta, profile_inner,
                             sigma_rel_to_gamma)
from tests.conftest import SHRINK, compose_config


def test_sigma_rel_and_gamma():
    # EDM2 (Sec. 3.1): sigma_rel = 0.05 and 0.10 are gamma = 16.97 and 6.94
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    for value in (0.01, 0.05, 0.2, math.sqrt(1 / 12)):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(value)) == pytest.approx(value, rel=1e-9)
    for bad in (0.0, -0.1, 0.3, "0.1", True):
        with pytest.raises(ValueError, match="sigma_rel must lie in"):
            sigma_rel_to_gamma(bad)


def test_profile_inner_products_match_numerical_integration():
    def profile(t, gamma, tau):
        return np.where(tau <= t, (gamma + 1) * tau**gamma / t ** (gamma + 1), 0.0)

    tau = np.linspace(0, 1000, 2_000_001)
    for t_a, g_a, t_b, g_b in [(1000, 6.94, 1000, 16.97), (400, 6.94, 1000, 6.94), (1000, 16.97, 250, 2.0)]:
        numeric = np.trapezoid(profile(t_a, g_a, tau) * profile(t_b, g_b, tau), tau)
        assert profile_inner(t_a, g_a, t_b, g_b) == pytest.approx(numeric, rel=1e-4)
        assert profile_inner(t_a, g_a, t_b, g_b) == pytest.approx(profile_inner(t_b, g_b, t_a, g_a), rel=1e-12)


def power_emas(thetas: torch.Tensor, gamma: float) -> torch.Tensor:
    """The power-function EMA after every update of the parameter sequence ``thetas`` (T, ...), as the callback runs it."""
    ema, out = thetas[0].clone(), []
    for t, theta in enumerate(thetas, start=1):
        ema = torch.lerp(ema, theta, 1.0 - power_beta(gamma, t))
        out.append(ema.clone())
    return torch.stack(out)


def test_reconstruction_is_exact_for_a_stored_profile_and_close_to_a_directly_computed_ema():
    """Snapshots of sigma_rel 0.05 and 0.10 every 25 of 1,000 steps of a random-walk parameter: asked for a stored
    profile at a snapshot's step the reconstruction is that snapshot; asked for sigma_rel 0.07 (not stored) it
    matches the EMA computed directly with that profile far closer than either stored EMA does."""
    g = torch.Generator().manual_seed(0)
    thetas = torch.cumsum(torch.randn(1000, 64, generator=g, dtype=torch.float64), 0) / 10
    stored = {s: power_emas(thetas, sigma_rel_to_gamma(s)) for s in (0.05, 0.10)}
    steps = list(range(25, 1001, 25))
    snapshots = [(t, s, stored[s][t - 1]) for t in steps for s in stored]
    gammas = [sigma_rel_to_gamma(s) for _, s, _ in snapshots]
    x = posthoc_coefficients([t for t, _, _ in snapshots], gammas, 500, sigma_rel_to_gamma(0.10))
    assert np.allclose(x, np.eye(len(snapshots))[[i for i, (t, s, _) in enumerate(snapshots) if (t, s) == (500, 0.10)][0]],
                       atol=1e-6)
    truth = power_emas(thetas, sigma_rel_to_gamma(0.07))[-1]
    x = posthoc_coefficients([t for t, _, _ in snapshots], gammas, 1000, sigma_rel_to_gamma(0.07))
    rebuilt = combine([{"w": s} for _, _, s in snapshots], x)["w"]
    error = (rebuilt - truth).norm() / truth.norm()
    nearest = min((stored[s][-1] - truth).norm() / truth.norm() for s in stored)
    assert error < 0.02 * nearest, (float(error), float(nearest))
    assert abs(x.sum() - 1) < 1e-3  # an average: coefficients sum to 1


def ema_callback_state(checkpoint: dict) -> dict:
    return next(v for k, v in checkpoint["callbacks"].items() if k.startswith("EMA"))


POSTHOC = ["callbacks.ema.posthoc=true", "callbacks.ema.snapshot_every=2", "callbacks.ema.sigma_rels=[0.05,0.1]"]


def test_both_emas_resume_bit_identically_and_snapshots_match(tmp_path):
    """4 steps in one go against 3 + a resume from last.ckpt: the fixed-decay EMA, both power EMAs and every snapshot
    file are equal bit for bit."""
    from safetensors.torch import load_file

    from diffexp.checkpoints import load_file as load_checkpoint
    from diffexp.train import run

    run(compose_config("train", SHRINK + POSTHOC, tmp_path / "whole"))
    run(compose_config("train", SHRINK + POSTHOC + ["trainer.max_steps=3"], tmp_path / "part"))
    run(compose_config("train", SHRINK + POSTHOC + [f"ckpt_path={tmp_path / 'part' / 'checkpoints' / 'last.ckpt'}"],
                       tmp_path / "part"))
    whole = ema_callback_state(load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.ckpt"))
    part = ema_callback_state(load_checkpoint(tmp_path / "part" / "checkpoints" / "last.ckpt"))
    assert whole["num_updates"] == part["num_updates"] == 4
    for key, value in whole["ema_state"].items():
        assert torch.equal(value, part["ema_state"][key]), key
    assert len(whole["posthoc_state"]) == 2
    for mine, theirs in zip(whole["posthoc_state"], part["posthoc_state"]):
        for key, value in mine.items():
            assert torch.equal(value, theirs[key]), key
    files = sorted(p.name for p in (tmp_path / "whole" / "ema_snapshots").iterdir())
    assert files == ["step_000000002.safetensors", "step_000000004.safetensors"]
    for name in files:
        a, b = load_file(tmp_path / "whole" / "ema_snapshots" / name), load_file(tmp_path / "part" / "ema_snapshots" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    last = load_file(tmp_path / "whole" / "ema_snapshots" / files[-1])
    assert all(torch.equal(last[f"sigma_rel=0.05/{k}"], v) for k, v in whole["posthoc_state"][0].items())


def test_posthoc_options_and_a_resume_without_its_state_are_refused(tmp_path):
    from diffexp.callbacks import EMA

    with pytest.raises(ValueError, match=r"callbacks.ema.sigma_rels: sigma_rel must lie in"):
        EMA(posthoc=True, sigma_rels=[0.5])
    with pytest.raises(ValueError, match="callbacks.ema.snapshot_every must be a positive"):
        EMA(posthoc=True, snapshot_every=0)
    with pytest.raises(ValueError, match="distinct"):
        EMA(posthoc=True, sigma_rels=[0.1, 0.1])
    plain = EMA().state_dict()
    with pytest.raises(ValueError, match="has no power-function EMAs"):
        EMA(posthoc=True).load_state_dict(plain)
    other = EMA(posthoc=True, sigma_rels=[0.05, 0.1])
    other.posthoc_state = [{}, {}]
    with pytest.raises(ValueError, match=r"sigma_rels=\[0.05, 0.2\], but the checkpoint's run tracked \[0.05, 0.1\]"):
        EMA(posthoc=True, sigma_rels=[0.05, 0.2]).load_state_dict(other.state_dict())


@pytest.mark.slow
def test_readme_posthoc_commands_as_typed(fresh_workdir):
    """Train with post-hoc EMA, reconstruct two lengths, sample the result: the README's commands verbatim (training
    shrunk by SHRINK: 4 steps, so the one snapshot is the run's end); a stored length at the last snapshot is
    reconstructed exactly; a second reconstruction into the same --out is refused."""

    from safetensors.torch import load_file

    from diffexp.checkpoints import read_weights
    from tests.conftest import readme_command, run_as_typed

    run_as_typed(readme_command("python train.py callbacks.ema.posthoc=true hydra.run.dir=logs/posthoc"), fresh_workdir)
    reconstruct = readme_command("python -m diffexp.ema logs/posthoc --sigma-rel 0.05 0.1 --out ema")
    run_as_typed(reconstruct, fresh_workdir, shrink=False)
    run_as_typed(readme_command("python sample.py ckpt=ema/sigma_rel_0.05/model.safetensors n=16 out=samples"),
                 fresh_workdir, shrink=False)
    assert (fresh_workdir / "samples" / "grid.png").is_file()
    snapshot = load_file(fresh_workdir / "logs" / "posthoc" / "ema_snapshots" / "step_000000004.safetensors")
    rebuilt = read_weights(fresh_workdir / "ema" / "sigma_rel_0.05" / "model.safetensors")["state_dict"]
    for key, value in snapshot.items():
        if key.startswith("sigma_rel=0.05/"):
            torch.testing.assert_close(rebuilt[key.split("/", 1)[1]], value, rtol=1e-6, atol=1e-6)
    with pytest.raises(AssertionError, match="--out already holds"):
        run_as_typed(reconstruct, fresh_workdir, shrink=False)


@pytest.mark.slow
def test_compare_posthoc_ema_script(tmp_path):
    """experiments/scripts/compare_posthoc_ema.py on a tiny post-hoc run: a row for the fixed EMA, the raw weights
    and each sigma_rel, and the plot."""
    import json

    from diffexp.train import run
    from tests.conftest import run_script

    run(compose_config("train", SHRINK + POSTHOC, tmp_path / "run"))
    out = tmp_path / "posthoc"
    run_script("experiments/scripts/compare_posthoc_ema.py", "--run", str(tmp_path / "run"), "--n", "16", "--steps",
               "2", "--sigma-rel", "0.05", "0.1", "--out", str(out), check=True)
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["sigma_rel"] for r in rows] == [None, None, 0.05, 0.1]
    assert rows[2]["relative_residual"] < 1e-6  # stored lengths at the last snapshot: exact
    assert all(math.isfinite(r["fid_digits"]) for r in rows) and out.with_suffix(".png").is_file()


def test_reconstruction_only_at_a_snapshot_step(tmp_path):
    """EDM2 reconstructs at snapshot times: a step between snapshots is refused, naming the steps there."""
    from diffexp.callbacks import EMA
    from diffexp.ema import reconstruct

    ema = EMA(posthoc=True, sigma_rels=[0.05, 0.1])
    for step in (2, 4):
        ema.posthoc_state = [{"w": torch.full((3,), float(step))}, {"w": torch.full((3,), step + 0.5)}]
        ema.write_snapshot(tmp_path, step)
    weights, report = reconstruct(tmp_path, 0.1, 2)
    assert torch.allclose(weights["w"], torch.full((3,), 2.5)) and report["relative_residual"] < 1e-6
    with pytest.raises(ValueError, match=r"--step 3: reconstructions are made at a snapshot's step; .* \[2, 4\]"):
        reconstruct(tmp_path, 0.07, 3)
