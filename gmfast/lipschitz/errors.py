"""The error every part of the package raises for a module it cannot bound soundly."""

#: The advice every refusal ends with: what the caller can do instead.
ADVICE = "pass lipschitz=<float> explicitly or wrap it in a module with a float attribute lipschitz_constant"


class UnsupportedOpError(ValueError):
    """A graph node has no sound Lipschitz rule, or the module does something the traced
    graph does not show (hooks, overridden ``forward``, batch coupling, casts)."""
