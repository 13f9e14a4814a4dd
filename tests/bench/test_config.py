import pytest

from bayes_sparse.bench import load_config, parse_config
from bayes_sparse.bench.config import Run

BASE = {"name": "t", "recipe": {"epochs": 1}, "grid": {"nets": ["mlp_tiny"], "seeds": [0, 1]},
        "methods": {"l0": {"strength": "penalty", "values": [0.1, 0.3]},
                    "magnitude": {"strength": "target_sparsity", "values": [0.5]}}}


def with_(**changes):
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    raw["methods"] = {k: dict(v) for k, v in BASE["methods"].items()}
    for path, value in changes.items():
        *head, last = path.split("__")
        d = raw
        for k in head:
            d = d.setdefault(k, {})
        d[last] = value
    return raw


def test_runs_keys_and_options():
    c = parse_config(with_())
    keys = [r.key for r in c.runs()]
    assert keys == ["mlp_tiny/l0/penalty=0.1/seed=0", "mlp_tiny/l0/penalty=0.1/seed=1", "mlp_tiny/l0/penalty=0.3/seed=0",
                    "mlp_tiny/l0/penalty=0.3/seed=1", "mlp_tiny/magnitude/target_sparsity=0.5/seed=0",
                    "mlp_tiny/magnitude/target_sparsity=0.5/seed=1"]
    opts = c.method_options(Run("mlp_tiny", "l0", "penalty", 0.3, 0))
    assert opts == {"warmup": c.recipe.warmup, "penalty": 0.3}


def test_hash_follows_what_decides_results_not_the_name():
    a, b = parse_config(with_()), parse_config(with_(name="other"))
    assert a.hash == b.hash and len(a.hash) == 16
    assert parse_config(with_(recipe__epochs=2)).hash != a.hash
    assert parse_config(with_(grid__seeds=[0])).hash != a.hash


@pytest.mark.parametrize("changes, match", [
    ({"methods__l9": {"strength": "penalty", "values": [1.0]}}, r"unknown method 'l9' in \[methods.l9\]; registered "
                                                                 r"methods: .*l0.*vd"),
    ({"methods__l0__options": {"droprate": 0.2}}, r"\[methods.l0\]: method 'l0' has no option\(s\) \['droprate'\]; "
                                                  r"accepted: .*droprate_init"),
    ({"methods__l0__strength": "strenght"}, r"strength 'strenght' is not an option of method 'l0'; use one of its "
                                            r"options \(droprate_init, penalty, warmup\) or one of sparsity, threshold"),
    ({"grid__nets": ["lenet7"]}, r"unknown net 'lenet7' in grid.nets; known: lenet300, lenet5, mlp_tiny"),
    ({"methods__l0__values": [0.1, -1.0]}, r"\[methods.l0\]: strength penalty=-1.0 is refused: .*penalty.*-1"),
    ({"methods__magnitude__values": [1.5]}, r"\[methods.magnitude\]: strength target_sparsity=1.5 is refused"),
    ({"methods__l0__strength": "threshold"}, r"method 'l0' takes no threshold .* use strength = \"sparsity\""),
    ({"methods__l0__values": []}, r"values must be a non-empty list"),
    ({"recipe__lr_schedule": "cosine"}, r"unknown recipe.lr_schedule 'cosine'; known: flat_then_linear, constant"),
    ({"recipe__epoch": 3}, r"unknown recipe key\(s\) \['epoch'\]"),
    ({"recipe__epochs": 0}, r"recipe.epochs must be an integer in \[1, inf\], got 0"),
    ({"methods__l0__options": {"warmup": [0, 0.1]}}, r"options sets 'warmup', which the recipe sets"),
], ids=["unknown-method", "unknown-option", "unknown-strength", "unknown-net", "strength-out-of-range",
        "sparsity-out-of-range", "no-threshold", "no-values", "lr-schedule", "recipe-key", "epochs", "warmup-clash"])
def test_bad_config_names_value_and_fix(changes, match):
    with pytest.raises(ValueError, match=match):
        parse_config(with_(**changes), "cfg.toml")


def test_shipped_configs_parse():
    from pathlib import Path

    root = Path(__file__).parents[2] / "benchmarks" / "configs"
    configs = {p.stem: load_config(p) for p in root.glob("*.toml")}
    assert {"smoke", "lenet300", "lenet5"} <= set(configs)
    big = configs["lenet300"]
    assert big.recipe.epochs == 200 and len(big.seeds) == 3
    assert {"vd", "l0", "ltp", "l1", "magnitude"} <= set(big.methods)
    assert all(len(m.values) >= 4 for m in big.methods.values())
    small = configs["lenet5"]
    assert small.recipe.epochs >= 30 and len(small.seeds) == 3 and all(len(m.values) >= 3 for m in small.methods.values())


def test_bad_toml_names_the_file(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("name = \n")
    with pytest.raises(ValueError, match=r"c.toml: not valid TOML"):
        load_config(p)
