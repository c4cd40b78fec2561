"""A TF-Serving-compatible server (REST and gRPC) for exported trunks, with request batching (``docs/serving.md``)."""
from keras_oneimage.serve.batching import BatchScheduler, QueueFullError
from keras_oneimage.serve.limits import Limits
from keras_oneimage.serve.server import ModelManager, ServerHandle, make_app, serve, start_in_thread

__all__ = [
    "BatchScheduler",
    "Limits",
    "ModelManager",
    "QueueFullError",
    "ServerHandle",
    "make_app",
    "serve",
    "start_in_thread",
]
