"""Distillation as a part of :class:`~diffexp.lit.DiffusionModel` (``distill=``): the teacher-student mechanics
shared by every method, and the methods (consistency, progressive, reflow) over the objectives of
:mod:`diffexp.distillation`.

The teacher is a trained diffexp checkpoint (``init_from=``; the student starts from its weights). train.py loads
it and attaches it (:meth:`Distillation.attach_teacher`): frozen, in eval mode, held outside the module's
parameters, so no checkpoint of the student copies it; the run records its path and weights fingerprint, and a
resumed run refuses a teacher whose weights changed. A teacher of another architecture, path, prediction,
conditioning or space than the student is refused by name.
"""
from __future__ import annotations

import copy
import hashlib
import warnings
import json
import math
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info

from diffexp.data.base import batch_size_of
from diffexp.cache import default_cache_dir, weights_fingerprint
from diffexp.checkpoints import atomic_torch_save, atomic_write
from diffexp.diffusion import to_x0_eps
from diffexp.distillation import ConsistencyObjective, ProgressiveObjective, check_boundary
from diffexp.guiders import CFG
from diffexp.lit.compat import differences
from diffexp.paths import FlowPath
from diffexp.registry import register_part

STATE_KEY = "diffexp_distill"


def teacher_denoiser(model, cond: dict, precision: str = "fp32", net=None):
    """(x_t, t) -> (x_0, eps) of ``model`` (a DiffusionModel; ``net`` in place of its own) with the net's condition
    arguments ``cond`` bound, no gradient."""
    denoise = model.prediction.model_fn(net if net is not None else model.net_at(precision), model.path)

    @torch.no_grad()
    def fn(x_t, t):
        prediction = denoise(x_t, t, **cond).to(x_t.dtype)
        alpha, sigma = model.path.coefficients(t, x_t)
        return to_x0_eps(prediction, x_t, alpha, sigma, model.prediction.sampler_type, model.path.variance_preserving)

    return fn


