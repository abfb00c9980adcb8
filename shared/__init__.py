"""What every stage script needs and none of them teaches: the data, the command line, the device.

The models, their training loops and their samplers live in the numbered scripts, repeated on
purpose so that each one reads on its own and diffs cleanly against the one before.
"""


class UserError(Exception):
    """A problem with the user's input or machine, told as one sentence instead of a traceback."""
