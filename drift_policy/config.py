"""Compose the Hydra configs in ``drift_policy/configs/`` and validate them into dataclasses.

Every key is checked: a typo is an error that names the key, and a bad value is an error that names the key
and the allowed values. Values derived from others (observation size, run folder) are set here, in Python.

Each default is written once, in these dataclasses (and in each policy's and task family's own dataclass):
``compose`` registers them with Hydra as schemas (``/schema/train``, ``/schema/task/<family>``,
``/schema/policy/<type>``), and a YAML file selects a schema and holds only what differs from it.

What a policy was tuned to on a task is its recipe, one YAML file: ``configs/recipe/<task>_<policy type>.yaml``
(e.g. ``pusht_keypoints_drift.yaml``), which sets the policy and train keys that differ from the defaults, each
with the measurement behind it. ``compose`` selects the recipe of the chosen task and policy type when one exists
(``recipe=<name>`` picks another, ``recipe=null`` none); keys on the command line override it.
"""
from __future__ import annotations

import dataclasses
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError, check_keys, check_types, unknown_key_error
from .paths import CONFIG_DIR
from .policies import PolicyConfig, config_from_dict, with_legacy_keys
from .policies.persistence import plain


@dataclass
class TaskConfig:
    name: str = "pusht_keypoints"
    env: str = "pusht"                  # the task family: pusht | robomimic | any registered (drift_policy/tasks/)
    dataset: str = "pusht/pusht_cchi_v7_replay.zarr"   # relative to the data root, or absolute
    obs_keys: tuple[str, ...] = ("keypoint", "agent_pos")   # low-dim keys, concatenated in this order
    image_keys: tuple[str, ...] = ()    # camera keys, each with its own image encoder
    image_size: int = 96                # stored frames are image_size x image_size
    crop_size: int = 84                 # random crop in training, centre crop at evaluation
    data_root: str | None = None        # None: $DRIFT_POLICY_DATA_ROOT, else the repository's datasets/
    val_ratio: float = 0.02             # held-out fraction of episodes (split by episode)
    max_steps: int = 300                # env steps per evaluation episode
    start_seed: int = 100000            # Diffusion Policy's test seeds: start_seed .. start_seed + episodes - 1
    options: dict = field(default_factory=dict)   # the family's own keys (task.options.<key>), checked by it

    def __post_init__(self):
        from .tasks import check_task

        check_types(self, "task.")
        self.options = dict(self.options or {})
        check_task(self)                    # the family checks its keys and options: ConfigError naming the key
        if not 0 <= self.val_ratio < 1:
            raise ConfigError(f"task.val_ratio must be in [0, 1), got {self.val_ratio}")
        if self.max_steps < 1:
            raise ConfigError(f"task.max_steps must be >= 1, got {self.max_steps}")


