"""Errors the library raises for problems a user can fix.

Each message says what is wrong and what to do; the command line prints it without a traceback.
"""


class SameRegistrationError(Exception):
    """Base class: a problem with the inputs, the configuration or the machine."""


class InputError(SameRegistrationError):
    """An input image, label map or point set cannot be used."""


class ConfigError(SameRegistrationError):
    """A configuration value is unknown or out of range."""


class CheckpointError(SameRegistrationError):
    """A network weights file is missing, unreadable or does not fit the network."""


class DeviceError(SameRegistrationError):
    """The requested compute device is unavailable or ran out of memory."""


class RegistrationFailed(SameRegistrationError):
    """The images could not be registered (for example, they share no anatomy)."""


class OutputError(SameRegistrationError):
    """The output folder cannot be written without losing existing data."""
