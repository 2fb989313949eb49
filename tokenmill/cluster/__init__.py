"""Scale-out on Ray Serve: an OpenAI ingress, engine replicas, and a router that sends each request to the replica
whose prefix cache already holds its prompt.

`routing.py` (the policies and the index of cached prefixes) is plain Python and imports neither Ray nor torch;
the Ray parts (`ray_router.py`, `replica.py`, `ingress.py`, `deploy.py`) need the `cluster` extra
(`pip install 'tokenmill[cluster]'`).
"""
