"""The pieces of the evaluation protocol (``python -m diffexp.evaluate``): reference statistics in a file,
Frechet distances from statistics, and samples drawn in chunks that a stopped evaluation resumes.

Reference files are ``.npz``: per feature network ``E`` the arrays ``E_mu`` (D,) and ``E_sigma`` (D, D) (float64)
and, for precision/recall, ``E_features`` (a fixed random subset of the real features), with ``meta`` (JSON:
the data, the count, each network's weights fingerprint). A published ``.npz`` with ``mu`` and ``sigma``
(clean-fid's and ADM's reference batches) is read as Inception statistics.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch

PUBLISHED_KEYS = ("mu", "sigma")


def feature_statistics(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of (N, D) features, float64, the covariance with N - 1 as torch-fidelity computes it."""
    array = features.double().cpu().numpy()
    return array.mean(axis=0), np.cov(array, rowvar=False)


def frechet_from_statistics(mu_1, sigma_1, mu_2, sigma_2) -> float:
    """|mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)) (Heusel et al. 2017), by torch-fidelity."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    mu_1, sigma_1, mu_2, sigma_2 = (np.asarray(a, dtype=np.float64) for a in (mu_1, sigma_1, mu_2, sigma_2))
    dim = mu_1.shape[0]
    if mu_1.shape != (dim,) or mu_2.shape != (dim,) or sigma_1.shape != (dim, dim) or sigma_2.shape != (dim, dim):
        raise ValueError(f"Frechet distance of statistics of other sizes: mu {mu_1.shape} / {mu_2.shape}, sigma "
                         f"{sigma_1.shape} / {sigma_2.shape} (a reference made with another feature network?)")
    result = fid_statistics_to_metric({"mu": mu_1, "sigma": sigma_1}, {"mu": mu_2, "sigma": sigma_2}, False)
    return float(result[KEY_METRIC_FID])


def write_reference(path: str | Path, statistics: dict[str, dict], meta: dict) -> Path:
    """Write ``{network: {"mu", "sigma", "features"?}}`` and ``meta`` to ``path`` (atomically; never over a file)."""
    path = Path(path).expanduser()
    if path.exists():
        raise FileExistsError(f"reference={str(path)!r} exists; it is never overwritten (delete it or choose "
                              f"another name)")
    arrays = {"meta": np.array(json.dumps(meta))}
    for name, stats in statistics.items():
        arrays.update({f"{name}_{key}": np.asarray(value) for key, value in stats.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial.npz")
    np.savez(partial, **arrays)
    partial.replace(path)
    return path


def read_reference(path: str | Path) -> tuple[dict[str, dict], dict]:
    """``({network: {"mu", "sigma", "features"?}}, meta)`` from a reference file of ours or a published one."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"reference={str(path)!r} does not exist; compute it with `python -m "
                                f"diffexp.evaluate data=... reference={path}`")
    with np.load(path, allow_pickle=False) as npz:
        if "meta" not in npz.files:  # read only mu and sigma (ADM's files also hold the images)
            if not all(key in npz.files for key in PUBLISHED_KEYS):
                raise ValueError(f"reference={str(path)!r} has neither diffexp's arrays nor 'mu' and 'sigma' "
                                 f"(clean-fid / ADM format); it holds {sorted(npz.files)}")
            return {"inception": {"mu": npz["mu"].astype(np.float64), "sigma": npz["sigma"].astype(np.float64)}}, \
                {"published": True}
        arrays = {key: npz[key] for key in npz.files}
    meta = json.loads(str(arrays.pop("meta")))
    statistics: dict[str, dict] = {}
    for key, value in arrays.items():
        name, _, field = key.rpartition("_")
        statistics.setdefault(name, {})[field] = value
    return statistics, meta


def check_reference(statistics: dict, meta: dict, path, networks: dict[str, str], need_features: set[str]) -> None:
    """The reference has what the metrics need, from the same networks (``networks``: name -> weights
    fingerprint); a clear error otherwise."""
    for name, fingerprint in networks.items():
        if name not in statistics:
            raise ValueError(f"reference={path} has no {name} statistics (it has {sorted(statistics)}); compute a "
                             f"reference with them: python -m diffexp.evaluate data=... metrics=[...] "
                             f"reference=NEW.npz")
        known = meta.get("fingerprints", {}).get(name)
        if known is None:
            warnings.warn(f"reference={path}: the {name} network it was computed with is not recorded (a published "
                          f"file); figures compare only if it was the same network and resizing", stacklevel=2)
        elif known != fingerprint:
            raise ValueError(f"reference={path} was computed with other {name} weights (fingerprint {known}, these "
                             f"are {fingerprint}); compute a new reference with these weights")
        if name in need_features and "features" not in statistics[name]:
            raise ValueError(f"reference={path} holds {name} statistics only; precision/recall need its features "
                             f"(a published mu/sigma file has none): compute a reference with data=...")


def chunk_path(out: Path, seed: int, index: int) -> Path:
    return out / f"seed_{seed}" / f"chunk_{index:05d}.pt"


def chunk_seed(seed: int, index: int) -> int:
    """The noise seed of chunk ``index`` of ``seed``'s samples: chunks do not depend on one another, so a resumed
    evaluation draws what an uninterrupted one would."""
    return (seed * 1_000_003 + index) % 2 ** 63
