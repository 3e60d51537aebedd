"""Errors a user can act on. The CLI prints them as one line, never as a traceback."""


class FastftError(Exception):
    """A problem with the user's input or environment, stated in one line."""

    def one_line(self) -> str:
        text = str(self).strip()
        # A DataLoader worker re-raises our error with the worker's traceback
        # folded into the message; the user only needs our own last line.
        if "Traceback" in text:
            last = text.splitlines()[-1]
            prefix = f"{type(self).__module__}.{type(self).__name__}: "
            text = last[len(prefix):] if last.startswith(prefix) else last
        return text.splitlines()[0] if text else type(self).__name__


class DataError(FastftError):
    """The dataset is missing, malformed, or holds a file that cannot be decoded."""


class WeightsError(FastftError):
    """Initial weights cannot be found, downloaded or matched to the model."""


class CheckpointError(FastftError):
    """A run's checkpoint is missing, unreadable or does not fit the run."""


class ConfigError(FastftError):
    """Options that contradict each other or the machine."""


class WriteError(FastftError):
    """A file cannot be written: its disk is full, its folder read-only or not ours to write.

    `path` is the file, `needed` the bytes the write needed (None where unknown). The message is
    one line; `with_note` adds what the caller knows (the checkpoint that is still intact, the
    command that resumes)."""

    def __init__(self, message: str, path=None, needed: int | None = None):
        super().__init__(message)
        self.path, self.needed = path, needed

    def with_note(self, note: str) -> "WriteError":
        return WriteError(f"{self}; {note}", self.path, self.needed)


class ResourceError(FastftError):
    """The machine ran out of something a run needs (memory) at the settings given."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, carrying the one line that says what was saved and how to continue."""


def missing_package(exc: ImportError, packages: str) -> str:
    """What a failed import lacks, for a "needs ..." line: "the onnx package" where the error
    names the module (its top-level package), else `packages` and the error's first line (a
    module that raised ImportError itself, as one whose native library did not load does)."""
    if exc.name:
        return f"the {exc.name.split('.')[0]} package"
    text = str(exc).strip()
    return f"{packages} ({text.splitlines()[0] if text else type(exc).__name__})"
