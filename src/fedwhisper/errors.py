"""Project error classes. Every message says what was wrong, where, and what to do."""


class FedWhisperError(Exception):
    """Base class for every error fedwhisper raises on purpose."""


class ParamsError(FedWhisperError):
    """A params.yaml key is unknown, has the wrong type, or is out of range."""


class DataError(FedWhisperError):
    """A dataset, audio file, transcript or prepared split is unusable."""


class CheckpointError(FedWhisperError):
    """A model file or directory cannot be read, is unsafe, or does not match the others."""


class MergeError(FedWhisperError):
    """A merge strategy was given inputs or parameters it cannot work with."""


class DecodeError(FedWhisperError):
    """Decoding or scoring failed."""


class FederatedError(FedWhisperError):
    """A federated round cannot go on: too few clients, a client update that does not fit the global model."""
