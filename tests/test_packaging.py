"""What `pip install` puts into site-packages: fedkd's packages, all of them, and no top-level `strategies`."""
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _installed_name(folder: Path) -> str:
    relative = folder.relative_to(ROOT).parts
    if relative[0] == "strategies":  # the top-level folder installs under the package's namespace
        relative = ("fedkd", *relative)
    return ".".join(relative)


def test_every_package_folder_is_installed_and_strategies_go_under_fedkd():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == {"fedkd.strategies": "strategies"}
    folders = sorted(p.parent for base in ("fedkd", "strategies") for p in (ROOT / base).rglob("__init__.py")
                     if "__pycache__" not in p.parts)
    assert sorted(config["packages"]) == sorted(_installed_name(f) for f in folders)
    assert not any(name == "strategies" or name.startswith("strategies.") for name in config["packages"])


def test_the_builtin_strategies_are_found_under_fedkd_strategies():
    import importlib

    from fedkd.registry import builtin_strategies, resolve_strategy

    for name, target in builtin_strategies().items():
        module = target.partition(":")[0]
        assert importlib.import_module(module).__file__.startswith(str(ROOT / "strategies")), target
        resolve_strategy(name)  # imports and checks the class (fedavg is Flower's own, re-exported)
