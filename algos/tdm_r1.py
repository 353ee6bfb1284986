"""TDM-R1 (Luo et al., 2026): RL on a few-step generator from any reward, through a learned surrogate, with the
TDM marginal KL as the regulariser and no denoising loss on the generator; and plain TDM distillation (`--algo tdm`,
λ = 1, no surrogate). TDM_R1.md is the spec, verified against the official trainer `train_tdmr1_pub.py`.

Roles: teacher T (frozen), generator G (trainable, from the few-step student), critic F (the fake score, a LoRA on
the teacher), surrogate Φ (a LoRA on the teacher: r_Φ(x, τ) = β·log p_Φ,τ(x)/p_T,τ(x) is the implicit reward) and
surrogate_old Φ_old (a lagged copy of Φ for the trust region). F and Φ start as the teacher (zero-init LoRA B).

One iteration (σ_0 > … > σ_K = 0 the generator's grid; τ(lo) = warp(u), u ~ U[warp⁻¹(lo) + 0.02, 1], one u per draw;
bridge(x_n, σ_n → τ, ε) = a·x_n + b·ε with a = (1 − τ)/(1 − σ_n), b = √(τ² − a²σ_n²), the exact forward kernel):
    rollout (runtime): G images per prompt, deterministic Euler with G (no CFG), every state x_0..x_K stored
    scores (reward workers) -> A_i: per-prompt mean, std over the whole batch, clip ±5; x_k inherits A of its x_K
    for each micro-batch (whole groups), for j in M steps drawn from 0..K−1 (shared by every learner):
        v = G(x_j, σ_j) [grad];  x̂0 = x_j − σ_j·v;  x_n = sg(x_j − (σ_j − σ_{j+1})·v)          # Euler = the rollout
        τ ~ τ(σ_{j+1}); ε fresh;  x_τ = bridge(x_n, σ_{j+1} → τ, ε)
        # critic: L_F = mse(v_F(x_τ), (x_τ − sg x̂0)/τ) + 0.02·mse(v_F(x_τ), sg v_T(x_τ))
        # surrogate (tdm_r1):  k ~ Cat(∝ k+1) (shared); x_n' = stored x_{k+1}; τ_s ~ τ(max(σ_{k+1}, σ_min_sur))
        #   ε_g one per group; x = bridge(x_n', σ_{k+1} → τ_s, ε_g); v* = −x_n'/(1−σ_{k+1}) + ε_g/b·(τ_s + σ²a/(1−σ))
        #   d_Φ, d_old, d_T = mean_D (v* − v_{Φ,Φ_old,T}(x))²;  R̄ = mean (v_Φ − sg v_T)²
        #   clipped_i = [A>0 ? e^{d_old−d_Φ} > 1+c : e^{d_old−d_Φ} < 1−c] ∨ [R̄ > 0.05 ∧ (A>0 ? d_Φ < d_T : d_Φ > d_T)]
        #   d̃ = sg(d_Φ) where clipped;  S_g = (β_dpo/G)·Σ_{i∈g} A_i·(d_Φ,i − d_T,i)  (stop-grad)
        #   L_Φ = (k+1)/K · [mean_i sg(sigmoid(S_g(i)))·A_i·d̃_i + β_reg·R̄]          # DGPO's group loss
        # generator, on x̂0 only:  ℓ(Δ, n) = mean (sg(x̂0 + Δ) − x̂0)²/n,  ∂ℓ/∂x̂0 = −2Δ/(n·numel)
        #   c, u = T(x_τ | prompt, ""); Δ_KL = c − F(x_τ); Δ_CFG = (w_T − 1)(c − u); n_T = mean|x̂0 − (u + w_T(c − u))|
        #   (tdm_r1) τ' ~ τ(max(σ_{j+1}, σ_min_gen)); ε'_g per group; x' = bridge(x_n → τ', ε'_g)
        #   Φ_cfg = Φ_u + w_rl(Φ_c − Φ_u) at x'; Δ_R = Φ_cfg − T_c(x'); n_R = mean|x̂0 − Φ_cfg|
        #   L_G = ℓ(Δ_KL, n_T) + λ·ℓ(Δ_CFG, n_T) + (1 − λ)·ℓ(Δ_R, n_R)     if j < reward_steps
        #   L_G = λ·[ℓ(Δ_KL, n_T) + ℓ(Δ_CFG, n_T)]                            otherwise
        backward L_F, L_Φ, L_G, each into its own role, weighted by the micro-batch's share / M
    step F, then Φ (then Φ_old ← d·Φ_old + (1 − d)·Φ, d = min(0.3, 0.001 + 0.001·n)), then G; each clipped alone
    (the first critic_warmup iterations leave G out: no generator loss, no G step)
Plain TDM (`--algo tdm`): no rewards, no surrogate, λ = 1: L_G = ℓ(Δ_KL, n_T) + ℓ(Δ_CFG, n_T), i.e. the marginal KL to
the teacher with CFG w_T, on the generator's own deterministic trajectory.

Deviations from the official code (TDM_R1.md §4f lists its artifacts), each saying why:
  * Each role's gradient is clipped alone; the official clip runs over the whole transformer after each role's
    backward, so it mixes the other adapters' accumulated gradients into each norm.
  * One sampler: the rollout is deterministic Euler/DDIM at G's grid, so the stored x_{j+1} is exactly the Euler step
    the generator loss re-simulates (the official rolls out with DPM-Solver++(2M) and re-simulates with Euler).
  * The CFG-reward scale and the normaliser's CFG are one knob, the real guidance w_T (teacher.guidance or
    algo.options.real_guidance): Δ_CFG = (w_T − 1)(c − u), n_T at CFG w_T. The official hard-codes 3.5 and 4.5, i.e.
    w_T = 4.5, which the SD3.5 presets set.
  * τ is drawn on the model's own training-time axis (its scheduler's shift warp, or the VP timestep table), so
    the sampler means the same on every family; with SD3.5's shift 3 this is the official S(u) = 3u/(1 + 2u).
  * One generator forward per (micro-batch, j): the critic turn reads its detached x̂0 and Euler step (the official
    recomputes them under no_grad: the same values, as no role steps inside the accumulation window), and the
    critic turn and the generator's KL term share x_τ (the official draws two ε): both estimates stay unbiased and
    one critic and one teacher forward are saved.
  * Advantages are normalised over the whole rollout batch by the runtime and zero-variance groups are masked
    (A = 0): they add nothing to the DGPO term but still to R̄ and the generator's KL, as in the official code.
  * R̄'s clip compares one batch mean with the threshold, as the official (reference_clip: batch); `sample` compares
    each sample's own gap.
  * critic_warmup (off by default, not in the official code): F and Φ start as the teacher, so on a student
    distilled elsewhere the first updates see Δ_KL ≈ 0 and only CFG-as-reward; a warm-up lets F learn the student first
    (on the world, 10 iterations changed nothing measurable: README, "TDM-R1 on the embedded world").
Rollouts are strictly on-policy (runtime.max_staleness 0): x_k inherits the reward of the x_K that the generator
which drew it reached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from rlfew.algos.advantages import AdvantageSpec
from rlfew.algos.distribution_matching import fraction_to_sigma, standard_normal
from rlfew.config import TrainConfig
from rlfew.errors import ConfigError, UsageError
from rlfew.method import Batch, Method, MethodSpec, RolloutSpec, StepResult, register_method
from rlfew.models import Conditioning, FamilyAdapter, Role, Roles, RoleSpec
from rlfew.optim import backward
from rlfew.sampling import Deterministic

DETERMINISTIC_ONLY = ("TDM-R1 gives every state x_k the reward of the final image it reaches, which holds only when "
                      "x_k -> x_K is deterministic; a few-step (DMD-, TDM-, ADD-distilled) student is therefore rolled "
                      "out with the deterministic Euler/DDIM sampler")


# --------------------------------------------------------------------------------- noise levels (§2)

def sigma_to_fraction(adapter: FamilyAdapter, sigma: float, resolution: int | None = None) -> float:
    """The fraction u of the training-time axis with `fraction_to_sigma(u) = σ`, by bisection (the warp is
    monotone for every family, and one inverse serves shifted flows, FLUX's dynamic shift and VP tables)."""
    low, high = 0.0, 1.0
    for _ in range(60):
        middle = 0.5 * (low + high)
        fraction = torch.tensor([middle], dtype=torch.float64)
        if float(fraction_to_sigma(adapter, fraction, resolution=resolution)[0]) < sigma:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)


