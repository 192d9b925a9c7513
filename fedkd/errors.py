"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""


class FedkdError(Exception):
    """A problem with the user's input: a scenario, a path, a strategy name."""


class ScenarioError(FedkdError):
    """A scenario file that does not validate. The message names file and key path."""

    def __init__(self, path: str, key: str, expected: str):
        self.path, self.key, self.expected = path, key, expected
        where = f"{path}: {key}" if key else path
        super().__init__(f"{where}: {expected}")
