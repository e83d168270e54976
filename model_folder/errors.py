"""The errors of the model folder contract: a folder that cannot be served, an image refused."""

from __future__ import annotations


class ModelFolderError(Exception):
    """A model folder (or repository) cannot be served; the message is one line naming the file
    and the fault."""


class ImageRejected(ValueError):
    """An image that preprocessing refuses; the message says why, in plain words."""


class UndecodableImage(ImageRejected):
    """Not a decodable image of an accepted format, or truncated or corrupt."""


class ImageTooLarge(ImageRejected):
    """More pixels than the limit, found from the header before any decoding."""