@dataclass
class TrainConfig:
    seed: int = 0
    device: str = "cpu"                 # "cpu" or "cuda[:i]"
    threads: int = 2                    # torch intra-op threads of the trainer; rollout workers use 1 each
    batch_size: int = 0                 # observations per step; 0: the policy's default_batch_size (drift: 64 //
                                        # n_noise, i.e. 32 obs x 2 chunks; diffusion: 64)
    lr: float = 3e-4                    # peak learning rate (the drift recipe for Push-T keypoints: 6e-4)
    weight_decay: float = 1e-6
    betas: tuple[float, float] = (0.95, 0.999)
    warmup_steps: int = 100             # linear warm-up steps before the cosine decay (Push-T keypoints' drift: 500)
    # The budget is counted in generator sample-passes (one forward + backward of one action chunk), so that it
    # means the same on any machine: the drift policy pays batch_size * n_noise per step, diffusion batch_size.
    # max_steps = 0 derives the step count from it; max_steps > 0 wins and the budget is recomputed from it.
    sample_passes: int = 1_200_000
    max_steps: int = 0
    max_minutes: float = 0.0            # a stopping guard only (0: none); the LR schedule never depends on time
    grad_clip: float = 1.0              # max gradient norm (0: none). Drift's loss is a sum of unit-RMS fields whose
                                        # gradient norm is 13-26 on Push-T, so this clips every drift step (AdamW on
                                        # normalised gradients) and almost no diffusion step; drift without it: lower
                                        # (pusht_keypoints/levers/neighbour_negatives)
    ema_decay: float = 0.999
    ema_warmup: int = 10                # w in the EMA decay min(ema_decay, (1 + step) / (w + step)) (ema.py): 10 reaches
                                        # 0.999 at ~9k steps, 2 at ~1k, 1 at once
    log_every: int = 50
    eval_every_steps: int = 0           # 0: derived from eval_fraction
    eval_fraction: float = 0.1          # evaluate every this fraction of max_steps (0.1: 10 evaluations)
    eval_every_minutes: float = 0.0     # also every this many training minutes (machine-dependent; 0: off)
    eval_episodes: int = 50
    eval_workers: int = 1               # rollout worker processes (0: step the environments in the trainer)
    ckpt_every_steps: int = 500
    keep_checkpoints: int = 2
    max_bad_steps: int = 20             # consecutive non-finite losses/gradients before training aborts
    compile: bool = False               # torch.compile the backbone for training (faster steps after minutes of
                                        # compiling at the start; needs a C++ compiler)
    encoder_bf16: bool = False          # the image encoder's trunk under bfloat16 autocast in training (weights,
                                        # keypoints and evaluation stay float32): about half the encoder's time on a
                                        # CPU with AVX512-BF16 or AMX, slower on one without; it changes the numerics,
                                        # so it is part of a recipe (eval/diagnostics/profile_step_pusht_image)
    run_dir: str = ""                   # empty: runs/<task>-<policy>-<time>, relative to the working directory
    overwrite: bool = False             # replace an existing run in run_dir (else training into it is refused)
    wandb: str = "disabled"             # disabled | offline | online
    wandb_project: str = "drift-policy"

    def __post_init__(self):
        check_types(self, "train.")
        positive = ("threads", "log_every", "ckpt_every_steps", "keep_checkpoints",
                    "max_bad_steps", "ema_warmup")
        for k in positive:
            if getattr(self, k) < 1:
                raise ConfigError(f"train.{k} must be >= 1, got {getattr(self, k)}")
        non_negative = ("batch_size", "warmup_steps", "sample_passes", "max_steps", "max_minutes", "eval_fraction", "eval_every_steps", "eval_every_minutes", "eval_episodes",  # noqa: E501
                        "eval_workers", "weight_decay", "grad_clip")
        for k in non_negative:
            if getattr(self, k) < 0:
                raise ConfigError(f"train.{k} must be >= 0, got {getattr(self, k)}")
        if self.sample_passes == 0 and self.max_steps == 0:
            raise ConfigError("train.sample_passes or train.max_steps must be > 0 (the training budget)")
        if self.eval_fraction > 1:
            raise ConfigError(f"train.eval_fraction must be in [0, 1], got {self.eval_fraction}")
        if not self.lr > 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"train.betas must be two numbers in [0, 1), got {self.betas}")
        if self.wandb not in ("disabled", "offline", "online"):
            raise ConfigError(f"train.wandb must be disabled, offline or online, got {self.wandb!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"train.device must be 'cpu' or 'cuda[:i]', got {self.device!r}")


@dataclass
class Config:
    task: TaskConfig
    policy: PolicyConfig
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return {"task": dataclasses.asdict(self.task), "policy": self.policy.to_dict(),
                "train": dataclasses.asdict(self.train)}

    @classmethod
    def from_dict(cls, d: dict, where: str = "config", new: bool = False) -> "Config":
        """The validated config of a dict: a saved one (a run's config.json, a checkpoint's config; ``where``
        names it in messages about removed options, ``with_legacy_keys``), or with ``new`` one being made
        (``compose``), where a removed option is an error."""
        check_keys(cls, d, "")
        for k in ("task", "policy"):
            if k not in d:
                raise ConfigError(f"config is missing '{k}'")
        task = _legacy_task(dict(d["task"]))
        check_keys(TaskConfig, task, "task.")
        from .tasks import resolve_task, task_spaces

        task = resolve_task(TaskConfig(**task))   # every key explicit (LeRobot: read from the dataset's features)
        policy = dict(d["policy"])
        # The observation and action sizes come from the task, not from the policy's YAML.
        for k, v in task_spaces(task).items():
            if k in policy and plain(policy[k]) != plain(v):
                raise ConfigError(f"policy.{k}={policy[k]} contradicts task {task.name} ({k}={v})")
            policy[k] = v
        # A config.json written before a key existed reads as what it was trained with (action_anchor: [], absolute
        # actions), and one written with a key removed since reads without it.
        policy = with_legacy_keys(policy, where, removed="refuse" if new else "warn")
        train = dict(d.get("train", {}))
        check_keys(TrainConfig, train, "train.")
        cfg = cls(task=task, policy=config_from_dict(policy), train=TrainConfig(**train))
        cfg._resolve_budget()
        return cfg

    @property
    def sample_passes_per_step(self) -> int:
        """Generator sample-passes of one optimizer step: batch_size observations x samples per observation."""
        return self.train.batch_size * self.policy.sample_passes_per_obs

    @property
    def encoder_passes_per_step(self) -> int:
        """Images through the image encoder in one optimizer step: batch_size observations x cameras x To (0
        without cameras). At equal sample-passes a drift policy with G samples per observation encodes 1/G of
        the images that the diffusion baseline does."""
        return self.train.batch_size * self.policy.encoder_passes_per_obs

    def _resolve_budget(self) -> None:
        """Derive the batch size (0: the policy's default), max_steps from the sample-pass budget (or the budget from
        max_steps), and the eval interval.

        Idempotent: a saved config.json holds the resolved values and resolves to itself, so a resumed run
        keeps its schedule."""
        t = self.train
        if t.batch_size == 0:
            t.batch_size = self.policy.default_batch_size
        per_step = self.sample_passes_per_step
        if t.max_steps == 0:
            t.max_steps = max(1, -(-t.sample_passes // per_step))       # ceil: never under the budget
        t.sample_passes = t.max_steps * per_step
        if t.eval_every_steps == 0 and t.eval_fraction > 0:
            # ceil: the last scheduled evaluation is the final one, never a near-duplicate a few steps before it
            t.eval_every_steps = max(1, math.ceil(t.max_steps * t.eval_fraction - 1e-9))

    def default_run_dir(self) -> Path:
        name = f"{self.task.name}-{self.policy.type}-{self.policy.backbone}-{time.strftime('%Y%m%d-%H%M%S')}"
        return Path("runs") / name


def _legacy_task(task: dict) -> dict:
    """Runs written before task.options existed stored the robomimic keys at the top level of the task."""
    legacy = {k: task.pop(k) for k in ("robomimic_task", "abs_action") if k in task}
    if legacy and task.get("env") == "robomimic":
        task["options"] = {**legacy, **dict(task.get("options") or {})}
    return task


def defaults_of(cls, exclude: tuple[str, ...] = ()) -> dict:
    """A dataclass's field defaults as plain YAML values (lists for tuples), without running its checks."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        v = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        out[f.name] = _yaml_value(v)
    return out


def _yaml_value(v):
    if isinstance(v, (list, tuple)):
        return [_yaml_value(x) for x in v]
    if isinstance(v, dict):
        return {k: _yaml_value(x) for k, x in v.items()}
    return v


def register_schemas() -> None:
    """The dataclass defaults as Hydra configs that the YAML files build on (see the module docstring)."""
    from hydra.core.config_store import ConfigStore

    from .policies import POLICIES
    from .tasks import POLICY_KEYS_FROM_TASK, families, family

    cs = ConfigStore.instance()
    cs.store(group="schema", name="train", node=defaults_of(TrainConfig))
    for name in families():
        fam = family(name)
        cs.store(group="schema/task", name=name, node={**defaults_of(TaskConfig), "env": name,
                                                       "options": defaults_of(fam.options_class)})
    for kind, (config_cls, _) in POLICIES.items():
        cs.store(group="schema/policy", name=kind, node=defaults_of(config_cls, exclude=POLICY_KEYS_FROM_TASK))


RECIPES = "recipe"          # the config group of recipes: configs/recipe/<task>_<policy type>.yaml


def compose(overrides: list[str] | None = None, config_dir: str | Path | None = None,
            search_path: list[str | Path] = (), config_name: str = "config") -> Config:
    """Compose ``config_dir/<config_name>.yaml`` (default: the package's ``configs/config.yaml``; another one, such
    as an experiment of the repository's ``configs/``, builds on it) with Hydra-style overrides and validate the
    result. ``search_path``: more config folders (e.g. with a ``task/`` of one's own), searched after
    ``config_dir``; the package's folder is always searched. The recipe of the chosen task and policy type
    (``recipe/<task>_<type>.yaml``) is selected when one exists, unless the overrides or the config name one
    (``recipe=<name>``; ``recipe=null``: none)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    config_dir = Path(config_dir or CONFIG_DIR).resolve()
    if not (config_dir / f"{config_name}.yaml").exists():
        raise ConfigError(f"no {config_name}.yaml in {config_dir}")
    search_path = [Path(p).resolve() for p in search_path]
    if config_dir != CONFIG_DIR.resolve():
        search_path.append(CONFIG_DIR.resolve())      # what an experiment builds on: config.yaml, task/, policy/, ...
    overrides = list(overrides or [])
    chosen = any(o.lstrip("+~").split("=")[0] == RECIPES for o in overrides)       # the command line chose
    overrides = [o for o in overrides if o not in (f"{RECIPES}=null", f"{RECIPES}=none")]  # the default: no recipe
    if search_path:
        overrides.append("hydra.searchpath=[" + ",".join(f"file://{p}" for p in search_path) + "]")
    register_schemas()

    def tree(overrides: list[str]) -> dict:
        with initialize_config_dir(config_dir=str(config_dir), version_base=None):
            cfg = hydra_compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
            recipe = None if chosen else _default_recipe(cfg, [config_dir, *search_path])
            if recipe:
                cfg = hydra_compose(config_name=config_name, overrides=[*overrides, f"{RECIPES}={recipe}"],
                                    return_hydra_config=True)
            with open_dict(cfg):
                del cfg["hydra"]                 # Hydra's own settings (asked for above: the group choices)
            return OmegaConf.to_container(cfg, resolve=True)

    try:
        d = tree(overrides)
    except (HydraException, OmegaConfBaseException) as e:
        typo = re.match(r"Could not override '([^']+)'\.\s*To append", str(e))
        if typo is None:
            raise ConfigError(str(e)) from e
        # Hydra's hint, "use +key=value", would be refused by check_keys: name the closest real key instead.
        key = typo.group(1)
        value = next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == key), None)
        try:
            known = tree([o for o in overrides if o.split("=", 1)[0] != key])
        except (HydraException, OmegaConfBaseException):
            known = {}
        raise unknown_key_error(key, value, known) from e
    return Config.from_dict(d, new=True)


def _default_recipe(cfg, config_dirs: list) -> str | None:
    """``<task>_<policy type>`` when a config folder holds that recipe and the config did not choose one already."""
    choices = cfg.hydra.runtime.choices
    if choices.get(RECIPES) is not None:
        return None
    name = f"{choices.get('task')}_{cfg.policy.get('type')}"
    return name if any((Path(d) / RECIPES / f"{name}.yaml").is_file() for d in config_dirs) else None
