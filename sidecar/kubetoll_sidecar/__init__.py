"""Kubetoll sidecar: the data plane. An OpenAI-compatible router on 127.0.0.1."""

__version__ = "0.1.0"
