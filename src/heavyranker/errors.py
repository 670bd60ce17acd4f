"""Errors a person must fix (bad data, missing files): the CLI prints them without a traceback."""


class UserError(Exception):
    pass


class DataError(UserError):
    """Bad data: the message names the file, and the record or feature where it can."""


class SettingError(UserError):
    """A setting's value a person must change. `setting` names it as the config does (serving.max_queue), or
    as a library function's parameter; `problem` completes a sentence whose subject it is ("must be at least
    1, not 0"). `source` is the file the value came from, None when the caller gave it: a CLI then names the
    flag that gave it in place of the setting."""

    def __init__(self, setting: str, problem: str, source: str | None = None):
        self.setting, self.problem, self.source = setting, problem, source
        super().__init__(f"{source + ': ' if source else ''}{setting} {problem}")
