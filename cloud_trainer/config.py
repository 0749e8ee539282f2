"""The experiment configuration: one validated object, errors that name the field and the value."""

from __future__ import annotations

import json
from dataclasses import asdict, field
from pathlib import Path
from typing import Annotated, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field
from pydantic.dataclasses import dataclass as validated_dataclass

from cloud_trainer.models.metapatch import MetaPatchConfig
from cloud_trainer.momodistill import MoMoDistillConfig
from cloud_trainer.patch_generator import MetaTrainConfig
from cloud_trainer.personalize import DeviceTrainConfig
from dccl.errors import DcclError

FORBID = ConfigDict(extra="forbid")
for _cls in (MetaPatchConfig, MoMoDistillConfig, MetaTrainConfig, DeviceTrainConfig):
    _cls.__pydantic_config__ = FORBID  # unknown keys in a section are errors, not silently ignored

DATASETS = ("synthetic", "ml-100k", "ml-1m", "amazon")
STRATEGIES = ("stale", "model-over-data", "full-patch", "metapatch", "dccl", "fedavg-patches")


@validated_dataclass(config=FORBID)
class DataConfig:
    neg: int = Field(default=4, ge=0, le=100)  # sampled training negatives per positive
    max_len: int = Field(default=20, ge=1, le=200)
    fresh_frac: float = Field(default=0.2, gt=0, lt=1)
    future_frac: float = Field(default=0.15, gt=0, lt=1)
    val_frac: float = Field(default=0.3, ge=0, lt=1)
    cold_frac: float = Field(default=0.1, ge=0, lt=1)
    eval_negatives: int = Field(default=100, ge=1)
    synthetic_users: int = Field(default=600, ge=10)
    synthetic_items: int = Field(default=800, ge=20)


@validated_dataclass(config=FORBID)
class StartConfig:
    """What a device starts from on a bundle (shipped inside encoder.onnx; see
    ``PatchEncoder.start``). Chosen on validation slices when tuning."""
    # On a new MoMoDistill bundle:
    warm: Literal["encoder", "previous", "zero"] = "encoder"  # a device with a previous φ
    cold: Literal["encoder", "zero"] = "encoder"  # a device without one (cold start)
    # On the first bundle (`dccl cloud train`'s: the cloud model before any MoMoDistill, which no
    # device holds a φ for yet), chosen with the devices' step budget on it (`device.steps`):
    first: Literal["encoder", "zero"] = "encoder"


@validated_dataclass(config=FORBID)
class CloudConfig:
    emb_dim: int = Field(default=16, ge=2)
    mlp_hidden: tuple[int, ...] = (64, 32)
    attn_hidden: int = Field(default=32, ge=1)
    pretrain_epochs: int = Field(default=3, ge=1)
    update_epochs: int = Field(default=2, ge=1)  # per round, for model-over-data and MoMoDistill step 1
    # How the fresh rows share the cloud update's label term (model-over-data's and MoMoDistill step 1's
    # alike, so the two still differ by the distillation alone): each row weighs
    # rows_of_its_device^(-update_balance), mean 1. 0: the pooled cross-entropy, where the most active
    # devices' fresh data dominates; 1: every device's fresh data counts the same. Chosen on round 0's
    # validation slices with `tune_update_balance`.
    update_balance: float = Field(default=0.0, ge=0, le=1)
    lr: float = Field(default=1e-3, gt=0)
    batch_size: int = Field(default=512, ge=1)


