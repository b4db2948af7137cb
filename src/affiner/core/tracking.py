"""Where a run's numbers go besides `metrics.jsonl`: TensorBoard, MLflow, Weights & Biases, CSV, and the
PNG curves.

Chosen in the config, several at once:

    train:
      tracking: [csv, tensorboard, mlflow, wandb]   # csv: metrics.csv | tensorboard: events in the run folder
      mlflow_uri: null                       # null: a local store, sqlite in <output_dir>/mlflow.db

`metrics.jsonl` is always written: it is what the app, the sweep table and the curves read. MLflow needs
no server: the default store is a SQLite file beside the runs (browse it with
`mlflow ui --backend-store-uri sqlite:///runs/mlflow.db`); set `mlflow_uri` to a server's address to
log there instead, in the experiment named by $MLFLOW_EXPERIMENT_NAME, else the config's name (a sweep names
its points' experiment after itself). W&B logs to the project named by $WANDB_PROJECT, else the config's name, with the
usual W&B settings (`wandb login`, or WANDB_MODE=offline to keep the run on disk for `wandb sync`;
its files go to $WANDB_DIR, else beside the runs). The MLflow and W&B run ids are kept in run.json, so a
resumed training and a later `affiner evaluate` add to the same runs.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
from pathlib import Path
from typing import Any

from affiner.core.config import RunConfig, flatten
from affiner.core.errors import AffinerError
from affiner.core.files import write_atomic
from affiner.core.runfolder import FAILED, FINISHED, RunFolder

CSV_FILE = "metrics.csv"
SCALARS = ("loss", "learning_rate", "grad_norm")
# The module each tracker imports, named after the extra that installs it (pip install 'affiner[wandb]').
TRACKER_MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def require_trackers_installed(config: RunConfig) -> None:
    """Refuse a config whose trackers are not installed, before anything is written or loaded."""
    for tracker in config.train.tracking:
        module = TRACKER_MODULES.get(tracker)
        if module and importlib.util.find_spec(module) is None:
            raise AffinerError(f"train.tracking includes {tracker} but {module} is not installed: "
                               f"pip install 'affiner[{tracker}]' (or remove {tracker} from train.tracking).")


# ---------------------------------------------------------------------------------------- trackers


class CsvTracker:
    """metrics.csv, one row per logged step; columns grow when evaluation keys first appear."""

    def __init__(self, folder: Path):
        self.path = folder / CSV_FILE
        self.rows: list[dict[str, Any]] = []
        if self.path.is_file():  # a resumed run continues its file
            with open(self.path, newline="", encoding="utf-8") as handle:
                self.rows = list(csv.DictReader(handle))

    def log(self, record: dict[str, Any]) -> None:
        # A resumed run logs again the steps after its checkpoint: the new record replaces the old ones.
        self.rows = [row for row in self.rows if float(row.get("step") or 0) < record["step"]] + [record]
        columns = list(dict.fromkeys(key for row in self.rows for key in row))
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=columns)
        writer.writeheader()
        writer.writerows(self.rows)
        write_atomic(self.path, text.getvalue())

    def close(self, folder: Path, status: str) -> None:
        pass


class TensorBoardTracker:
    def __init__(self, folder: Path, resumed_at: int = 0):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise AffinerError("train.tracking includes tensorboard but tensorboard is not installed: "
                               "pip install 'affiner[tensorboard]'.") from None
        # A resumed run trains again the steps after its checkpoint: their earlier points are purged, as
        # metrics.jsonl is truncated, so that each step shows once.
        self.writer = SummaryWriter(str(folder / "tensorboard"), purge_step=resumed_at + 1 if resumed_at else None)

    def log(self, record: dict[str, Any]) -> None:
        for key, value in record.items():
            if key in SCALARS or key.startswith("eval_"):
                section = "eval" if key.startswith("eval_") else "train"
                self.writer.add_scalar(f"{section}/{key.removeprefix('eval_')}", value, record["step"])

    def close(self, folder: Path, status: str) -> None:
        self.writer.close()


class MlflowTracker:
    """Parameters once, metrics every logged step, the run folder's files as artifacts at the end."""

    def __init__(self, config: RunConfig, folder: Path, run_id: str | None = None):
        self.client, self.uri = mlflow_client(config)
        self.resumed = run_id is not None
        if run_id is None:
            experiment = _experiment(self.client, os.environ.get("MLFLOW_EXPERIMENT_NAME") or config.name,
                                     Path(config.output_dir))
            run = self.client.create_run(experiment, run_name=folder.name,
                                         tags={"affiner.run_folder": str(folder.resolve())})
            run_id = run.info.run_id
            params = flatten(config.model_dump(mode="json"))
            for key, value in params.items():  # MLflow caps a value at 6000 characters
                self.client.log_param(run_id, key, json.dumps(value)[:6000] if not isinstance(value, str) else value[:6000])
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        self.last_step: dict[str, int] = {}  # metric -> the last step the run holds, read once per metric

    def log(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and step > self._last_step(key):
                self.client.log_metric(self.run_id, key, float(value), step=step)
                self.last_step[key] = step

    def _last_step(self, key: str) -> int:
        """A resumed run trains again the steps between its checkpoint and where it stopped; MLflow cannot delete a
        point, so the run's first point of each step is kept rather than a second one logged."""
        if key not in self.last_step:
            history = self.client.get_metric_history(self.run_id, key) if self.resumed else []
            self.last_step[key] = max((point.step for point in history), default=0)
        return self.last_step[key]

    def close(self, folder: Path, status: str) -> None:
        log_artifacts(self.client, self.run_id, folder)
        self.client.set_terminated(self.run_id, status={FINISHED: "FINISHED", FAILED: "FAILED"}.get(status, "KILLED"))


def mlflow_client(config: RunConfig):
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise AffinerError("train.tracking includes mlflow but MLflow is not installed: "
                           "pip install 'affiner[mlflow]'.") from None
    uri = config.train.mlflow_uri or local_store(Path(config.output_dir))
    try:
        return MlflowClient(tracking_uri=uri), uri
    except Exception as exc:  # noqa: BLE001 - MLflow raises its own types for a bad URI, a locked or foreign database
        raise AffinerError(f"train.mlflow_uri {uri}: MLflow cannot open it ({exc}).") from None


def local_store(output_dir: Path) -> str:
    output_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(output_dir / 'mlflow.db').resolve()}"


