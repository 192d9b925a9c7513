"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""


class FedkdError(Exception):
    """A problem with the user's input: a scenario, a path, a strategy name."""


class ScenarioError(FedkdError):
    """A scenario file that does not validate. The message names file and key path."""

    def __init__(self, path: str, key: str, expected: str):
        self.path, self.key, self.expected = path, key, expected
        where = f"{path}: {key}" if key else path
        super().__init__(f"{where}: {expected}")

    def __reduce__(self):  # rebuilt from its three parts when it crosses to another process
        return (type(self), (self.path, self.key, self.expected))


class RunFailed(FedkdError):
    """A (strategy, seed) run stopped because code it ran raised (a plug-in's, or fedkd's own).

    The message is one line naming the run, the exception and where it was raised;
    ``traceback_text`` keeps the whole traceback as text (``fedkd -v`` prints it), so it
    survives the trip back from a worker process or a Ray node.
    """

    def __init__(self, message: str, traceback_text: str = ""):
        super().__init__(message)
        self.traceback_text = traceback_text

    def __reduce__(self):
        return (type(self), (str(self), self.traceback_text))
