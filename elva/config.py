"""Run configuration for the trainer: dataclasses <-> YAML, dotted ``key=value`` overrides, the resolved config per run.

A run file has these sections (every key optional; defaults below)::

    run_dir: runs/tiny_stage2
    model_path: tiny                # "tiny" (the built-in random Qwen2-VL) or a local Qwen2-VL folder
    model: {lora_r: 8, lora_alpha: 16, lora_dropout: 0.0}     # elva.model.ModelConfig
    data:
      kind: mbeir                   # "nli" (stage 1) or "mbeir" (stages 2 and 3)
      queries: [${data_dir}/query/train/mbeir_multigrain_task0_train.jsonl]
      pool: ${data_dir}/cand_pool/global/mbeir_multigrain_train_cand_pool.jsonl
      instructions: ${data_dir}/instructions/query_instructions.tsv
      image_root: ${data_dir}
    train: {stage: 2, lr: 1.0e-4, batch_size: 960, epochs: 1, temperature: 0.05}
    rl: {group_size: 8, beta: 0.2, clip: 0.2, reward: {alpha: 0.4, eps: 0.6}}   # stage 3 only (RlConfig)

``${name}`` in any string is replaced from ``variables`` (the CLI passes ``data_dir``); a placeholder left unresolved is
reported when the run starts. Overrides are ``"train.lr=3e-4"``, ``"model.lora_r=16"``, ``"data.queries=[a,b]"``; values
are parsed as YAML and converted to the field's type. Unknown keys raise ValueError naming the key.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from elva.model import ModelConfig

__all__ = ["DataConfig", "TrainConfig", "RewardConfig", "RlConfig", "RunConfig", "load_config", "config_from_dict", "save_config", "config_to_dict"]

_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass
class DataConfig:
    """Training pairs.

    > kind "nli" (stage 1): ``nli_pairs``, a .tsv/.csv/.jsonl with sent0 (anchor) and sent1 (positive).

    > kind "mbeir" (stages 2-3): ``queries`` (one or more M-BEIR query jsonl files), ``pool`` (the candidate pool jsonl
    holding every positive), ``instructions`` (the instruction tsv) and ``image_root`` (image paths are relative to it).
    Stage 3 also reads ``negatives`` and ``query_fraction``. Stage 2 with ``model.extraction: generative`` (the
    generative cold start) reads ``captions``: the summaries it teaches for image inputs.
    """

    kind: str = field(default="mbeir", metadata={"help": "nli (stage 1) or mbeir (stages 2-3)"})
    nli_pairs: str | None = field(default=None, metadata={"help": "NLI pairs file (kind nli)"})
    queries: list[str] = field(default_factory=list, metadata={"help": "M-BEIR query jsonl files (kind mbeir)"})
    pool: str | None = field(default=None, metadata={"help": "M-BEIR candidate pool jsonl (kind mbeir)"})
    instructions: str | None = field(default=None, metadata={"help": "instruction tsv (kind mbeir)"})
    image_root: str | None = field(default=None, metadata={"help": "image root folder (kind mbeir)"})
    negatives: str | None = field(default=None, metadata={
        "help": "stage 3: negatives jsonl from `elva mine`; null = mine with the starting model into run_dir"})
    query_fraction: float = field(default=1.0, metadata={
        "help": "stage 3: fraction of each query file used (the paper: 0.01), drawn with train.seed"})
    captions: str | None = field(default=None, metadata={
        "help": "generative cold start: {img_path, txt} jsonl giving each training image's summary"})

    def __post_init__(self):
        if not 0 < self.query_fraction <= 1:
            raise ValueError(f"data.query_fraction must be in (0, 1]; got {self.query_fraction}")
        if self.kind not in ("nli", "mbeir"):
            raise ValueError(f"data.kind must be 'nli' or 'mbeir'; got {self.kind!r}")
        if isinstance(self.queries, str):
            self.queries = [self.queries]
        self.queries = [str(q) for q in self.queries]


@dataclass
class TrainConfig:
    """Optimisation, schedule and bookkeeping.

    > Batch: ``batch_size`` is the GLOBAL batch of one optimizer step (all ranks, all accumulation micro-steps). Each
    micro-step uses ``batch_size / grad_accum`` pairs split evenly over the ranks; in-batch negatives are that
    micro-batch, gathered across ranks.

    > Length: ``max_steps`` optimizer steps when set, else ``epochs`` passes over the data (last partial batch dropped).
    Learning rate: linear warmup for ``warmup_steps``, then cosine decay to 0 at the last step.

    > Checkpoints: every ``save_every`` steps and at the end, the last ``keep_last`` kept. ``resume`` continues from the
    latest checkpoint in ``run_dir`` exactly (same data order, RNG and optimizer state).
    """

    stage: int = field(default=2, metadata={"help": "1 (NLI text pre-training), 2 (M-BEIR instruction tuning) or 3 "
                                                    "(GRPO, options in the rl section)"})
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate (AdamW)"})
    batch_size: int = field(default=32, metadata={"help": "global pairs (stage 3: queries) per optimizer step"})
    grad_accum: int = field(default=1, metadata={"help": "micro-steps per optimizer step"})
    max_steps: int | None = field(default=None, metadata={"help": "optimizer steps; None = use epochs"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the data when max_steps is None"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warmup steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    temperature: float = field(default=0.05, metadata={"help": "InfoNCE tau"})
    summary_weight: float = field(default=1.0, metadata={
        "help": "generative cold start: weight of the summaries' next-token loss beside InfoNCE at [RET]"})
    seed: int = field(default=0, metadata={"help": "model init, data order and RNG seed"})
    bf16: bool = field(default=True, metadata={"help": "bf16 autocast (CUDA only; ignored on CPU)"})
    log_every: int = field(default=10, metadata={"help": "steps between log rows"})
    save_every: int = field(default=500, metadata={"help": "steps between checkpoints"})
    keep_last: int = field(default=2, metadata={"help": "checkpoints kept"})
    init_from: str | None = field(default=None, metadata={"help": "model folder to start from (e.g. stage 1's model)"})
    merge_lora_at_end: bool = field(default=True, metadata={"help": "fold LoRA into the weights of run_dir/model"})
    resume: bool = field(default=False, metadata={"help": "continue from the latest checkpoint in run_dir"})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "gradient clipping; None = off"})

    def __post_init__(self):
        if self.stage not in (1, 2, 3):
            raise ValueError(f"train.stage must be 1, 2 or 3; got {self.stage}")
        for name in ("batch_size", "grad_accum", "log_every", "save_every", "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1; got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"train.batch_size ({self.batch_size}) must be a multiple of train.grad_accum "
                             f"({self.grad_accum}): each micro-step takes batch_size / grad_accum pairs; change one")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"train.max_steps must be >= 1 or null; got {self.max_steps}")
        if self.max_steps is None and self.epochs <= 0:
            raise ValueError(f"train.epochs must be > 0 when max_steps is null; got {self.epochs}")
        if self.lr <= 0 or self.temperature <= 0:
            raise ValueError(f"train.lr and train.temperature must be > 0; got lr={self.lr}, "
                             f"temperature={self.temperature}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.summary_weight < 0:
            raise ValueError(f"train.warmup_steps, train.weight_decay and train.summary_weight must be >= 0; got "
                             f"{self.warmup_steps}, {self.weight_decay}, {self.summary_weight}")


@dataclass
class RewardConfig:
    """ELVA's reward (SPEC A3): R_total = alpha * R_Margin + eps * R_Rank."""

    delta: float = field(default=0.05, metadata={"help": "margin required over the hardest negative"})
    gamma: float = field(default=0.01, metadata={"help": "weight of the negatives' rank penalty"})
    alpha: float = field(default=0.4, metadata={"help": "weight of R_Margin"})
    eps: float = field(default=0.6, metadata={"help": "weight of R_Rank"})
    log_base: str = field(default="e", metadata={"help": "'e' or '2' (the paper leaves it open)"})
    adv_eps: float = field(default=1e-4, metadata={"help": "added to the group std of the advantages"})

    def __post_init__(self):
        if self.log_base not in ("e", "2"):
            raise ValueError(f"rl.reward.log_base must be 'e' or '2'; got {self.log_base!r}")


