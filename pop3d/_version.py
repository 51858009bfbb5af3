"""The version of pop3d, at the bottom of the package so that any module may import it."""

__version__ = "0.1.0"
