"""The course models shipped with diffexp: small trained weights made by the presets' own commands.

Each lives in ``src/diffexp/pretrained/<name>/``: ``model.safetensors`` (EMA weights in float16 with the run
config inside, the format of train.py's ``RUN/checkpoints/model.safetensors``, so ``sample.py ckpt=`` reads it),
``metrics.csv`` (its training curves) and ``README.md`` (the model card: data, preset, commit, measured figures).
``experiments/scripts/make_course_models.py`` makes them.

    from diffexp.course import pretrained
    model, cfg = pretrained("shapes_text")
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class CourseModel:
    overrides: tuple[str, ...]   # python train.py OVERRIDES ({runs}: the directory of the runs)
    description: str
    depends_on: str | None = None
    notebooks: tuple[str, ...] = ()
    sampler: tuple[str, int] = ("ddim", 20)   # what its card's figures are measured with (name, steps)


MODELS: dict[str, CourseModel] = {
    "digits": CourseModel(("experiment=quickstart", "formulation=ddpm"),
                          "unconditional 16x16 digits, DDPM on the linear schedule (the quickstart before wave 3)",
                          notebooks=("02", "05", "10")),
    "digits_quadratic": CourseModel(("experiment=quickstart", "formulation=ddpm", "schedule=quadratic"),
                                    "the quickstart with the quadratic schedule", notebooks=("02",)),
    "digits_cosine": CourseModel(("experiment=quickstart", "formulation=ddpm", "schedule=cosine"),
                                 "the quickstart with the cosine schedule", notebooks=("02",)),
    "digits_flow": CourseModel(("experiment=quickstart",),
                               "unconditional 16x16 digits, rectified flow (the quickstart since wave 3)",
                               notebooks=("10", "11"), sampler=("dpmpp_2m", 20)),
    "digits_edm": CourseModel(("experiment=quickstart", "formulation=edm"),
                              "unconditional 16x16 digits, EDM (Karras et al. 2022: VE path, preconditioning, "
                              "log-normal sigma, lambda(sigma) weighting)",
                              notebooks=("10",), sampler=("dpmpp_2m", 20)),
    "digits_consistency": CourseModel(("distill=consistency", "init_from={runs}/digits_flow/checkpoints/last.ckpt"),
                                      "a consistency model of digits_flow (distill=consistency: consistency "
                                      "distillation with ECT's schedule), one to a few steps", depends_on="digits_flow",
                                      notebooks=("11",),
                                      sampler=("consistency", 2)),
    "shapes_text": CourseModel(("experiment=shapes_text2img",),
                               "text-to-image on 32x32 shapes, learned text encoder, classifier-free guidance",
                               notebooks=("04", "06", "09")),
    "shapes_dit": CourseModel(("experiment=shapes_text2img_dit",),
                              "text-to-image on 32x32 shapes with a DiT (net=dit_tiny, 4x4 patches) in place of the "
                              "U-Net, learned text encoder, classifier-free guidance; prompts in the training form "
                              "\"a SIZE COLOUR SHAPE in the POSITION\" (it follows prompts without a position far less often)",
                              notebooks=("04",)),
    "shapes_vae": CourseModel(("experiment=shapes_vae",), "KL autoencoder for 32x32 shapes, f=4 (8x8x4 latents)",
                              notebooks=("08",)),
    "shapes_latent": CourseModel(("experiment=shapes_latent", "vae.ckpt={runs}/shapes_vae/checkpoints/last.ckpt"),
                                 "unconditional latent diffusion on the shapes_vae latents", depends_on="shapes_vae",
                                 notebooks=("08",)),
}


def path(name: str) -> Path:
    """The weights file of the shipped model ``name`` (a clear error for unknown or missing ones)."""
    if name not in MODELS:
        raise ValueError(f"pretrained model {name!r} does not exist; choose from {sorted(MODELS)}")
    weights = HERE / name / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"the shipped model {name!r} is missing ({weights}); make it with "
                                f"python experiments/scripts/make_course_models.py train/pack --only {name}")
    return weights


def available() -> list[str]:
    """Names of the shipped models present in this installation."""
    return [name for name in MODELS if (HERE / name / WEIGHTS).is_file()]