@dataclass
class RlConfig:
    """Stage 3 (GRPO with ELVA's rule-based ranking rewards); see :mod:`elva.train.grpo`.

    > Rollouts: ``group_size`` generative embeddings of each query (sampled at ``temperature``/``top_p``, at most
    ``max_new_tokens`` summary tokens). ``rollout_candidates``: "query" encodes the candidates once per step greedily
    and shares them across the group; "all" samples every candidate in every rollout (the paper's reading), whose
    summaries then share the rollout's advantage.

    > Negatives per query: ``n_hard`` hardest non-positives scoring at most ``max_score`` (the near-duplicate filter)
    plus ``n_random`` uniform ones, mined once with the starting model (stage 2's, or the cold start's).

    > Loss: token-level clipped ratio (``clip``) against the rollout-time log-probs, ``num_iterations`` updates per
    batch of rollouts, k3 KL to the reference (the model with its adapters disabled) weighted by ``beta``,
    aggregated per ``sequence`` or per ``token``; ``aux_weight`` adds -weight * mean differentiable R_total.
    """

    group_size: int = field(default=8, metadata={"help": "rollouts per query (G)"})
    rollout_candidates: str = field(default="query", metadata={"help": "query or all"})
    n_hard: int = field(default=50, metadata={"help": "hard negatives per query"})
    n_random: int = field(default=50, metadata={"help": "random negatives per query"})
    max_score: float | None = field(default=None, metadata={"help": "near-duplicate cosine threshold for hard ones"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling"})
    max_new_tokens: int = field(default=32, metadata={"help": "summary tokens before [RET] is forced"})
    clip: float = field(default=0.2, metadata={"help": "PPO clip range"})
    num_iterations: int = field(default=1, metadata={"help": "updates per batch of rollouts (mu)"})
    beta: float = field(default=0.2, metadata={"help": "KL weight"})
    loss_aggregation: str = field(default="sequence", metadata={"help": "sequence or token"})
    aux_weight: float = field(default=0.0, metadata={"help": "weight of the differentiable-reward term"})
    eval_max_new_tokens: int = field(default=32, metadata={"help": "greedy summary length for evaluation"})
    log_rollouts: int = field(default=4, metadata={"help": "sample rollouts written to rollouts.jsonl per log row"})
    reward: RewardConfig = field(default_factory=RewardConfig)

    def __post_init__(self):
        if self.rollout_candidates not in ("query", "all"):
            raise ValueError(f"rl.rollout_candidates must be 'query' or 'all'; got {self.rollout_candidates!r}")
        if self.loss_aggregation not in ("sequence", "token"):
            raise ValueError(f"rl.loss_aggregation must be 'sequence' or 'token'; got {self.loss_aggregation!r}")
        for name in ("group_size", "max_new_tokens", "num_iterations", "eval_max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"rl.{name} must be >= 1; got {getattr(self, name)}")
        if self.n_hard < 0 or self.n_random < 0 or self.n_hard + self.n_random < 1:
            raise ValueError(f"rl.n_hard and rl.n_random must be >= 0 with at least one negative; got "
                             f"{self.n_hard} and {self.n_random}")
        if not (self.temperature > 0 and 0 < self.top_p <= 1 and self.clip > 0 and self.beta >= 0):
            raise ValueError(f"rl needs temperature > 0, 0 < top_p <= 1, clip > 0 and beta >= 0; got temperature="
                             f"{self.temperature}, top_p={self.top_p}, clip={self.clip}, beta={self.beta}")


@dataclass
class RunConfig:
    """One training run: where it writes, which model, which data, how it trains."""

    run_dir: str = field(default="runs/default", metadata={"help": "output folder"})
    model_path: str = field(default="tiny", metadata={"help": "'tiny' or a local Qwen2-VL folder"})
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rl: RlConfig = field(default_factory=RlConfig)

    def __post_init__(self):
        if self.data.kind == "nli" and self.train.stage != 1:
            raise ValueError(f"data.kind 'nli' is stage 1 data but train.stage is {self.train.stage}; "
                             "set train.stage=1 or data.kind=mbeir")
        if self.data.kind == "mbeir" and self.train.stage == 1:
            raise ValueError("data.kind 'mbeir' is stage 2-3 data but train.stage is 1; set train.stage=2 or "
                             "data.kind=nli")
        if self.train.stage == 1 and self.model.extraction == "generative":
            raise ValueError("model.extraction 'generative' trains the generative cold start on M-BEIR pairs "
                             "(train.stage 2 with data.captions); stage 1 trains the <emb> extraction")
        if self.train.stage == 2 and self.model.extraction == "generative" and not self.data.captions:
            raise ValueError("model.extraction 'generative' at train.stage 2 (the generative cold start) needs "
                             "data.captions, the {img_path, txt} jsonl of image summaries; got null")


# ---- conversion ----------------------------------------------------------------------------------------------------
def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` converted to the annotated type ``tp``; ValueError naming ``key`` when it cannot be."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0] if errors else f"{key}: cannot convert {value!r}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key} must be a list; got {value!r}")
        (item_type, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, item_type, key) for v in value]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ValueError(f"{key} must be true or false; got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"{key} must be an integer; got {value!r}")
        if isinstance(value, int):
            return value
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key} must be an integer; got {value!r}") from None
        if not f.is_integer():
            raise ValueError(f"{key} must be an integer; got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"{key} must be a number; got {value!r}")
        try:
            return float(value)  # PyYAML reads "4e-5" as a string (YAML 1.1), hence float() on strings too
        except (TypeError, ValueError):
            raise ValueError(f"{key} must be a number; got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"{key} must be a string; got {value!r}")
        return value if isinstance(value, str) else str(value)
    return value


def _build(cls, d: Mapping[str, Any] | None, prefix: str):
    d = dict(d or {})
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ValueError(f"unknown config key {prefix}{unknown[0]!s}; known keys in {prefix.rstrip('.') or 'the top level'} "
                         f"are {names}")
    kwargs = {}
    for name in names:
        if name not in d:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if d[name] is not None and not isinstance(d[name], Mapping):
                raise ValueError(f"{prefix}{name} must be a mapping; got {d[name]!r}")
            kwargs[name] = _build(tp, d[name], f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(d[name], tp, f"{prefix}{name}")
    return cls(**kwargs)


def config_from_dict(d: Mapping[str, Any]) -> RunConfig:
    """A RunConfig from nested dicts (a parsed YAML file); unknown keys raise ValueError naming the key."""
    return _build(RunConfig, d, "")


def config_to_dict(config: RunConfig) -> dict[str, Any]:
    d = dataclasses.asdict(config)
    d["model"] = config.model.to_dict()
    return d


def _substitute(obj: Any, variables: Mapping[str, str]) -> Any:
    if isinstance(obj, str):
        return _PLACEHOLDER.sub(lambda m: str(variables[m.group(1)]) if m.group(1) in variables else m.group(0), obj)
    if isinstance(obj, list):
        return [_substitute(v, variables) for v in obj]
    if isinstance(obj, dict):
        return {k: _substitute(v, variables) for k, v in obj.items()}
    return obj


def _apply_override(d: dict, override: str) -> None:
    import yaml

    if "=" not in override:
        raise ValueError(f"an override must look like 'section.key=value' (e.g. train.lr=1e-4); got {override!r}")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ValueError(f"override key must be dotted names like train.lr; got {key!r}")
    node = d
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ValueError(f"override {key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: str | Path | None, overrides: Sequence[str] = (),
                variables: Mapping[str, str] | None = None) -> RunConfig:
    """Read a YAML run file (None: all defaults), apply ``"a.b=c"`` overrides, replace ``${name}`` placeholders from
    ``variables``, and build the RunConfig. Unknown keys raise ValueError naming the key."""
    import yaml

    d: dict = {}
    if path is not None:
        with open(path, encoding="utf-8") as f:
            d = yaml.safe_load(f) or {}
        if not isinstance(d, dict):
            raise ValueError(f"{path}: a run config must be a YAML mapping; got {type(d).__name__}")
    for override in overrides:
        _apply_override(d, override)
    return config_from_dict(_substitute(d, dict(variables or {})))


def unresolved_placeholders(config: RunConfig) -> list[str]:
    """'key: value' for every string still holding a ``${name}`` placeholder."""
    out = []

    def walk(obj, prefix):
        if isinstance(obj, str) and _PLACEHOLDER.search(obj):
            out.append(f"{prefix}: {obj}")
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{prefix}.{k}" if prefix else k)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v, prefix)

    walk(config_to_dict(config), "")
    return out


def save_config(config: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (reloadable with :func:`load_config`)."""
    import yaml

    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config_to_dict(config), f, sort_keys=False)