class ExperimentConfig(BaseModel):
    model_config = FORBID
    dataset: Literal["synthetic", "ml-100k", "ml-1m", "amazon"] = "synthetic"
    data_path: str | None = None
    rounds: int = Field(default=2, ge=1, le=20)
    seeds: int = Field(default=3, ge=1, le=20)
    strategies: list[Literal["stale", "model-over-data", "full-patch", "metapatch", "dccl", "fedavg-patches"]] = \
        Field(default_factory=lambda: list(STRATEGIES))
    tune: bool = True  # choose the device step budget on the validation slices (seed 0, round 0)
    tune_steps: list[int] = Field(default_factory=lambda: [0, 2, 3, 5, 8, 12, 20])
    # Every seed makes the round-0 choices on its own validation slices (each seed a whole replicate of
    # a deployment, so the per-seed differences include how its choices fall), instead of every seed
    # running with seed 0's. Off: it costs each later seed a round-0 tuning; on ML-100K seeds 1 and 2
    # chose 0 steps on a new bundle where seed 0 chose 8, and cold start fell to +0.0005 [−0.0003,
    # +0.0012] (docs/EXPERIMENTS.md, session 18).
    tune_each_seed: bool = False
    # Also choose the device budget per bracket of the devices' training-positive counts (quintiles
    # among the devices with a validation slice), each bracket on its own devices' slices (one-SE rule,
    # `strategies.choose_steps_by_positives`), for MetaPatch's and the uploads' `device` and for
    # `full_patch_device`; shipped as the manifest's optimizer.steps_by_positives. Off by default
    # (docs/EXPERIMENTS.md, session 15, measured it).
    tune_steps_by_positives: bool = False
    # meta.episodes values tried on round 0's validation slices (seed 0): Θ and g meta-trained with
    # each, every device's φ trained on the fresh windows minus the slices from g's φ, the best step
    # budget of each scored on the slices (`experiment.tune_meta_episodes`; one-SE rule, the first
    # listed wins near-ties). Empty: keep meta.episodes as configured. On ML-100K validation keeps
    # "sampled" (0.86405 against 0.86417 at 2 device steps, a near-tie; docs/EXPERIMENTS.md, session 18).
    tune_meta_episodes: list[Literal["sampled", "device"]] = Field(default_factory=list)
    # metapatch.phi_dim values tried on round 0's validation slices (seed 0), after meta.episodes: Θ and
    # g of each size initialised as the seed would have and meta-trained on the same pretrained W_f,
    # each scored by its devices' best step budget (`experiment.tune_phi_dim`; one-SE rule, the first
    # listed wins near-ties). Empty (the default): keep metapatch.phi_dim. Session 19's probe
    # (bench/probe_patch_generator.py, seed 0): 16 against 64 is a tie on ML-100K (−0.00004 ± 0.00016)
    # and clearly better on Amazon Beauty (+0.00285 ± 0.00093; meta-training fits the query far better),
    # but the full Amazon run with 16 holds no claim row: the gain is the encoder's φ on the stale model,
    # and devices there start from zero (session 19: by the new-bundle policy; session 20, by the first
    # bundle's own choice, `start.first`, on a machine where the encoder's φ-16 lost: docs/EXPERIMENTS.md).
    tune_phi_dim: list[Annotated[int, Field(ge=1, le=4096)]] = Field(default_factory=list)
    # cloud.update_balance values tried on round 0's validation slices (seed 0): each replays
    # model-over-data's update on the fresh windows minus the slices (`experiment.tune_update_balance`;
    # one-SE rule, the first listed wins near-ties). Empty (the default): keep cloud.update_balance as
    # configured. Off: on ML-100K the slices score balance 1 far above the pooled loss (0.8749 against
    # 0.8644), but on the future window the balance suits some seeds and not others (round 1: +0.0075,
    # +0.0058, −0.0101 with seed 0's choice), it takes the place of MoMoDistill's gain rather than adding
    # to it, and DCCL ends 0.0054 gAUC below the pooled loss after two rounds, even with the balance
    # chosen anew in round 2 (docs/EXPERIMENTS.md, session 17).
    tune_update_balance: list[float] = Field(default_factory=list)
    # With tune_update_balance: model-over-data and DCCL choose their update balance anew in every round
    # r >= 1, each from its own cloud model on that round's validation slices (`strategies.round_update_balance`).
    update_balance_each_round: bool = True
    # MoMoDistill settings tried on the validation slices (λ, unlabelled candidates per positive per
    # epoch). Only settings within the step-1 cost bar (<= 1.5x a plain epoch): kd_extra 1 costs ~1.4x,
    # 2 ~1.65x (`python bench/bench_momodistill.py`).
    # λ = 0 (listed last: chosen only when clearly better) lets validation switch distillation off
    # where the device models are worse teachers than the labels (Amazon Beauty: bench/probe_teachers.py).
    # kd_balance 1 (every device model weighing the same in the distillation term) is a candidate again
    # now that later rounds choose anew (momodistill_each_round): on ML-100K validation picks it in round
    # 0 and labels only (λ = 0) in round 1, and MoMoDistill − model-over-data is +0.0045 gAUC (EXPERIMENTS.md,
    # session 7). Chosen once for all rounds (session 6) it fell below model-over-data in round 2.
    tune_momodistill: list[dict[Literal["lam", "kd_extra", "kd_balance"], float]] = Field(default_factory=lambda: [
        {"lam": 1.0, "kd_extra": 0}, {"lam": 1.0, "kd_extra": 1}, {"lam": 1.0, "kd_extra": 1, "kd_balance": 1.0},
        {"lam": 3.0, "kd_extra": 1}, {"lam": 0.0, "kd_extra": 0}])
    # Choose MoMoDistill's setting (from tune_momodistill) anew in every round r >= 1, on that round's
    # validation slices, each seed on its own (`strategies.choose_momodistill`); round 0 keeps the choice
    # tuning made. A round-0 replay judges one round of distillation from the stale model; later rounds
    # distil into a model that has distilled before (on ML-100K round 1 then prefers labels only).
    momodistill_each_round: bool = True
    # With momodistill_each_round: near-ties keep the setting the previous round used (it goes first in
    # the one-SE rule), so a round changes it only on clear validation evidence. Off by default: on
    # ML-100K (session 9) it kept round 0's balanced distillation on one seed where the grid's order
    # picked unbalanced λ 1, and MoMoDistill − model-over-data fell from +0.0037 to +0.0026 gAUC.
    momodistill_keep_incumbent: bool = False
    # momodistill.step2_balance values tried on round 0's validation slices (seed 0) when DCCL runs:
    # each replays step 2 on the replayed step-1 model and scores the devices' starting φ from the
    # encoder (`experiment.tune_step2`; one-SE rule, the first listed wins near-ties).
    # Empty: keep momodistill.step2_balance as configured. On ML-100K validation chose 1 (0.87443
    # against 0.87412; docs/EXPERIMENTS.md, session 11).
    tune_step2_balance: list[float] = Field(default_factory=lambda: [0.0, 1.0])
    # momodistill.step2_target values tried on the same replays (with each balance; `experiment.tune_step2`)
    # and, with momodistill_each_round, anew in every later round on that round's slices
    # (`strategies.choose_step2_target`). "device" (the paper's: distil f_n itself) is listed first, so
    # "delta" (distil the device's shift on top of the new cloud model) must be clearly better.
    # Empty: keep momodistill.step2_target as configured.
    tune_step2_target: list[Literal["device", "delta"]] = Field(default_factory=lambda: ["device", "delta"])
    data: DataConfig = field(default_factory=DataConfig)
    cloud: CloudConfig = field(default_factory=CloudConfig)
    metapatch: MetaPatchConfig = field(default_factory=MetaPatchConfig)
    device: DeviceTrainConfig = field(default_factory=DeviceTrainConfig)
    # On-device steps on a bundle that MoMoDistill has just trained on the devices' fresh data (DCCL's
    # second device session of a round). None: device.steps. Tuning chooses it on the replayed round-0
    # bundle (`experiment.tune_bundle_steps`): a budget chosen on a model that has not seen the data
    # need not suit one that has.
    bundle_steps: int | None = Field(default=None, ge=0)
    # On-device steps of the upload session from round 1 on: devices on the MoMoDistill bundle they hold,
    # on fresh data it has not seen. None: device.steps (chosen on the stale model, which differs: it
    # never distilled from the devices). With tune_upload_steps, tuning chooses it on round 1's
    # validation slices after DCCL's round 0 (`experiment.tune_upload_steps`; needs rounds >= 2). Off by
    # default: the uploaded models are also step 1's teachers, and MoMoDistill's settings are chosen
    # with teachers trained device.steps. Measured once, on ML-100K together with kd_balance 1
    # (docs/EXPERIMENTS.md, session 6): validation chose 20 upload steps and the uploads beat the bundle they hold
    # by +0.0013 gAUC; its effect on MoMoDistill was not measured apart from kd_balance's.
    upload_steps: int | None = Field(default=None, ge=0)
    tune_upload_steps: bool = False
    full_patch_device: DeviceTrainConfig = field(default_factory=lambda: DeviceTrainConfig(lr=0.01))
    meta: MetaTrainConfig = field(default_factory=MetaTrainConfig)
    momodistill: MoMoDistillConfig = field(default_factory=MoMoDistillConfig)
    start: StartConfig = field(default_factory=StartConfig)

    @pydantic.field_validator("tune_momodistill")
    @classmethod
    def _momodistill_candidates(cls, grid: list[dict]) -> list[dict]:
        for i, cand in enumerate(grid):
            missing = [k for k in ("lam", "kd_extra") if k not in cand]
            if missing:
                raise ValueError(f"candidate {i} ({json.dumps(cand)}) has no {', '.join(missing)}")
            if cand["kd_extra"] != int(cand["kd_extra"]):
                raise ValueError(f"candidate {i}: kd_extra = {cand['kd_extra']:g} must be an integer")
            MoMoDistillConfig(**momodistill_setting(cand))
        return grid

    @pydantic.field_validator("tune_step2_balance", "tune_update_balance")
    @classmethod
    def _balances(cls, values: list[float]) -> list[float]:
        for i, v in enumerate(values):
            if not 0 <= v <= 1:
                raise ValueError(f"value {i} = {v:g} must be in [0, 1]")
        return values

    def bundle_device(self) -> DeviceTrainConfig:
        """The device training settings on a new MoMoDistill bundle: `device` with `bundle_steps`."""
        from dataclasses import replace

        if self.bundle_steps is None:
            return self.device
        return replace(self.device, steps=self.bundle_steps, steps_by_positives=None)

    def upload_device(self, r: int) -> DeviceTrainConfig:
        """The device training settings of round r's upload session: `device` on the stale model
        (round 0), `device` with `upload_steps` on a MoMoDistill bundle (later rounds)."""
        from dataclasses import replace

        if r == 0 or self.upload_steps is None:
            return self.device
        return replace(self.device, steps=self.upload_steps, steps_by_positives=None)

    def to_dict(self) -> dict:
        out = self.model_dump()
        for k, v in out.items():
            if hasattr(v, "__dataclass_fields__"):
                out[k] = asdict(v)
        return out