def tau_fraction_range(low_fraction: float, margin: float = 0.02) -> tuple[float, float]:
    """The fractions τ is drawn from, uniformly, above a level whose fraction is `low_fraction`: [u_lo + margin, 1]
    (the official τ-sampler: one u per micro-batch, τ = warp(u))."""
    return min(low_fraction + margin, 1.0), 1.0


def bridge(x_n: torch.Tensor, sigma_n: float, tau: float, noise: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """x_τ = a·x_n + b·ε, the exact forward kernel q(x_τ | x_σn) of x_σ = (1 − σ)x0 + σε for τ > σ_n."""
    a = (1 - tau) / (1 - sigma_n)
    b = math.sqrt(tau**2 - (a * sigma_n) ** 2)
    return a * x_n + b * noise, a, b


def anchor_target(x_n: torch.Tensor, sigma_n: float, tau: float, noise: torch.Tensor, a: float,
                  b: float) -> torch.Tensor:
    """The noisy-anchor velocity target v* = −x_n/(1 − σ_n) + (ε/b)(τ + σ_n²a/(1 − σ_n)): E[v* | x_τ] is the velocity
    of p(x_n) diffused to τ; at σ_n = 0 it is ε − x0."""
    return -x_n / (1 - sigma_n) + noise / b * (tau + sigma_n**2 * a / (1 - sigma_n))


# ------------------------------------------------------------------------------ surrogate: DGPO (§3, §4b)

def group_sums(values: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Σ over each sample's group, returned per sample. A group split over learners sums its parts (the official
    all-reduce); rlfew never splits one, so the local sum is the whole."""
    _, index = torch.unique(group_ids, return_inverse=True)
    sums = torch.zeros(int(index.max()) + 1, dtype=values.dtype, device=values.device).index_add_(0, index, values)
    return sums[index]


def dgpo_loss(d: torch.Tensor, d_ref: torch.Tensor, advantages: torch.Tensor, group_ids: torch.Tensor, beta: float,
              group_size: int, clipped: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """DGPO's group loss as the official code writes it: mean_i sg(sigmoid(S_g(i)))·A_i·d̃_i with
    S_g = (β/G)·Σ_{i∈g} A_i·(d_i − d_ref,i) (stop-grad) and d̃ = sg(d) where `clipped`. Its gradient is
    (G/(β·B))·∇Σ_g softplus(S_g): max log σ(R(G⁺) − R(G⁻)) with |A| as weights. Returns (loss, sigmoid weights)."""
    group_score = group_sums(beta / group_size * advantages * (d - d_ref).detach(), group_ids)
    weights = torch.sigmoid(group_score).detach()
    trained = d if clipped is None else torch.where(clipped, d.detach(), d)
    return (weights * advantages * trained).mean(), weights


def trust_region_clips(advantages: torch.Tensor, d: torch.Tensor, d_old: torch.Tensor, d_ref: torch.Tensor,
                       reference_gap: torch.Tensor, clip_range: float, threshold: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ratio clip, reference clip) masks of the surrogate's trust region. ρ = exp(d_old − d) is the likelihood ratio
    Φ/Φ_old; a sample stops pushing once ρ left [1 − c, 1 + c] in its advantage's direction, or once Φ strays from T
    by more than `threshold` (`reference_gap`: R̄, a scalar or per sample) while moving further that way."""
    positive = advantages > 0
    ratio = torch.exp(d_old - d).detach()
    ratio_clip = torch.where(positive, ratio > 1 + clip_range, ratio < 1 - clip_range)
    reference_clip = (reference_gap.detach() > threshold) & torch.where(positive, d < d_ref, d > d_ref)
    return ratio_clip, reference_clip


def surrogate_old_decay(step: int) -> float:
    """Φ_old's lag after the surrogate's step number `step` (1-based): min(0.3, 0.001 + 0.001·(step − 1)), the
    official schedule (≈ the previous iterate once it reaches 0.3)."""
    return min(0.3, 0.001 + 0.001 * (step - 1))


def draw_surrogate_step(steps: int, rng: torch.Generator) -> int:
    """k ∈ {0..K−1} with P(k) ∝ k + 1 (the official surrogate puts more weight on the cleaner stored states)."""
    u = float(torch.rand((), generator=rng, device=rng.device, dtype=torch.float64))
    cumulative = torch.arange(1, steps + 1, dtype=torch.float64).cumsum(0) / (steps * (steps + 1) / 2)
    return min(int(torch.searchsorted(cumulative, torch.tensor(u, dtype=torch.float64), right=True)), steps - 1)


def within_group_auc(implicit: torch.Tensor, rewards: torch.Tensor, group_ids: torch.Tensor) -> tuple[float, float]:
    """(pairs ranked like the reward, pairs): over pairs of one group with different rewards, how often the
    implicit reward orders them the same way (ties count half). Their ratio is the surrogate's AUC."""
    same_group = group_ids[:, None] == group_ids[None, :]
    better = (rewards[:, None] > rewards[None, :]) & same_group
    agree = (implicit[:, None] > implicit[None, :]).double() + 0.5 * (implicit[:, None] == implicit[None, :]).double()
    return float((agree * better).sum()), float(better.sum())


# ------------------------------------------------------------------------------------ generator (§4c)

def score_matching_term(x0: torch.Tensor, direction: torch.Tensor, normaliser: torch.Tensor) -> torch.Tensor:
    """ℓ(Δ, n) = mean[(sg(x̂0 + Δ) − x̂0)² / n], n per sample: its gradient w.r.t. x̂0 is −2Δ/(n·numel), so
    descending it moves x̂0 along Δ."""
    target = (x0 + direction).detach()
    scale = normaliser.reshape(-1, *([1] * (x0.ndim - 1)))
    return ((target - x0) ** 2 / scale).mean()


def mean_abs(x: torch.Tensor) -> torch.Tensor:
    return x.abs().flatten(1).mean(1)


def conditional_and_unconditional(role: Role, x: torch.Tensor, sigma: float, cond: Conditioning,
                                  uncond: Conditioning) -> tuple[torch.Tensor, torch.Tensor]:
    """x̂0 of `role` for the prompts and for the empty prompt, in one batched call."""
    both = role.predict(torch.cat([x, x]), sigma, Conditioning.cat([cond, uncond])).x0
    return both[: len(x)], both[len(x):]


# ------------------------------------------------------------------------------------------ options

@dataclass
class TDMOptions:
    sampler: str = "deterministic"  # the rollout sampler: deterministic only (Euler / DDIM), see DETERMINISTIC_ONLY
    steps_per_rollout: int = 2  # M: steps j trained per micro-batch (official: 2 of 4)
    real_guidance: float | None = None  # w_T of Δ_CFG and the normaliser; None: teacher.guidance (official 4.5)
    critic_reference_weight: float = 0.02  # the critic's pull towards the teacher's velocity
    tau_margin: float = 0.02  # τ's fraction starts this far above the level it diffuses from
    critic_warmup: int = 0  # first iterations that train the critic (and surrogate) only, the generator frozen

    def __post_init__(self):
        if self.sampler != "deterministic":
            raise ConfigError(f"algo.options.sampler: {self.sampler!r} is not allowed: {DETERMINISTIC_ONLY}; "
                              f"use deterministic")
        if self.critic_warmup < 0:
            raise ConfigError(f"algo.options.critic_warmup: must be >= 0 (iterations), got {self.critic_warmup}")
        if self.steps_per_rollout < 1:
            raise ConfigError(f"algo.options.steps_per_rollout: must be >= 1, got {self.steps_per_rollout}")
        for name in ("critic_reference_weight", "tau_margin"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"algo.options.{name}: must be a finite number >= 0, got {value}")
        if self.tau_margin >= 1:
            raise ConfigError(f"algo.options.tau_margin: must be < 1 (a fraction of the time axis), got "
                              f"{self.tau_margin}")
        if self.real_guidance is not None and not (math.isfinite(self.real_guidance) and self.real_guidance >= 1):
            raise ConfigError(f"algo.options.real_guidance: must be >= 1, got {self.real_guidance}")


@dataclass
class TDMR1Options(TDMOptions):
    tdm_weight: float = 0.3  # λ: the TDM (KL + CFG) share against the surrogate reward's 1 − λ
    surrogate_guidance: float = 4.5  # w_rl: CFG of the surrogate's x̂0 in Δ_R (OCR 4.5, GenEval 2.5, IR/HPS 3.5)
    beta_dpo: float = 10.0  # β of DGPO's group score (OCR, HPS 10; GenEval, ImageReward 1)
    clip_range: float = 1e-3  # c of the ratio clip (OCR, GenEval 1e-3; IR/HPS 2e-3)
    reference_threshold: float = 0.05  # R̄ above which samples moving Φ further from T stop pushing
    reference_clip: Literal["batch", "sample"] = "batch"  # R̄ of the micro-batch (official) or of each sample
    reference_weight: float = 1e-3  # β_reg on R̄ in the surrogate loss
    surrogate_sigma_min: float = 0.30  # σ floor of the surrogate's τ (OCR 0.30, others 0.55)
    generator_sigma_min: float = 0.30  # σ floor of the generator's τ' (OCR 0.30, GenEval 0.25, IR/HPS 0.40)
    reward_steps: int | None = None  # steps j < this get the surrogate reward (IR/HPS: 2); None: every step
    surrogate_time_weight: bool = True  # the surrogate loss at stored state k+1 weighted (k+1)/K
    advantage_std: Literal["group", "global"] = "global"
    advantage_clip: float = 5.0

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.tdm_weight <= 1.0:
            raise ConfigError(f"algo.options.tdm_weight: must be in [0, 1], got {self.tdm_weight}")
        if self.reference_clip not in ("batch", "sample"):
            raise ConfigError(f"algo.options.reference_clip: {self.reference_clip!r} is not allowed; choose one of "
                              f"batch, sample")
        if self.advantage_std not in ("group", "global"):
            raise ConfigError(f"algo.options.advantage_std: {self.advantage_std!r} is not allowed; choose one of "
                              f"group, global")
        for name in ("surrogate_guidance", "beta_dpo", "clip_range", "advantage_clip"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"algo.options.{name}: must be a finite number > 0, got {value}")
        for name in ("reference_threshold", "reference_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"algo.options.{name}: must be a finite number >= 0, got {value}")
        for name in ("surrogate_sigma_min", "generator_sigma_min"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"algo.options.{name}: must be in [0, 1), got {getattr(self, name)}")
        if self.reward_steps is not None and self.reward_steps < 0:
            raise ConfigError(f"algo.options.reward_steps: must be >= 0 (or null: every step), got "
                              f"{self.reward_steps}")


def _lora(rank: int = 32, alpha: float = 64, **optimizer) -> dict:
    return dict(lora_rank=rank, lora_alpha=alpha, weight_decay=1e-4, grad_clip=1.0, **optimizer)


# ------------------------------------------------------------------------------------------- methods

@register_method
class TDM(Method):
    """Plain TDM distillation: the generator on its own deterministic trajectory, the marginal KL to the teacher
    with CFG w_T, a fake-score critic (the module docstring, λ = 1 without the surrogate)."""

    name = "tdm"
    Options = TDMOptions
    uses_surrogate = False

    @classmethod
    def spec(cls, cfg: TrainConfig, options: TDMOptions) -> MethodSpec:
        if cfg.generator.steps < options.steps_per_rollout:
            raise ConfigError(f"algo.options.steps_per_rollout: at most generator.steps ({cfg.generator.steps}), got "
                              f"{options.steps_per_rollout}")
        # Official optimisers (TDM_R1.md §4e): G 7.5e-5 and F 3e-4, both Adam β1 = 0; wd 1e-4; clip 1.
        roles = {"teacher": RoleSpec(init="teacher"),
                 "generator": RoleSpec(init="student", trainable=True, **_lora(lr=7.5e-5, betas=[0.0, 0.999])),
                 "critic": RoleSpec(init="teacher", trainable=True, **_lora(lr=3e-4, betas=[0.0, 0.999]))}
        return MethodSpec(roles=roles, rollout=lambda step: RolloutSpec(sampler=Deterministic()),
                          **cls.reward_spec(options))

    @classmethod
    def reward_spec(cls, options) -> dict:
        # Distillation only: configured rewards are scored and logged; rollouts may lag one update, as DMD2's.
        return {"rewards": "none", "max_staleness": 1}

    def __init__(self, roles: Roles, options: TDMOptions, cfg: TrainConfig, reward=None):
        super().__init__(roles, options, cfg, reward)
        self.resolution = cfg.model.resolution or roles.adapter.default_resolution
        self.real_guidance = cfg.teacher.guidance if options.real_guidance is None else options.real_guidance
        self.group_size = cfg.train.group_size
        self.fractions: dict[float, float] = {}  # σ -> its fraction of the time axis (τ's lower ends)

    def tau(self, low_sigma: float, rng: torch.Generator) -> float:
        """τ > low_sigma (`draw_tau`), one draw from `rng`; the bisection of each level is done once."""
        if low_sigma not in self.fractions:
            self.fractions[low_sigma] = sigma_to_fraction(self.roles.adapter, low_sigma, self.resolution)
        start, end = tau_fraction_range(self.fractions[low_sigma], self.options.tau_margin)
        u = start + (end - start) * float(torch.rand((), generator=rng, device=rng.device, dtype=torch.float64))
        fraction = torch.tensor([u], dtype=torch.float64)
        return float(fraction_to_sigma(self.roles.adapter, fraction, resolution=self.resolution)[0])

    def group_noise(self, shape, group_ids: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        """One standard normal per group (DGPO's shared training noise), repeated over its samples."""
        _, index = torch.unique(group_ids, return_inverse=True)
        return standard_normal((int(index.max()) + 1, *shape[1:]), rng)[index.to(rng.device)]

    # ------------------------------------------------------------------------------------ one iteration
    def train_step(self, batch: Batch) -> StepResult:
        options, trajectory, cond = self.options, batch.trajectory, batch.cond
        sigmas, size, steps = trajectory.sigmas, len(batch), len(trajectory.sigmas) - 1
        parts = batch.micro_batches()
        if self.uses_surrogate:
            check_whole_groups(trajectory.group_ids, parts, self.group_size)
        train_generator = batch.step >= options.critic_warmup
        totals: dict[str, float] = {}
        auc_counts: dict[int, list[float]] = {}

        def add(terms: dict[str, float], weight: float):
            for key, value in terms.items():
                totals[key] = totals.get(key, 0.0) + weight * value

        for part in parts:
            part_cond = cond.index(part)
            uncond = self.roles.adapter.unconditional(part.stop - part.start)
            chosen = torch.randperm(steps, generator=batch.shared_rng, device=batch.shared_rng.device)
            for j in chosen[: options.steps_per_rollout].tolist():
                share = (part.stop - part.start) / size / options.steps_per_rollout
                sigma, sigma_next = float(sigmas[j]), float(sigmas[j + 1])
                x_j = trajectory.states[part, j]
                with torch.set_grad_enabled(train_generator):  # the only G call, with grad when G trains
                    prediction = self.roles["generator"].predict(x_j, sigma, part_cond)
                x0 = prediction.x0
                x_next = Deterministic().mean(prediction, x_j, sigma, sigma_next).detach()
                tau = self.tau(sigma_next, batch.shared_rng)
                x_tau, _, _ = bridge(x_next, sigma_next, tau, standard_normal(x_next.shape, batch.rng).to(x_next))

                critic_loss, critic_terms, fake_x0, teacher_x0 = self.critic_loss(x0.detach(), x_tau, tau, part_cond,
                                                                                   uncond)
                backward(critic_loss * share, self.optimizers["critic"])
                add(critic_terms, share)

                if self.uses_surrogate:
                    surrogate_loss, surrogate_terms, auc = self.surrogate_loss(batch, part, part_cond)
                    backward(surrogate_loss * share, self.optimizers["surrogate"])
                    add(surrogate_terms, share)
                    counts = auc_counts.setdefault(auc[0], [0.0, 0.0])
                    counts[0], counts[1] = counts[0] + auc[1], counts[1] + auc[2]

                if train_generator:
                    generator_loss, generator_terms = self.generator_loss(
                        j, x0, x_next, sigma_next, fake_x0, teacher_x0, part_cond, uncond, trajectory.group_ids[part],
                        batch)
                    backward(generator_loss * share, self.optimizers["generator"])
                    add(generator_terms, share)

        metrics = dict(totals)
        skipped = False
        stepped = ["critic", "surrogate"] if self.uses_surrogate else ["critic"]
        metrics["updated/generator"] = 0.0
        for name in stepped + ["generator"] if train_generator else stepped:
            metrics[f"grad_norm/{name}"], applied = self.optimizers[name].step()
            metrics[f"updated/{name}"] = float(applied)
            skipped = skipped or not applied
        for k, (agree, pairs) in sorted(auc_counts.items()):
            if pairs:
                metrics[f"surrogate/auc_step{k}"] = agree / pairs
        pairs = sum(counts[1] for counts in auc_counts.values())
        if pairs:
            metrics["surrogate/auc"] = sum(counts[0] for counts in auc_counts.values()) / pairs
        return StepResult(metrics, skipped=skipped)

    def critic_loss(self, x0: torch.Tensor, x_tau: torch.Tensor, tau: float, cond: Conditioning, uncond: Conditioning
                    ) -> tuple[torch.Tensor, dict[str, float], torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """L_F = mse(v_F, (x_τ − x̂0)/τ) + w·mse(v_F, sg v_T) at x_τ. Returns (L_F, metrics, sg x̂0_F, the teacher's
        (c, u) x̂0 at x_τ for the generator's terms)."""
        with torch.no_grad():
            teacher_c, teacher_u = conditional_and_unconditional(self.roles["teacher"], x_tau, tau, cond, uncond)
            teacher_velocity = (x_tau - teacher_c) / tau
        fake = self.roles["critic"].predict(x_tau, tau, cond)
        denoising = ((fake.velocity - (x_tau - x0) / tau) ** 2).mean()
        reference = ((fake.velocity - teacher_velocity) ** 2).mean()
        loss = denoising + self.options.critic_reference_weight * reference
        return loss, {"loss/critic": float(loss.detach()), "loss/critic_denoising": float(denoising.detach()),
                      "critic/teacher_gap": float(reference.detach())}, fake.x0.detach(), (teacher_c, teacher_u)

    def generator_loss(self, j: int, x0: torch.Tensor, x_next: torch.Tensor, sigma_next: float, fake_x0: torch.Tensor,
                       teacher: tuple[torch.Tensor, torch.Tensor], cond: Conditioning, uncond: Conditioning,
                       group_ids: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """ℓ(Δ_KL, n_T) + ℓ(Δ_CFG, n_T): the marginal KL to the teacher with CFG w_T (plain TDM, λ = 1)."""
        kl, cfg = self.tdm_terms(x0, fake_x0, teacher)
        return kl + cfg, {"loss/generator_kl": float(kl.detach()), "loss/generator_cfg": float(cfg.detach())}

    def tdm_terms(self, x0: torch.Tensor, fake_x0: torch.Tensor, teacher: tuple[torch.Tensor, torch.Tensor]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """(ℓ(Δ_KL, n_T), ℓ(Δ_CFG, n_T)) with Δ_KL = c − F, Δ_CFG = (w_T − 1)(c − u), n_T = mean|x̂0 − CFG_w_T(c, u)|."""
        teacher_c, teacher_u = teacher
        w = self.real_guidance
        normaliser = mean_abs(x0.detach() - (teacher_u + w * (teacher_c - teacher_u)))
        return (score_matching_term(x0, teacher_c - fake_x0, normaliser),
                score_matching_term(x0, (w - 1) * (teacher_c - teacher_u), normaliser))


def check_whole_groups(group_ids: torch.Tensor, parts: list[slice], group_size: int) -> None:
    """Every micro-batch holds whole groups of `group_size` (DGPO's group score sums a whole group)."""
    for part in parts:
        _, counts = torch.unique(group_ids[part].cpu(), return_counts=True)
        if bool((counts != group_size).any()):
            raise UsageError(f"a micro-batch holds groups of sizes {sorted(set(counts.tolist()))}, not whole groups "
                             f"of train.group_size={group_size}")


@register_method
class TDMR1(TDM):
    """TDM-R1: plain TDM plus the surrogate reward Φ trained by DGPO on the rollout's stored states."""

    name = "tdm_r1"
    Options = TDMR1Options
    uses_surrogate = True

    @classmethod
    def spec(cls, cfg: TrainConfig, options: TDMR1Options) -> MethodSpec:
        spec = super().spec(cfg, options)
        spec.roles["surrogate"] = RoleSpec(init="teacher", trainable=True, **_lora(lr=3e-4, betas=[0.9, 0.999]))
        spec.roles["surrogate_old"] = RoleSpec(ema_of="surrogate")  # its lag: surrogate_old_decay
        return spec

    @classmethod
    def reward_spec(cls, options: TDMR1Options) -> dict:
        return {"rewards": "workers", "max_staleness": 0,
                "advantages": AdvantageSpec(std=options.advantage_std, clip=options.advantage_clip)}

    @classmethod
    def check_roles(cls, roles: dict[str, RoleSpec], options: TDMR1Options) -> None:
        if roles["surrogate_old"].ema_of != "surrogate":
            raise ConfigError("roles.surrogate_old.ema_of: the trust region's lagged copy follows the surrogate")
        if roles["surrogate_old"].ema_decay != RoleSpec.ema_decay:
            raise ConfigError("roles.surrogate_old.ema_decay: the lag of Φ_old follows the official schedule "
                              "min(0.3, 0.001 + 0.001·n); it is not a setting")

    def __init__(self, roles: Roles, options: TDMR1Options, cfg: TrainConfig, reward=None):
        super().__init__(roles, options, cfg, reward)
        surrogate = self.optimizers["surrogate"]
        surrogate.after_step = [callback for callback in surrogate.after_step if callback.args != ("surrogate_old",)]
        surrogate.after_step.append(
            lambda: roles.update_ema("surrogate_old", decay=surrogate_old_decay(surrogate.steps)))

    def surrogate_loss(self, batch: Batch, part: slice, cond: Conditioning
                       ) -> tuple[torch.Tensor, dict[str, float], tuple[int, float, float]]:
        """DGPO on a stored state x_{k+1} re-noised into its segment (the module docstring). Returns (L_Φ, metrics,
        (k, pairs ranked like the reward, pairs))."""
        options, trajectory = self.options, batch.trajectory
        steps = len(trajectory.sigmas) - 1
        k = draw_surrogate_step(steps, batch.shared_rng)
        sigma_n = float(trajectory.sigmas[k + 1])
        x_n = trajectory.states[part, k + 1]
        group_ids = trajectory.group_ids[part]
        advantages = trajectory.advantages[part].float()
        tau = self.tau(max(sigma_n, options.surrogate_sigma_min), batch.shared_rng)
        noise = self.group_noise(x_n.shape, group_ids, batch.rng).to(x_n)
        x_tau, a, b = bridge(x_n, sigma_n, tau, noise)
        target = anchor_target(x_n, sigma_n, tau, noise, a, b)
        surrogate_velocity = self.roles["surrogate"].predict(x_tau, tau, cond).velocity
        with torch.no_grad():
            old_velocity = self.roles["surrogate_old"].predict(x_tau, tau, cond).velocity
            teacher_velocity = self.roles["teacher"].predict(x_tau, tau, cond).velocity
        d = ((target - surrogate_velocity) ** 2).flatten(1).mean(1)
        d_old = ((target - old_velocity) ** 2).flatten(1).mean(1)
        d_ref = ((target - teacher_velocity) ** 2).flatten(1).mean(1)
        gaps = ((surrogate_velocity - teacher_velocity) ** 2).flatten(1).mean(1)
        reference_gap = gaps.mean()
        ratio_clip, reference_clip = trust_region_clips(
            advantages, d.detach(), d_old, d_ref, reference_gap if options.reference_clip == "batch" else gaps,
            options.clip_range, options.reference_threshold)
        dgpo, weights = dgpo_loss(d, d_ref, advantages, group_ids, options.beta_dpo, self.group_size,
                                  clipped=ratio_clip | reference_clip)
        time_weight = (k + 1) / steps if options.surrogate_time_weight else 1.0
        loss = time_weight * (dgpo + options.reference_weight * reference_gap)
        agree, pairs = within_group_auc(-(d - d_ref).detach(), trajectory.rewards[part].double(), group_ids)
        return loss, {"loss/surrogate_dgpo": float(dgpo.detach()),
                      "surrogate/reference_gap": float(reference_gap.detach()),
                      "surrogate/clip_ratio_fraction": float(ratio_clip.float().mean()),
                      "surrogate/clip_reference_fraction": float(reference_clip.float().mean()),
                      "surrogate/group_weight_mean": float(weights.mean())}, (k, agree, pairs)

    def generator_loss(self, j, x0, x_next, sigma_next, fake_x0, teacher, cond, uncond, group_ids, batch):
        """L_G with the surrogate reward: ℓ(Δ_KL) + λ·ℓ(Δ_CFG) + (1 − λ)·ℓ(Δ_R) on rewarded steps, λ·(ℓ_KL + ℓ_CFG)
        on the others."""
        options, lam = self.options, self.options.tdm_weight
        kl, cfg = self.tdm_terms(x0, fake_x0, teacher)
        rewarded = options.reward_steps is None or j < options.reward_steps
        if not rewarded:
            return lam * (kl + cfg), {"loss/generator_kl": lam * float(kl.detach()),
                                      "loss/generator_cfg": lam * float(cfg.detach()), "loss/generator_reward": 0.0}
        tau = self.tau(max(sigma_next, options.generator_sigma_min), batch.shared_rng)
        x_tau, _, _ = bridge(x_next, sigma_next, tau, self.group_noise(x_next.shape, group_ids, batch.rng).to(x_next))
        with torch.no_grad():
            surrogate_c, surrogate_u = conditional_and_unconditional(self.roles["surrogate"], x_tau, tau, cond, uncond)
            surrogate_x0 = surrogate_u + options.surrogate_guidance * (surrogate_c - surrogate_u)
            reference_x0 = self.roles["teacher"].predict(x_tau, tau, cond).x0
        reward = score_matching_term(x0, surrogate_x0 - reference_x0, mean_abs(x0.detach() - surrogate_x0))
        loss = kl + lam * cfg + (1 - lam) * reward
        return loss, {"loss/generator_kl": float(kl.detach()), "loss/generator_cfg": lam * float(cfg.detach()),
                      "loss/generator_reward": (1 - lam) * float(reward.detach())}