def _experiment(client, name: str, output_dir: Path) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    # Artifacts beside the runs, not in MLflow's default ./mlartifacts of whatever the current folder is.
    location = (output_dir / "mlflow-artifacts" / name).resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


ARTIFACTS = ("adapter_model.safetensors", "adapter_config.json", "model.safetensors", "config.json",
             "config.yaml", "template.json", "data.json", "run.json", "metrics.jsonl", CSV_FILE,
             "loss.png", "learning_rate.png", "report.html", "report.md", "metrics.json", "summary.json")


def log_artifacts(client, run_id: str, folder: Path) -> None:
    for name in ARTIFACTS:
        if (folder / name).is_file():
            client.log_artifact(run_id, str(folder / name))


class WandbTracker:
    """The config once, metrics every logged step; one W&B run per run folder, resumed under the same id."""

    def __init__(self, config: RunConfig, folder: Path, previous: dict[str, Any]):
        self.run = start_wandb(config, folder, previous.get("run_id"), previous.get("project"))
        self.run_id, self.project = self.run.id, self.run.project

    def log(self, record: dict[str, Any]) -> None:
        metrics = {key: value for key, value in record.items()
                   if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}
        self.run.log(metrics, step=int(record["step"]))

    def close(self, folder: Path, status: str) -> None:
        self.run.finish(exit_code=0 if status == FINISHED else 1)


