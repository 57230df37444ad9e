"""Per-component LoRA policies and the named strategies built from them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Mode = Literal["lora", "full", "frozen"]
Variant = Literal["lora", "dora", "lora_fa", "vera", "dylora", "adalora"]
Init = Literal["kaiming", "gaussian", "pissa", "olora", "loftq"]


class AdaLoraOptions(BaseModel):
    """AdaLoRA's budget (variant: adalora; the component's rank is init_r). Steps are optimizer steps."""

    model_config = ConfigDict(extra="forbid")

    target_r: int = Field(default=4, gt=0, description="average rank per module at the end")
    tinit: int = Field(default=0, ge=0, description="steps at the initial budget")
    tfinal: int = Field(default=0, ge=0, description="last steps at the final budget")
    delta_t: int = Field(default=1, ge=1, description="steps between budget allocations")
    beta1: float = Field(default=0.85, gt=0, lt=1)
    beta2: float = Field(default=0.85, gt=0, lt=1)
    orth_reg_weight: float = Field(default=0.5, ge=0)


class ComponentPolicy(BaseModel):
    """How one component is trained. ``None`` fields mean "inherit" when used as an override."""

    model_config = ConfigDict(extra="forbid")

    mode: Mode | None = None
    rank: int | None = Field(default=None, gt=0, description="LoRA rank r")
    alpha: float | None = Field(default=None, gt=0, description="LoRA alpha; scaling is alpha / r")
    targets: list[str] | None = Field(default=None, description="short target names, e.g. [q, v]")
    dropout: float | None = Field(default=None, ge=0.0, lt=1.0)
    lr: float | None = Field(default=None, gt=0, description="learning rate; default: train.learning_rate")
    variant: Variant | None = Field(default=None, description="lora | dora | lora_fa | vera | dylora | adalora")
    rslora: bool | None = Field(default=None, description="scaling alpha/sqrt(r) instead of alpha/r")
    init: Init | None = Field(default=None, description="adapter initialisation")
    adalora: AdaLoraOptions | None = Field(default=None, description="variant adalora: the budget schedule")
    layer_replication: list[tuple[int, int]] | None = Field(
        default=None, description="language_decoder only: rebuild the layer list from [start, end) ranges, "
                                  "e.g. [[0, 4], [2, 5]]; copies share base weights, each gets its own LoRA")

    def merged_with(self, override: "ComponentPolicy | None") -> "ComponentPolicy":
        """This policy with every field the override sets replaced."""
        if override is None:
            return self
        data = self.model_dump()
        data.update(override.model_dump(exclude_none=True))
        if override.rank is not None and override.alpha is None:
            data["alpha"] = 2.0 * override.rank  # keep alpha = 2r unless told otherwise
        return ComponentPolicy(**data)


def lora(rank: int, targets: list[str]) -> ComponentPolicy:
    return ComponentPolicy(mode="lora", rank=rank, alpha=2.0 * rank, targets=targets, dropout=0.0,
                           variant="lora", rslora=False, init="kaiming")


FULL = ComponentPolicy(mode="full")
FROZEN = ComponentPolicy(mode="frozen")
LM_TARGETS = ["q", "k", "v", "o", "gate", "up", "down"]

# Literature defaults (LoRA, QLoRA, LLaVA): vision r=32 on q, v; cross-attention r=16 on q, k, v;
# language decoder r=16 on attention and MLP; connector fully trained; alpha = 2r.
DEFAULT_POLICY: dict[str, ComponentPolicy] = {
    "vision_encoder": lora(32, ["q", "v"]),
    "cross_attention": lora(16, ["q", "k", "v"]),
    "qformer": lora(16, ["q", "k", "v"]),
    "connector": FULL,
    "language_decoder": lora(16, LM_TARGETS),
    "lm_head": FROZEN,
}


class Strategy(BaseModel):
    description: str
    modes: dict[str, ComponentPolicy]  # components not named here are frozen


STRATEGIES: dict[str, Strategy] = {
    "language_only": Strategy(
        description="LoRA r=16 on the language decoder (attention + MLP), connector trained, vision frozen.",
        modes={"language_decoder": DEFAULT_POLICY["language_decoder"], "connector": FULL}),
    "vision_only": Strategy(
        description="LoRA r=32 on the vision encoder's q, v; connector trained; language decoder frozen.",
        modes={"vision_encoder": DEFAULT_POLICY["vision_encoder"], "connector": FULL}),
    "both": Strategy(
        description="Vision q, v LoRA r=32 and language LoRA r=16, connector trained.",
        modes={"vision_encoder": DEFAULT_POLICY["vision_encoder"],
               "language_decoder": DEFAULT_POLICY["language_decoder"], "connector": FULL}),
    "cross_attention": Strategy(
        description="LoRA r=16 on the cross-attention (BLIP-2 Q-Former, Mllama cross_attn layers), connector trained.",
        modes={"cross_attention": DEFAULT_POLICY["cross_attention"], "connector": FULL}),
    "mm_lora": Strategy(
        description="Separate branches: vision q, v LoRA r=64, language LoRA r=8, connector trained.",
        modes={"vision_encoder": lora(64, ["q", "v"]), "language_decoder": lora(8, LM_TARGETS), "connector": FULL}),
    "connector_only": Strategy(
        description="Only the connector (projector) is trained; everything else frozen.",
        modes={"connector": FULL}),
}


def strategies() -> dict[str, str]:
    """Strategy name -> one-line description."""
    return {name: s.description for name, s in STRATEGIES.items()}