def momodistill_setting(cand: dict) -> dict:
    """One candidate of `tune_momodistill` as MoMoDistillConfig fields (kd_balance absent = 0)."""
    return {"lam": float(cand["lam"]), "kd_extra": int(cand["kd_extra"]),
            "kd_balance": float(cand.get("kd_balance", 0.0))}


def format_validation_error(exc: pydantic.ValidationError, data: dict) -> str:
    lines = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"])
        value = err.get("input")
        shown = json.dumps(value) if not isinstance(value, dict) else "{...}"
        lines.append(f"{path} = {shown}: {err['msg']}")
    return "; ".join(lines)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def build_config(overrides: dict, file: str | Path | None = None) -> ExperimentConfig:
    """A config from an optional JSON file, then command-line overrides (dotted keys allowed)."""
    data: dict = {}
    if file is not None:
        path = Path(file)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise DcclError(f"config file {path}: no such file") from None
        except json.JSONDecodeError as exc:
            raise DcclError(f"config file {path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
        if not isinstance(data, dict):
            raise DcclError(f"config file {path}: the top level must be a JSON object")
    for key, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise DcclError(f"invalid config: {key}: '{p}' is not a section")
        node[leaf] = value
    # A partial section keeps the experiment's defaults for the fields it does not name.
    data = _merge(ExperimentConfig().to_dict(), data)
    try:
        return ExperimentConfig.model_validate(data)
    except pydantic.ValidationError as exc:
        raise DcclError("invalid config: " + format_validation_error(exc, data)) from None
    except (ValueError, TypeError) as exc:
        raise DcclError(f"invalid config: {exc}") from None