def start_wandb(config: RunConfig, folder: Path, run_id: str | None = None, project: str | None = None):
    """A W&B run for this run folder: a new one, or the one `run_id` names, continued."""
    try:
        import wandb
    except ImportError:
        raise AffinerError("train.tracking includes wandb but wandb is not installed: "
                           "pip install 'affiner[wandb]'.") from None
    # $WANDB_DIR, else beside the runs rather than in a wandb/ folder of whatever the current folder is; read
    # here on every call, since W&B reads its environment once per process.
    files = Path(os.environ.get("WANDB_DIR") or config.output_dir).resolve()
    files.mkdir(parents=True, exist_ok=True)
    try:
        return wandb.init(project=project or os.environ.get("WANDB_PROJECT") or config.name, name=folder.name,
                          id=run_id, resume="allow" if run_id else None, config=config.model_dump(mode="json"),
                          dir=str(files), settings=wandb.Settings(console="off", quiet=True))
    except Exception as exc:  # noqa: BLE001 - wandb raises its own types for a missing login, a network failure
        raise AffinerError(f"Weights & Biases could not start a run ({exc}). Log in with `wandb login`, or set "
                           "WANDB_MODE=offline to keep the run on disk and `wandb sync` it later; or remove "
                           "wandb from train.tracking.") from None


# ---------------------------------------------------------------------------------------- the set of trackers


class Trackers:
    """Every tracker the config names; the run folder's metrics.jsonl is written by the training loop."""

    def __init__(self, config: RunConfig, folder: Path, run_info: dict[str, Any], resumed_at: int = 0):
        self.trackers: list[Any] = []
        self.mlflow: MlflowTracker | None = None
        self.wandb: WandbTracker | None = None
        chosen = config.train.tracking
        if "csv" in chosen:
            self.trackers.append(CsvTracker(folder))
        if "tensorboard" in chosen:
            self.trackers.append(TensorBoardTracker(folder, resumed_at))
        if "mlflow" in chosen:
            previous = run_info.get("mlflow", {})
            same_store = previous.get("uri") == (config.train.mlflow_uri or local_store(Path(config.output_dir)))
            self.mlflow = MlflowTracker(config, folder, previous.get("run_id") if same_store else None)
            self.trackers.append(self.mlflow)
        if "wandb" in chosen:
            self.wandb = WandbTracker(config, folder, run_info.get("wandb", {}))
            self.trackers.append(self.wandb)

    def log(self, record: dict[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.log(record)

    def close(self, folder: Path, status: str) -> None:
        plot_training(folder)
        for tracker in self.trackers:
            tracker.close(folder, status)

    @property
    def run_info(self) -> dict[str, Any]:
        """What run.json keeps so that resume and evaluate find the same MLflow and W&B runs."""
        info: dict[str, Any] = {}
        if self.mlflow:
            info["mlflow"] = {"uri": self.mlflow.uri, "run_id": self.mlflow.run_id}
        if self.wandb:
            info["wandb"] = {"project": self.wandb.project, "run_id": self.wandb.run_id}
        return info


def log_evaluation(folder: Path, config: RunConfig, run_info: dict[str, Any], scores: dict[str, float]) -> None:
    """An evaluation adds its headline numbers (and, for MLflow, the report files) to the run's MLflow and W&B
    runs, where it has them."""
    recorded = run_info.get("mlflow")
    if recorded and "mlflow" in config.train.tracking:
        client, _ = mlflow_client(config)
        for key, value in scores.items():
            client.log_metric(recorded["run_id"], key, float(value))
        log_artifacts(client, recorded["run_id"], folder)
    recorded = run_info.get("wandb")
    if recorded and "wandb" in config.train.tracking:
        run = start_wandb(config, folder, recorded["run_id"], recorded.get("project"))
        run.summary.update({key: float(value) for key, value in scores.items()})
        run.finish()


# ---------------------------------------------------------------------------------------- curves


def plot_training(folder: Path) -> list[Path]:
    """loss.png (train and held-out loss) and learning_rate.png, from metrics.jsonl."""
    records = RunFolder(folder).log()
    if not records:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, series, ylabel in (("loss.png", (("loss", "train loss"), ("eval_loss", "held-out loss")), "loss"),
                                 ("learning_rate.png", (("learning_rate", "learning rate"),), "learning rate")):
        figure, axis = plt.subplots(figsize=(6.4, 3.4), dpi=110)
        for key, label in series:
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                axis.plot(*zip(*points), marker="o" if len(points) < 30 else None, markersize=3, label=label)
        axis.set_xlabel("step")
        axis.set_ylabel(ylabel)
        axis.set_title(f"{folder.name}: {ylabel}")
        axis.grid(alpha=0.3)
        axis.legend()
        figure.tight_layout()
        figure.savefig(folder / name)
        plt.close(figure)
        written.append(folder / name)
    return written
