"""Noise schedules compared on one figure: alpha-bar, beta, log-SNR and the signal left."""
from __future__ import annotations

from diffexp.schedules import SCHEDULES, get_schedule

CURVES = ("alpha_bar", "beta", "log_snr", "signal")


def schedule_curves(name: str, num_timesteps: int = 1000, zero_terminal_snr: bool = False) -> dict:
    """{t, alpha_bar, beta, log_snr, signal} as numpy arrays for one schedule.

    signal = sqrt(alpha_bar_t): the weight of x_0 in x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps.
    """
    schedule = get_schedule(name, num_timesteps, rescale_zero_terminal_snr=zero_terminal_snr)
    abar = schedule.alphas_cumprod
    return {"name": schedule.name, "t": list(range(num_timesteps)), "alpha_bar": abar.numpy(),
            "beta": schedule.betas.numpy(), "log_snr": schedule.log_snr.numpy(), "signal": abar.sqrt().numpy()}


def schedules_figure(names=tuple(SCHEDULES), num_timesteps: int = 1000, zero_terminal_snr=("linear",)):
    """Four panels (alpha_bar, beta, log-SNR, signal left) for each named schedule, plus the zero-terminal-SNR
    rescaling (Lin et al. 2023) of the schedules in ``zero_terminal_snr``."""
    import matplotlib.pyplot as plt

    for name in names:
        if name not in SCHEDULES:
            raise ValueError(f"schedule {name!r} is not known; choose from {list(SCHEDULES)}")
    curves = [schedule_curves(n, num_timesteps) for n in names]
    curves += [schedule_curves(n, num_timesteps, zero_terminal_snr=True) for n in zero_terminal_snr]
    titles = {"alpha_bar": r"$\bar\alpha_t$", "beta": r"$\beta_t$", "log_snr": r"log SNR = log $\bar\alpha/(1-\bar\alpha)$",
              "signal": r"signal left $\sqrt{\bar\alpha_t}$"}
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    for ax, key in zip(axes, CURVES):
        for c in curves:
            ax.plot(c["t"], c[key], label=c["name"], lw=1.4, ls="--" if "ztsnr" in c["name"] else "-")
        ax.set_title(titles[key], fontsize=10)
        ax.set_xlabel("t")
        if key == "beta":
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig
