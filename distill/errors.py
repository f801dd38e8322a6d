"""One exception type for every problem the user can fix (bad config, missing file, stale checkpoint).

Entry points catch it and print its message as a single line, so a user sees what is wrong without a
traceback; everything else is a bug and keeps its traceback.
"""


class DistillError(Exception):
    """A problem with the user's input or run dir, explained in one line."""
