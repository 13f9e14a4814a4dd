"""Benchmark configs: one training recipe shared by every method, and a grid of nets, methods, strengths, seeds.

A config is a TOML file::

    name = "lenet300"

    [recipe]                      # identical for every run
    lr = 1e-3                     # Adam
    lr_schedule = "flat_then_linear"   # or "constant"
    batch_size = 100
    epochs = 200
    warmup = [0.025, 0.1]         # every method's regularizer ramps in over these fractions of the epochs
    pretrain_epochs = 0           # > 0: start from a dense net trained this long (plain Adam, same lr)
    finetune_epochs = 0           # > 0: train this long (lr x finetune_lr_factor, masks fixed) after threshold_
    finetune_lr_factor = 0.1
    val_size = 10000              # the last val_size training examples are the validation set
    latency_rounds = 7            # 0: skip the latency measurement

    [grid]
    nets = ["lenet300"]
    seeds = [0, 1, 2]

    [methods.l0]                  # any registered method name
    strength = "penalty"          # an option of the method, "sparsity" (threshold_ to a target sparsity),
                                  # or "threshold" (the method's own threshold, e.g. Sparse VD's log alpha)
    values = [0.05, 0.1, 0.3]
    options = { droprate_init = 0.5 }   # fixed options
    threshold_candidates = [2.0, 3.0, 4.0]   # optional: picked on validation (methods that take a threshold)
    threshold_tolerance = 0.002   # the most compressing candidate within this val error of the best one

Every name and value is checked when the config is read (the methods' own option checks included), so a
sweep never dies hours in on a typo.

Runs and trainings: a run (:class:`Run`, one result record) is a point of the grid, (net, method, strength
value, seed). A training (:class:`Training`, one process) produces one or more runs: a strength that is a
method option is set before training, so each value is its own training; a post-hoc strength
(``"threshold"``, ``"sparsity"``) only acts after training, so one training per (net, method, seed) serves
every value (it is deep-copied, thresholded, fine-tuned if the recipe says so, and measured once per value).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from ..convert import method_class, methods
from .nets import NETS

__all__ = ["LR_SCHEDULES", "STRENGTH_KINDS", "Config", "MethodGrid", "Recipe", "Run", "Training", "load_config"]

LR_SCHEDULES = ("flat_then_linear", "constant")
#: Strengths that are not method options: applied after training (post hoc), so one training serves all values.
STRENGTH_KINDS = ("sparsity", "threshold")


@dataclass(frozen=True)
class Recipe:
    """The training recipe every run of a config shares."""

    lr: float = 1e-3
    lr_schedule: str = "flat_then_linear"
    batch_size: int = 100
    epochs: int = 200
    warmup: tuple[float, float] = (0.025, 0.1)
    pretrain_epochs: int = 0
    finetune_epochs: int = 0
    finetune_lr_factor: float = 0.1
    val_size: int = 10_000
    latency_rounds: int = 7


@dataclass(frozen=True)
class MethodGrid:
    """One method's part of the grid: which knob is the strength, its values, the fixed options."""

    method: str
    strength: str
    values: tuple[float, ...]
    options: dict[str, Any] = field(default_factory=dict)
    threshold_candidates: tuple[float, ...] = ()
    threshold_tolerance: float = 0.0


@dataclass(frozen=True)
class Run:
    """One training run: a point of the grid."""

    net: str
    method: str
    strength: str
    value: float
    seed: int

    @property
    def key(self) -> str:
        return f"{self.net}/{self.method}/{self.strength}={self.value:g}/seed={self.seed}"


