"""One exception type per kind of user mistake. The CLI prints `str(err)` as one line and exits 2."""


class LatentgenError(Exception):
    """Base class: a user-facing error whose message names the file, key or option at fault."""


class CheckpointError(LatentgenError):
    """A checkpoint file is missing, unsafe (pickle), corrupt, or does not match the architecture."""


class ConfigError(LatentgenError):
    """A model name, registry entry or option value is unknown or inconsistent."""


class HeadCountError(ConfigError):
    """Attention cannot be split into heads as assumed: the head count is a hyper-parameter the weights do not show."""


class InputError(LatentgenError):
    """An input image, mask, latent file or prompt line cannot be used."""


class OutputError(LatentgenError):
    """An output cannot be written. `fatal` (a full disk, a read-only or failing file system) stops a batch:
    the next items would fail the same way."""

    def __init__(self, message: str, *, fatal: bool = False):
        super().__init__(message)
        self.fatal = fatal
