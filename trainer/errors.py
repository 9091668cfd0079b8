"""Typed errors of the trainer; the CLI turns each into one line on stderr and a non-zero exit."""


class TrainerError(Exception):
    """Base class of errors the user can act on."""


class DatasetError(TrainerError, ValueError):
    """A dataset path that is missing, empty, or holds a corrupt file."""


class DownloadError(TrainerError, OSError):
    """A download that failed or did not match its checksum."""


class RunDirError(TrainerError, ValueError):
    """A run directory that cannot be used as asked (different config, nothing to resume...)."""


class CheckpointError(TrainerError, ValueError):
    """Checkpoint files that are missing, corrupt, or do not match their config."""


class TrainingDivergedError(TrainerError, RuntimeError):
    """A non-finite loss."""
