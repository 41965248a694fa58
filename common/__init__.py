"""What the API and the worker share: frames, key names, settings and errors. No torch here."""
