"""The HTTP front: Flask under gunicorn, stateless, no torch."""
