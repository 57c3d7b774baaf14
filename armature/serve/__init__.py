"""The image generator on Ray Serve.

``app``: the Serve deployments (HTTP ingress, generator replicas), ``build_app`` and the
``armature serve`` command; ``routes``: the HTTP API and its limits; ``generation``: batched,
reproducible sampling and Best-of-N; ``adapters``: LoRA adapters and fine-tuned UNets side by side
in one replica; ``client``: a Python client. Imports go to policies, rewards and platform, never
to jobs.
"""
