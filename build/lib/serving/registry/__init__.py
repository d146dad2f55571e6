"""The registry as a server sees it: the folder watched, each version's status (`watcher`), and the
command line (`cli`: python -m serving.registry). Layout, publish and remove: modeling/registry.py."""
from serving.registry.cli import main
from serving.registry.watcher import AdapterNotFound, AdapterRefused, Entry, Registry, RegistryUnavailable

__all__ = ["AdapterNotFound", "AdapterRefused", "Entry", "Registry", "RegistryUnavailable", "main"]
