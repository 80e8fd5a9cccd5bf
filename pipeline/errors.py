"""The errors a user can cause and fix. Each message is one line: the culprit (a config key, a
file and line, a model or path), what is wrong, and what to do. `python -m pipeline` prints it
as `error: <message>` and exits 2, without a traceback (PIPELINE_DEBUG=1 shows one); any other
exception is a bug and keeps its traceback.

Standard library only, so every layer (launchers included) can raise them.
"""


class UserError(Exception):
    """Base of every error the user can fix; str(err) is the one line to print."""

# Exit statuses of `python -m pipeline`: a UserError, and a stop that the same command resumes
# (SIGTERM/SIGUSR1 or a scheduler's pre-emption: the stage saved a checkpoint first; EX_TEMPFAIL).
USER_ERROR_EXIT_CODE = 2
RESUMABLE_EXIT_CODE = 75
