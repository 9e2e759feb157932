"""User-facing errors: one line, naming the file / key / field at fault, never a traceback."""


class UserError(Exception):
    """A mistake in the user's input or config; the CLI prints ``str(err)`` and exits 2."""


class RecordError(ValueError):
    """A row that breaks the record contract.

    ``reason`` is a stable code (missing_field, wrong_type, ...), ``field`` the JSON path of the
    offending field (``messages[2].role``), so a report can be grouped and a user can find it.
    """

    def __init__(self, reason: str, field: str, detail: str = ""):
        self.reason, self.field, self.detail = reason, field, detail
        super().__init__(f"{reason}: field '{field}'" + (f": {detail}" if detail else ""))
