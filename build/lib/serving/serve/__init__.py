"""The gRPC service on Ray Serve and its fronts (`python -m serving.serve`)."""
from serving.serve.launch import main, start, stop, wait_until_routable

__all__ = ["main", "start", "stop", "wait_until_routable"]
