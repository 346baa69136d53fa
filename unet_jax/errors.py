"""The errors a user can fix: bad data, a bad config, a bad workdir or checkpoint.

Entry points print these as one line (`unet_jax.cli`); anything else is a
bug and keeps its traceback.
"""


class UserError(ValueError):
  """A problem in what the user gave; the message names the file or field and what is wrong.

  A ValueError, as these errors were before they had a common class.
  """
