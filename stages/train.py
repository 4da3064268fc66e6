"""Stage `train`: DDPM training on data/processed -> models/model.pt, strips, loss reports.

Resumes from models/checkpoints/last.pt when it was made by the same code, with the
same model, diffusion, training and data settings (and then continues its MLflow
run); otherwise says what differs and starts fresh. With train.nproc > 1 it starts
one worker process per GPU itself (`ddpm.train.stage`).
"""

import sys
from pathlib import Path

# This checkout's library, not an installed one: the code dvc.lock hashed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ddpm.evaluate import fid  # noqa: E402
from ddpm import stageutil  # noqa: E402
from ddpm.train import stage as train_stage  # noqa: E402
from ddpm.evaluate.model_file import CheckpointError  # noqa: E402
from ddpm.train.checkpoint import CheckpointWriteError  # noqa: E402
from ddpm.data.processed import ProcessedDataError  # noqa: E402
from ddpm.train.step import CaptureError  # noqa: E402
from ddpm.train.loop import NonFiniteLossError  # noqa: E402


def main() -> None:
    p = stageutil.parser(__doc__)
    p.add_argument("--data", type=Path, default=Path("data/processed"))
    p.add_argument("--model", type=Path, default=Path("models/model.pt"))
    p.add_argument("--checkpoints", type=Path, default=Path("models/checkpoints"))
    p.add_argument("--reports", type=Path, default=Path("reports"))
    p.add_argument("--strips", type=Path, default=Path("reports/strips"))
    p.add_argument("--run-file", type=Path, default=Path("reports/mlflow_run.json"))
    p.add_argument("--reference", type=Path, default=Path("data/reference/stats.npz"))
    p.add_argument("--best", type=Path, default=Path("models/best.pt"))
    args = p.parse_args()
    paths = train_stage.TrainPaths(args.data, args.model, args.checkpoints, args.reports,
                                   args.strips, args.run_file, args.reference, args.best)
    train_stage.run(stageutil.load(args), paths, script=__file__, argv=sys.argv[1:])


if __name__ == "__main__":
    stageutil.run(main, expected=(NonFiniteLossError, CheckpointError, CheckpointWriteError,
                                  CaptureError, ProcessedDataError, train_stage.WorkerFailed,
                                  fid.FidInputError, fid.FidWeightsError))
