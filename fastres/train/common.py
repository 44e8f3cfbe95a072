"""What the fastres-train and fastres-eval command lines share: ``UsageError`` and the
``--data-backend`` flag (its definition and its resolution for a data set and device; the
backends themselves are in ``fastres.data.loaders``)."""
from typing import Optional

__all__ = ["UsageError", "DATA_BACKEND_HELP", "add_data_backend_argument", "cli_data_backend"]


class UsageError(ValueError):
    """A bad argument value discovered while setting up the run (bad --data, ...)."""


DATA_BACKEND_HELP = ("image-folder input pipeline: gpu (JPEGs decoded and augmented in batches "
                     "on the GPU), cpu (fast per-image PIL path), dali (NVIDIA DALI, if "
                     "installed), reference (the per-image reference transforms); auto "
                     "(default) = gpu on CUDA, else cpu. Other data sets use their own")


def add_data_backend_argument(parser, help: str = DATA_BACKEND_HELP) -> None:
    """Add ``--data-backend auto|reference|cpu|gpu|dali`` (default auto) to ``parser`` (an
    ``argparse`` parser or argument group)."""
    from fastres.data.loaders import DATA_BACKENDS
    parser.add_argument("--data-backend", choices=list(DATA_BACKENDS), default="auto",
                        help=help)


def cli_data_backend(name: Optional[str], dataset, device) -> str:
    """``--data-backend name`` (None: auto) resolved for ``dataset`` on ``device``
    (``fastres.data.loaders.resolve_data_backend``); a combination that cannot run (not an
    image folder, DALI not installed, DALI on a device other than CUDA or the CPU) raises
    ``UsageError`` with the message to print."""
    from fastres.data.loaders import resolve_data_backend
    try:
        return resolve_data_backend(name or "auto", dataset, device)
    except (ValueError, ImportError) as e:
        raise UsageError(str(e)) from None