@dataclass(frozen=True)
class Training:
    """One training (one process) and the runs it produces: every value of a post-hoc strength
    (``"threshold"``, ``"sparsity"``), or the one value of a strength that is a method option."""

    net: str
    method: str
    strength: str
    values: tuple[float, ...]
    seed: int

    def __post_init__(self) -> None:
        if not self.values:
            raise ValueError("a training needs at least one strength value")
        if not self.post_hoc and len(self.values) != 1:
            raise ValueError(f"strength {self.strength!r} is set before training: one value per training, "
                             f"got {self.values}")

    @property
    def post_hoc(self) -> bool:
        """Whether the strength acts after training (one training serves every value)."""
        return self.strength in STRENGTH_KINDS

    @property
    def key(self) -> str:
        """``net/method/strength=*/seed=S`` for a shared (post-hoc) training, else its one run's key."""
        if self.post_hoc:
            return f"{self.net}/{self.method}/{self.strength}=*/seed={self.seed}"
        return self.runs()[0].key

    def runs(self) -> list[Run]:
        """The runs of this training, in the order of its values."""
        return [Run(self.net, self.method, self.strength, v, self.seed) for v in self.values]

    def only(self, values: tuple[float, ...]) -> "Training":
        """The same training, producing only ``values`` (a subset of its own, in its order)."""
        keep = tuple(v for v in self.values if v in set(values))
        if set(keep) != set(values):
            raise ValueError(f"values {sorted(set(values) - set(keep))} are not values of training {self.key}")
        return Training(self.net, self.method, self.strength, keep, self.seed)


@dataclass(frozen=True)
class Config:
    """A parsed, checked config."""

    name: str
    recipe: Recipe
    nets: tuple[str, ...]
    seeds: tuple[int, ...]
    methods: dict[str, MethodGrid]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "recipe": asdict(self.recipe), "nets": list(self.nets), "seeds": list(self.seeds),
                "methods": {k: asdict(v) for k, v in self.methods.items()}}

    @property
    def hash(self) -> str:
        """Hash of the whole config (the name excluded), 16 hex digits."""
        d = self.to_dict()
        del d["name"]
        return _digest(d)

    @property
    def recipe_hash(self) -> str:
        """Hash of the recipe alone: every run in one results file shares it."""
        return _digest(asdict(self.recipe))

    def run_hash(self, method: str) -> str:
        """Hash of what decides a run's result besides its key (net, method, value, seed): the recipe, and the
        method's strength kind, fixed options and threshold choice. The grid's values, seeds, nets and other
        methods are not part of it, so a grid can grow or change its values without invalidating finished runs;
        changing the recipe or a method's options does."""
        grid = asdict(self.methods[method])
        del grid["values"]
        return _digest({"recipe": asdict(self.recipe), "method": grid})

    def runs(self) -> list[Run]:
        """Every run of the grid, in a fixed order (net, method, strength value, seed)."""
        return [Run(net, m.method, m.strength, v, seed) for net in self.nets for m in self.methods.values()
                for v in m.values for seed in self.seeds]

    def trainings(self, only: Optional[Sequence[str]] = None,
                  seeds: Optional[Sequence[int]] = None) -> list[Training]:
        """Every training of the grid, in a fixed order (net, method, strength value, seed; a post-hoc strength's
        values share one training per seed), optionally only those of the methods ``only`` and the ``seeds``.

        The selection does not change the config (nor its hash): parts of a sweep selected this way can be
        run one after another into the same results file.

        Raises:
            ValueError: a method or seed that the config does not have.
        """
        for name in only or ():
            if name not in self.methods:
                raise ValueError(f"method {name!r} is not in config {self.name!r}; its methods: "
                                 f"{', '.join(self.methods)}")
        for seed in seeds or ():
            if seed not in self.seeds:
                raise ValueError(f"seed {seed!r} is not in config {self.name!r}; its seeds: "
                                 f"{', '.join(map(str, self.seeds))}")
        out = []
        for net in self.nets:
            for m in self.methods.values():
                if only and m.method not in only:
                    continue
                picked = [s for s in self.seeds if not seeds or s in seeds]
                if m.strength in STRENGTH_KINDS:
                    out += [Training(net, m.method, m.strength, m.values, s) for s in picked]
                else:
                    out += [Training(net, m.method, m.strength, (v,), s) for v in m.values for s in picked]
        return out

    def method_options(self, run: Union[Run, Training]) -> dict[str, Any]:
        """The method options of ``run``: the fixed ones, the recipe's warm-up, and the strength if it is an option."""
        grid = self.methods[run.method]
        options = {"warmup": self.recipe.warmup, **copy.deepcopy(grid.options)}
        if grid.strength not in STRENGTH_KINDS:
            options[grid.strength] = run.value if isinstance(run, Run) else run.values[0]
        return options


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=list).encode()).hexdigest()[:16]