class Distillation:
    """Base of the ``distill=`` methods: holds the teacher and the run's distillation state.

    Args:
        teacher: the teacher checkpoint (``init_from``), recorded; train.py loads and attaches it.
    """

    method = "distillation"
    needs_teacher = True

    def __init__(self, teacher: str | None = None):
        self.teacher_path = None if teacher is None else str(teacher)
        self.teacher = None
        self.teacher_fingerprint: str | None = None

    # --- the teacher ---------------------------------------------------------------------------------
    def bind(self, model) -> None:
        """Checks against the student when the model is built (e.g. the prediction a method needs)."""

    def attach_teacher(self, model, teacher) -> None:
        """Freeze ``teacher`` (eval mode, no gradients), check it against the student ``model`` and keep it outside
        the module's parameters; record its weights fingerprint."""
        differ = differences(model, teacher)
        if differ:
            raise ValueError(f"distill={self.method}: the teacher init_from={self.teacher_path!r} does not match this "
                             f"run's student ({'; '.join(differ)}). Distil with the teacher's own settings (formulation=, "
                             f"net=, conditioning=, model=: its run's .hydra/overrides.yaml)")
        teacher.eval().requires_grad_(False)
        self.teacher = teacher
        self.teacher_fingerprint = weights_fingerprint(teacher.net)

    def require_teacher(self):
        if self.teacher is None:
            raise ValueError(f"distill={self.method} needs its teacher: train.py attaches the checkpoint of init_from= "
                             f"(python train.py distill={self.method} init_from=TEACHER)")
        return self.teacher

    def setup(self, model) -> None:
        """Before fitting: the teacher on the student's device."""
        if self.teacher is not None:
            self.teacher.to(model.device)

    # --- training ------------------------------------------------------------------------------------
    def conditions(self, model, batch: dict, drop: bool, generator: torch.Generator | None) -> tuple[dict, dict]:
        """(student's, teacher's) net condition arguments for ``batch``, the same items dropped for both."""
        state = generator.get_state() if generator is not None else None
        cond = model.conditioner.from_batch(batch, drop, generator, model.device)
        if self.teacher is None:
            return cond, cond
        if generator is not None:
            after = generator.get_state()
            generator.set_state(state)
        own_rate = self.teacher.conditioner.p_uncond
        self.teacher.conditioner.p_uncond = model.conditioner.p_uncond  # the same draws drop the same items
        try:
            teacher_cond = self.teacher.conditioner.from_batch(batch, drop, generator, model.device)
        finally:
            self.teacher.conditioner.p_uncond = own_rate
        if generator is not None:
            generator.set_state(after)
        return cond, teacher_cond

    def loss(self, model, batch: dict, drop_conditioning: bool, generator: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError

    def on_train_batch_start(self, model) -> None:
        """Before each training step (progressive distillation switches rounds here)."""

    def on_train_end(self, model) -> None:
        """After fitting."""

    # --- checkpoint ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"method": self.method, "teacher": self.teacher_path, "teacher_fingerprint": self.teacher_fingerprint}

    def load_state_dict(self, state: dict, model=None) -> None:
        """A resumed run: the same method, and the same teacher weights as the run started with."""
        if state.get("method") != self.method:
            raise ValueError(f"this checkpoint was written by distill={state.get('method')}; resume it with that "
                             f"method, not distill={self.method}")
        recorded = state.get("teacher_fingerprint")
        if recorded and self.teacher_fingerprint and recorded != self.teacher_fingerprint:
            raise ValueError(f"the teacher init_from={self.teacher_path!r} holds other weights (fingerprint "
                             f"{self.teacher_fingerprint}) than the one this run was distilled from ({state.get('teacher')}, "
                             f"{recorded}); resume with that teacher")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(teacher={self.teacher_path!r})"


@register_part
class ConsistencyDistillation(Distillation):
    """``distill=consistency``: consistency distillation (``target=teacher``, the default: x_r from one teacher ODE
    step) or tuning (``target=data``, ECT: no teacher calls), :class:`~diffexp.distillation.ConsistencyObjective`'s
    options as keywords. Sample with ``sampler=consistency sampler.steps=1|2|4``."""

    method = "consistency"

    def __init__(self, teacher: str | None = None, target: str = "teacher", solver: str = "euler", P_mean: float = -1.1,
                 P_std: float = 2.0, q: float = 2.0, k: float = 8.0, b: float = 1.0, c="auto",
                 stage_steps: int = 200):
        super().__init__(teacher)
        self.options = dict(target=target, solver=solver, P_mean=P_mean, P_std=P_std, q=q, k=k, b=b, c=c,
                            stage_steps=stage_steps)
        self.needs_teacher = target == "teacher"
        self.objective = None

    def bind(self, model):
        check_boundary(model.prediction)
        self.objective = ConsistencyObjective(model.path, model.prediction, **self.options)

    def loss(self, model, batch, drop_conditioning, generator):
        x0 = model.space.from_batch(batch, generator)
        cond, teacher_cond = self.conditions(model, batch, drop_conditioning, generator)
        teacher = None
        if self.objective.target == "teacher":
            teacher = teacher_denoiser(self.require_teacher(), teacher_cond, model.resolved_precision())
        step = model.global_step if model._trainer is not None else 0
        return self.objective.loss(model.raw_fn(cond), x0, generator, step, teacher)


@register_part
class ProgressiveDistillation(Distillation):
    """``distill=progressive``: progressive distillation (Salimans & Ho 2022) in ``rounds`` rounds of
    ``steps_per_round`` optimizer steps (null: ``trainer.max_steps`` / ``rounds``), one run. Round k's teacher takes
    ``start_steps`` / 2^k DDIM steps and its student half as many; the teacher of round 0 is the student's starting
    point (init_from=), that of round k > 0 the student (EMA weights when the run keeps them) at the end of round
    k - 1, kept in the run's checkpoints so a resumed run continues its round. At the end of each round the student
    is written as ``checkpoints/progressive_<steps>steps.safetensors`` (its config set to sample on that grid:
    ``sampler=ddim sampler.steps=<steps> sampler.timestep_spacing=trailing``). The student keeps training from its own
    weights across rounds (Salimans & Ho restart it from the new teacher; here the two differ by the EMA only).
    Epsilon prediction is allowed but, as Salimans & Ho show, fails at few steps: distil v- or velocity models."""

    method = "progressive"
    needs_teacher = False  # round 0 distils the student's own starting weights (the teacher's)

    def __init__(self, teacher: str | None = None, start_steps: int = 32, rounds: int = 5,
                 steps_per_round: int | None = None):
        super().__init__(teacher)
        for name, value in (("start_steps", start_steps), ("rounds", rounds), ("steps_per_round", steps_per_round)):
            if value is None and name == "steps_per_round":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"distill.{name} must be a positive integer{' or null' * (name == 'steps_per_round')}"
                                 f", got {value!r}")
        if start_steps % 2**rounds:
            raise ValueError(f"distill.start_steps={start_steps} must be divisible by 2^rounds = {2**rounds} "
                             f"(distill.rounds={rounds} halvings)")
        self.start_steps, self.rounds, self.steps_per_round = start_steps, rounds, steps_per_round
        self.round = -1  # none started
        self.resolved_length: int | None = None
        self.round_net = None
        self.objective = None

    def bind(self, model):
        self.objective = ProgressiveObjective(model.path, model.prediction, model.objective.weights)

    def student_steps(self, round_index: int) -> int:
        """DDIM steps of round ``round_index``'s student."""
        return self.start_steps // 2 ** (round_index + 1)

    def round_length(self, model) -> int:
        """Optimizer steps per round: ``steps_per_round``, or null: the run's ``trainer.max_steps`` / ``rounds``, fixed
        when the first round starts and kept in the checkpoint (a resumed run with another max_steps keeps it)."""
        if self.steps_per_round is not None:
            return self.steps_per_round
        if self.resolved_length is None:
            max_steps = model.trainer.max_steps if model._trainer is not None else -1
            if max_steps is None or max_steps < 1:
                raise ValueError("distill.steps_per_round=null takes the rounds' length from trainer.max_steps, which is "
                                 "not set; set trainer.max_steps or distill.steps_per_round")
            self.resolved_length = math.ceil(max_steps / self.rounds)
        return self.resolved_length

    def round_of(self, model, step: int) -> int:
        return min(step // self.round_length(model), self.rounds - 1)

    def on_train_batch_start(self, model):
        wanted = self.round_of(model, model.global_step)
        if wanted == self.round:
            return
        if self.round >= 0:
            self.save_student(model, self.student_steps(self.round))
        self.round_net = copy.deepcopy(self.weights_for_teacher(model)).eval().requires_grad_(False)
        self.round = wanted
        max_steps = model.trainer.max_steps if model._trainer is not None else None
        if wanted == 0 and max_steps and max_steps < self.rounds * self.round_length(model):
            warnings.warn(f"distill=progressive: trainer.max_steps={max_steps} ends before round {self.rounds} "
                          f"({self.rounds} rounds of {self.round_length(model)} steps); the last rounds will not run",
                          stacklevel=2)
        rank_zero_info(f"[diffexp] progressive distillation round {wanted + 1}/{self.rounds}: teacher "
                    f"{2 * self.student_steps(wanted)} DDIM steps -> student {self.student_steps(wanted)}")

    @staticmethod
    def weights_for_teacher(model):
        """The student's net as the next teacher: its EMA weights if the run keeps them."""
        from diffexp.callbacks.ema import ema_weights

        if model._trainer is None:
            return model.net
        with ema_weights(model.trainer, model):
            return copy.deepcopy(model.net)

    def save_student(self, model, steps: int) -> Path | None:
        """The student as it stands (EMA weights if kept) as checkpoints/progressive_<steps>steps.safetensors."""
        from diffexp.callbacks.ema import ema_weights
        from diffexp.checkpoints import save_weights

        if model._trainer is None or not model.trainer.is_global_zero or model.run_config is None:
            return None
        path = Path(model.trainer.default_root_dir) / "checkpoints" / f"progressive_{steps}steps.safetensors"
        config = copy.deepcopy(model.run_config)
        for node in (config.get("sampler"), (config.get("model") or {}).get("sampler")):
            if isinstance(node, dict):  # the student samples on the grid it was distilled on
                node.update(steps=steps, timestep_spacing="trailing")
        with ema_weights(model.trainer, model):
            save_weights(model.state_dict(), config, path)
        rank_zero_info(f"[diffexp] {steps}-step student: {path}")
        return path

    def on_train_end(self, model):
        if self.round >= 0:
            self.save_student(model, self.student_steps(self.round))

    def loss(self, model, batch, drop_conditioning, generator):
        if self.round_net is None:
            self.on_train_batch_start(model)
        self.round_net.to(model.device)
        x0 = model.space.from_batch(batch, generator)
        cond, _ = self.conditions(model, batch, drop_conditioning, generator)
        teacher = teacher_denoiser(model, cond, net=self.round_net)
        return self.objective.loss(model.raw_fn(cond), teacher, x0, generator, self.student_steps(self.round))

    def state_dict(self):
        state = super().state_dict()
        state["round"] = self.round
        state["round_length"] = self.resolved_length
        if self.round_net is not None:
            state["round_teacher"] = {k: v.detach().cpu().clone() for k, v in self.round_net.state_dict().items()}
        return state

    def load_state_dict(self, state, model=None):
        super().load_state_dict(state, model)
        self.round = int(state.get("round", -1))
        self.resolved_length = state.get("round_length", self.resolved_length)
        if "round_teacher" in state and model is not None:
            self.round_net = copy.deepcopy(model.net).eval().requires_grad_(False)
            self.round_net.load_state_dict(state["round_teacher"])


@register_part
class Reflow(Distillation):
    """``distill=reflow`` (Liu et al. 2023, "Flow Straight and Fast"): ``pairs`` couplings (z, x = ODE_teacher(z))
    drawn once with the teacher's ``sampler`` from unit noise z, stored as shards under ``pairs_dir`` (default: the
    cache, one folder per :meth:`spec`: teacher fingerprint, solver, seed, count), so a second run reuses them and an
    interrupted generation resumes at its first missing shard; shard i's noise comes from a generator seeded with
    (seed, i), so the pairs are reproducible. Then the student trains its flow-matching objective on the pairs
    (x_t = (1 - t) x + t z, velocity z - x): the straighter the couplings, the fewer Euler steps it needs
    (``sampler=euler sampler.steps=1|2``).
    Class-conditional teachers get uniformly drawn labels, stored with the pairs."""

    method = "reflow"

    def __init__(self, teacher: str | None = None, pairs: int = 4096, shard_size: int = 1024, sampler=None,
                 seed: int = 0, pairs_dir: str | None = None):
        super().__init__(teacher)
        for name, value in (("pairs", pairs), ("shard_size", shard_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"distill.{name} must be a positive integer, got {value!r}")
        self.pairs, self.shard_size, self.sampler, self.seed = pairs, shard_size, sampler, seed
        self.pairs_dir = pairs_dir
        self.data: dict | None = None

    def bind(self, model):
        if not isinstance(model.path, FlowPath):
            raise ValueError(f"distill=reflow straightens a rectified flow: the teacher and student must be flow models "
                             f"(formulation=flow); this one's path is {model.path!r}")
        if "captions" in model.conditioner.keys:
            raise ValueError("distill=reflow draws its couplings for unconditional or class-conditional models; a "
                             "text model is distilled with distill=consistency or distill=progressive")

    def spec(self) -> dict:
        """What the couplings depend on: the teacher's weights, its ODE solver, the seed, the shard layout."""
        sampler = self.sampler
        solver = {"name": getattr(sampler, "func", type(sampler)).__name__,
                  **{k: v for k, v in sorted(getattr(sampler, "keywords", {}).items()) if k != "progress"}} \
            if sampler is not None else "the teacher's configured sampler"
        return {"teacher_fingerprint": self.teacher_fingerprint, "solver": solver, "seed": self.seed,
                "pairs": self.pairs, "shard_size": self.shard_size}

    def directory(self) -> Path:
        """``pairs_dir``, or the cache's folder of this :meth:`spec`."""
        if self.pairs_dir:
            return Path(self.pairs_dir)
        digest = hashlib.sha1(json.dumps(self.spec(), sort_keys=True, default=str).encode()).hexdigest()[:10]
        return default_cache_dir() / "reflow" / f"{self.teacher_fingerprint}-{digest}"

    def check_directory(self, directory: Path) -> None:
        """Write the spec into a new folder; refuse one that holds the couplings of another spec."""
        spec_file = directory / "spec.json"
        spec = json.loads(json.dumps(self.spec(), default=str))
        if spec_file.is_file():
            held = json.loads(spec_file.read_text())
            if held != spec:
                differ = [f"{k}: {held.get(k)!r} there, {spec.get(k)!r} here" for k in spec if held.get(k) != spec.get(k)]
                raise ValueError(f"distill.pairs_dir={str(directory)!r} holds the couplings of another teacher or "
                                 f"setting ({'; '.join(differ)}); choose another folder (or pairs_dir=null: the cache "
                                 f"keeps one folder per setting)")
        else:
            directory.mkdir(parents=True, exist_ok=True)
            atomic_write(spec_file, lambda tmp: tmp.write_text(json.dumps(spec, indent=2)))

    def shard_noise(self, index: int, count: int, shape, num_classes: int | None) -> tuple:
        """The unit noise (and labels) of shard ``index``: the same for the same seed everywhere."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        z = torch.randn((count, *shape), generator=generator)
        labels = torch.randint(0, num_classes, (count,), generator=generator) if num_classes else None
        return z, labels

    def generate_shard(self, index: int, device) -> dict:
        """Pairs of shard ``index``: its noise through the teacher's ODE (``sampler``), in the model's space."""
        teacher = self.require_teacher()
        count = min(self.shard_size, self.pairs - index * self.shard_size)
        num_classes = getattr(teacher.conditioner, "num_classes", None)
        z, labels = self.shard_noise(index, count, teacher.sample_shape, num_classes)
        sampler = teacher.make_sampler(self.sampler).with_options(progress=False)
        conditions = {"class_labels": labels} if labels is not None else {}
        model_fn = teacher.conditioner.model_fn(teacher.denoiser_fn("fp32"), count, conditions, CFG(1.0), teacher.path,
                                               teacher.prediction.sampler_type, device)
        with torch.no_grad():
            x = sampler.sample(model_fn, (count, *teacher.sample_shape), x_T=z.to(device), device=device)
        shard = {"noise": z, "sample": x.cpu().float()}
        if labels is not None:
            shard["label"] = labels
        return shard

    def prepare_pairs(self, model) -> Path:
        """Write the shards that are missing (this rank's share under DDP), wait for all ranks, load them all."""
        directory = self.directory()
        trainer = model.trainer if model._trainer is not None else None
        if trainer is None or trainer.is_global_zero:
            self.check_directory(directory)
        if trainer is not None:
            trainer.strategy.barrier("reflow_spec")
        shards = math.ceil(self.pairs / self.shard_size)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        for index in range(rank, shards, world):
            path = directory / f"pairs_{index:05d}.pt"
            if not path.is_file():
                rank_zero_info(f"[diffexp] reflow: teacher ODE pairs shard {index + 1}/{shards} -> {path}")
                atomic_torch_save(self.generate_shard(index, model.device), path)
        if trainer is not None:
            trainer.strategy.barrier("reflow_pairs")
        loaded = [torch.load(directory / f"pairs_{i:05d}.pt", weights_only=True) for i in range(shards)]
        self.data = {key: torch.cat([shard[key] for shard in loaded]) for key in loaded[0]}
        return directory

    def setup(self, model):
        super().setup(model)
        if self.data is None:
            self.require_teacher()
            self.prepare_pairs(model)

    def loss(self, model, batch, drop_conditioning, generator):
        if self.data is None:
            raise ValueError("distill=reflow: the teacher's pairs are not prepared (the model's setup() does it)")
        n = batch_size_of(batch)
        index = torch.randint(0, len(self.data["sample"]), (n,), generator=generator, device=model.device).cpu()
        pairs = {key: value[index].to(model.device) for key, value in self.data.items()}
        batch = {"image": pairs["sample"], **({"label": pairs["label"]} if "label" in pairs else {})}
        cond = model.conditioner.from_batch(batch, drop_conditioning, generator, model.device)
        return model.objective.loss(model.raw_fn(cond), pairs["sample"], generator, noise=pairs["noise"])

    def state_dict(self):
        state = super().state_dict()
        state["pairs_dir"] = str(self.directory()) if self.teacher_fingerprint else self.pairs_dir
        return state


DISTILLATIONS = (ConsistencyDistillation, ProgressiveDistillation, Reflow)
