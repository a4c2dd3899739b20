"""User-facing errors: each carries one line that names the file or field and says what to do."""


class UserError(Exception):
    """Something the user can fix. Entry points print `str(err)` without a traceback and exit 1."""

    hint: str = ""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.hint = hint


class ModelLoadError(UserError):
    """A model file or folder cannot be read or is not a supported Stable Diffusion model."""


class DatasetError(UserError):
    """The training images, captions, folders or dataset TOML are not usable."""


class NetworkError(UserError):
    """A LoRA file or network option is not usable."""
