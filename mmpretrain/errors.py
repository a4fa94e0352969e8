"""Two kinds of failure: the user's input is unusable (one line, exit non-zero), or one sample is bad
(recorded in failures.jsonl with a reason, the run goes on). Internal bugs are neither and keep
their traceback."""


class UserError(Exception):
    """The command cannot run on this input. The message is one line: what, where, what to do."""


class SampleError(Exception):
    """One input sample failed. `reason` is a short stable identifier (e.g. ``http_404``,
    ``truncated_image``) counted in stats.json; `detail` is free text for failures.jsonl."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
