"""Offline training: labelled images in, a versioned model folder that `service/` loads out."""
