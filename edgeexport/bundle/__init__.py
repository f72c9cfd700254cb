"""Bundles: the directory a device app embeds (model file untouched, manifest, loader, golden pairs)."""

from edgeexport.bundle.manifest import SCHEMA_VERSION  # noqa: F401
