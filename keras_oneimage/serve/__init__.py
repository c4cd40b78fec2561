"""A TF-Serving-compatible server for exported trunks (REST and gRPC), with request batching (see ``docs/serving.md``)."""
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