def _err(where: str, msg: str) -> ValueError:
    return ValueError(f"{where}: {msg}")


def _number(where: str, key: str, value: Any, low: float, high: float = math.inf, integer: bool = False) -> Any:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise _err(where, f"{key} must be {kind} in [{low}, {high}], got {value!r}")
    return value if integer else float(value)


def _recipe(where: str, raw: Any) -> Recipe:
    if not isinstance(raw, dict):
        raise _err(where, f"[recipe] must be a table, got {raw!r}")
    known = {f for f in Recipe.__dataclass_fields__}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise _err(where, f"unknown recipe key(s) {unknown}; known: {sorted(known)}")
    r = dict(raw)
    for key in ("lr", "finetune_lr_factor"):
        if key in r:
            r[key] = _number(where, f"recipe.{key}", r[key], 0.0)
            if r[key] == 0:
                raise _err(where, f"recipe.{key} must be > 0, got 0")
    for key, low in (("batch_size", 1), ("epochs", 1), ("pretrain_epochs", 0), ("finetune_epochs", 0),
                     ("val_size", 1), ("latency_rounds", 0)):
        if key in r:
            r[key] = _number(where, f"recipe.{key}", r[key], low, integer=True)
    if r.get("lr_schedule", LR_SCHEDULES[0]) not in LR_SCHEDULES:
        raise _err(where, f"unknown recipe.lr_schedule {r['lr_schedule']!r}; known: {', '.join(LR_SCHEDULES)}")
    if "warmup" in r:
        w = r["warmup"]
        if not isinstance(w, list) or len(w) != 2:
            raise _err(where, f"recipe.warmup must be [start, end] (fractions of the epochs), got {w!r}")
        r["warmup"] = (_number(where, "recipe.warmup[0]", w[0], 0, 1), _number(where, "recipe.warmup[1]", w[1], 0, 1))
    return Recipe(**r)


