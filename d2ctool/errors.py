"""The one exception type the CLI turns into a one-line message instead of a traceback."""


class UserError(Exception):
    """Bad input from the user: a missing file, a config typo, a mismatched checkpoint.

    The message must name the thing and say what to do about it.
    """


_OS_HINTS = {
    "ENOSPC": "the disk is full: free space or choose another output folder, then re-run to resume",
    "EDQUOT": "the disk quota is exhausted: free space or choose another output folder, then re-run to resume",
    "EROFS": "the file system is read-only: choose a writable output folder",
    "EACCES": "permission denied: choose a folder you may write to, or fix its permissions",
    "EPERM": "operation not permitted: choose a folder you may write to, or fix its permissions",
    "ENOENT": "check that the path exists and was not deleted or moved while the command ran",
}


def describe_os_error(e: OSError) -> str:
    """One line for an operating-system fault: the path, the fault, and what to do."""
    import errno as errno_names

    name = errno_names.errorcode.get(e.errno or 0, "")
    paths = " -> ".join(str(p) for p in (e.filename, e.filename2) if p is not None)
    fault = e.strerror or str(e) or type(e).__name__
    hint = _OS_HINTS.get(name)
    return f"{paths or 'a file operation'}: {fault}" + (f" ({name}); {hint}" if hint else (f" ({name})" if name else ""))


def one_line(message: str) -> str:
    """A UserError's message, also when it crossed a DataLoader worker (torch then adds the worker's traceback)."""
    if "Original Traceback" in message:
        for line in reversed(message.splitlines()):
            if "UserError: " in line or "ConfigError: " in line:
                return line.split("Error: ", 1)[1]
    return message
