"""The one exception the library raises for what it refuses."""


class RConvError(ValueError):
    """Bad input, or a setting R-CONV cannot run; the message names the problem.

    A ValueError, so that code written against earlier versions still catches it.
    """