def _method(where: str, name: str, raw: Any, recipe: Recipe) -> MethodGrid:
    if name not in methods():
        raise _err(where, f"unknown method {name!r} in [methods.{name}]; registered methods: {', '.join(methods())}")
    cls = method_class(name)
    where = f"{where}, [methods.{name}]"
    if not isinstance(raw, dict):
        raise _err(where, f"must be a table, got {raw!r}")
    known = {"strength", "values", "options", "threshold_candidates", "threshold_tolerance"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise _err(where, f"unknown key(s) {unknown}; known: {sorted(known)}")
    strength = raw.get("strength")
    if strength is None:
        raise _err(where, f"no strength: set strength to an option of {name!r} ({', '.join(sorted(cls.options))}) "
                          f"or one of {', '.join(STRENGTH_KINDS)}")
    if strength not in cls.options and strength not in STRENGTH_KINDS:
        raise _err(where, f"strength {strength!r} is not an option of method {name!r}; use one of its options "
                          f"({', '.join(sorted(cls.options))}) or one of {', '.join(STRENGTH_KINDS)}")
    if strength == "threshold" and cls.threshold_name is None:
        raise _err(where, f"method {name!r} takes no threshold (it prunes by its own learned criterion); use "
                          f"strength = \"sparsity\" or one of its options ({', '.join(sorted(cls.options))})")
    values = raw.get("values")
    if not isinstance(values, list) or not values:
        raise _err(where, f"values must be a non-empty list of strengths, got {values!r}")
    options = raw.get("options", {})
    if not isinstance(options, dict):
        raise _err(where, f"options must be a table, got {options!r}")
    if strength in options or "warmup" in options:
        clash = strength if strength in options else "warmup"
        raise _err(where, f"options sets {clash!r}, which the {'grid' if clash == strength else 'recipe'} sets; "
                          "remove it from options")
    try:
        cls.check_options(dict(options, warmup=recipe.warmup))
    except (TypeError, ValueError) as e:
        raise _err(where, f"{e}") from None
    checked = []
    for v in values:
        try:
            if strength == "sparsity":
                v = _number(where, "a sparsity", v, 0.0, 1.0)
                if v >= 1.0:
                    raise _err(where, "a sparsity must be below 1 (1.0 prunes every weight), got 1.0")
            elif strength == "threshold":
                v = _number(where, f"a threshold ({cls.threshold_name})", v, cls.threshold_low or -math.inf)
            else:
                v = cls.check_options({strength: v})[strength]  # the method's own range check
        except (TypeError, ValueError) as e:
            raise _err(where, f"strength {strength}={v!r} is refused: {e}") from None
        checked.append(v)
    if len(set(checked)) != len(checked):
        raise _err(where, f"values repeat a strength: {values}")
    candidates = raw.get("threshold_candidates", [])
    if candidates:
        if cls.threshold_name is None:
            raise _err(where, f"threshold_candidates given, but method {name!r} takes no threshold")
        if strength in ("threshold", "sparsity"):
            raise _err(where, f"threshold_candidates cannot be combined with strength = {strength!r}")
        if not isinstance(candidates, list):
            raise _err(where, f"threshold_candidates must be a list, got {candidates!r}")
        candidates = [_number(where, "a threshold candidate", c, cls.threshold_low or -math.inf) for c in candidates]
    tolerance = _number(where, "threshold_tolerance", raw.get("threshold_tolerance", 0.0), 0.0, 1.0)
    return MethodGrid(name, strength, tuple(checked), options, tuple(candidates), tolerance)


def parse_config(raw: dict[str, Any], where: str = "config") -> Config:
    """Check a config already read from TOML (see the module docstring for the keys).

    Raises:
        ValueError: naming the config, the section, the bad value and the fix.
    """
    unknown = sorted(set(raw) - {"name", "recipe", "grid", "methods"})
    if unknown:
        raise _err(where, f"unknown top-level key(s) {unknown}; known: grid, methods, name, recipe")
    recipe = _recipe(where, raw.get("recipe", {}))
    grid = raw.get("grid")
    if not isinstance(grid, dict):
        raise _err(where, "no [grid] table (nets = [...], seeds = [...])")
    unknown = sorted(set(grid) - {"nets", "seeds"})
    if unknown:
        raise _err(where, f"unknown [grid] key(s) {unknown}; known: nets, seeds")
    nets = grid.get("nets")
    if not isinstance(nets, list) or not nets:
        raise _err(where, f"grid.nets must be a non-empty list of nets ({', '.join(NETS)}), got {nets!r}")
    for net in nets:
        if net not in NETS:
            raise _err(where, f"unknown net {net!r} in grid.nets; known: {', '.join(NETS)}")
    seeds = grid.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or len(set(map(str, seeds))) != len(seeds):
        raise _err(where, f"grid.seeds must be a non-empty list of distinct integers, got {seeds!r}")
    seeds = [_number(where, "a seed", s, 0, 2**63 - 1, integer=True) for s in seeds]
    raw_methods = raw.get("methods")
    if not isinstance(raw_methods, dict) or not raw_methods:
        raise _err(where, f"no [methods.<name>] table; registered methods: {', '.join(methods())}")
    grids = {name: _method(where, name, m, recipe) for name, m in raw_methods.items()}
    name = raw.get("name", "bench")
    if not isinstance(name, str):
        raise _err(where, f"name must be a string, got {name!r}")
    return Config(name, recipe, tuple(nets), tuple(seeds), grids)


def load_config(path: Union[str, Path]) -> Config:
    """Read and check a TOML benchmark config.

    Raises:
        FileNotFoundError: no such file.
        ValueError: malformed TOML, or a bad name or value (the message names the file, the key, the value and
            the fix).
    """
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML: {e}") from None
    return parse_config(raw, str(path))
