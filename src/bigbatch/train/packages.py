"""The optional packages a run's config needs, checked before anything is imported or written.

`check_packages` looks each one up with `importlib.util.find_spec`, which imports nothing: the
command line refuses a config whose trackers or recipe need a package that is not installed before
torch loads and before anything is written to ``--out`` (a retry is then not refused as "an
earlier run"). TensorBoard is the default tracker and stays optional: a run without it warns and
goes on with metrics.jsonl.
"""

from __future__ import annotations

import importlib.util
import os

from bigbatch.train.config import Config
from bigbatch.units import UsageError

EXTRAS: dict[str, str] = {"tensorboard": "full", "mlflow": "mlflow", "wandb": "wandb"}
"""The extra of bigbatch that installs each tracker's packages."""

_TRACKER_PACKAGES: dict[str, tuple[str, ...]] = {"mlflow": ("mlflow",), "wandb": ("wandb",)}
# MLflow's database stores (its SQLite store among them) need these, which mlflow-skinny leaves out.
_DATABASE_PACKAGES = ("sqlalchemy", "alembic")
_DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
# The bundled recipes' optional packages: import name -> what pip installs.
_RECIPE_PACKAGES: dict[str, dict[str, str]] = {
    "digits": {"sklearn": "scikit-learn"},
    "digits-bn": {"sklearn": "scikit-learn"},
}


def check_packages(config: Config) -> None:
    """Refuse, in one line naming the package and how to install it, a config whose trackers or
    recipe need a package that is not installed.

    Raises:
        UsageError: a missing package.
    """
    check_trackers(config)
    check_recipe(config)


def check_recipe(config: Config) -> None:
    """`check_packages` for the bundled recipe alone (a user's recipe imports its own)."""
    for package, distribution in _RECIPE_PACKAGES.get(config.recipe, {}).items():
        if not installed(package):
            raise UsageError(
                f"recipe {config.recipe} needs {distribution}, which is not installed: pip "
                f"install 'bigbatch[full]' (or {distribution})"
            )


def check_trackers(config: Config) -> None:
    """`check_packages` for the trackers alone (a `Trainer` runs anyone's model, no recipe)."""
    for name in dict.fromkeys(config.trackers):
        for package in tracker_packages(name, config.mlflow_tracking_uri):
            if not installed(package):
                raise UsageError(
                    f"trackers: {name} needs {package}, which is not installed: pip install "
                    f"'bigbatch[{EXTRAS[name]}]', or remove {name} from trackers"
                )


def tracker_packages(name: str, mlflow_tracking_uri: str = "auto") -> tuple[str, ...]:
    """The packages (import names) the tracker needs; TensorBoard's are optional: none.

    >>> tracker_packages("mlflow", "http://tracking:5000")
    ('mlflow',)
    >>> tracker_packages("mlflow", "sqlite:///runs/a/mlflow.db")
    ('mlflow', 'sqlalchemy', 'alembic')
    """
    packages = _TRACKER_PACKAGES.get(name, ())
    if name == "mlflow":
        uri = mlflow_tracking_uri
        if uri == "auto":  # the environment's, else the run's own SQLite store
            uri = os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:"
        if uri.partition(":")[0].partition("+")[0] in _DATABASE_SCHEMES:
            packages += _DATABASE_PACKAGES
    return packages


def installed(package: str) -> bool:
    """Whether a top-level package can be imported, without importing it."""
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a broken parent package, a module without a spec
        return False
